"""Publisher keys: Ed25519 pairs, encrypted at rest, never overwritten, named by an id derived from the public key."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest
import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from typer.testing import CliRunner

from sealbox.bundler.cli.keys import keys_app
from sealbox.bundler.errors import KeyFileError
from sealbox.bundler.keys import PASSPHRASE_ENV, load_public_key, load_signer

app = typer.Typer()
app.add_typer(keys_app, name="keys")
runner = CliRunner()


def generate(out: Path, *args: str, env: dict[str, str] | None = None, input: str | None = None):
    return runner.invoke(app, ["keys", "generate", *args, "--out", str(out), "--json"], env=env, input=input)


def test_generate_writes_a_0600_private_key_and_a_separate_public_key(tmp_path: Path) -> None:
    result = generate(tmp_path, "alice", env={PASSPHRASE_ENV: "correct horse"})
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    private, public = tmp_path / "alice.key", tmp_path / "alice.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert b"PRIVATE KEY" not in public.read_bytes()
    assert info["key_id"] == load_public_key(public).keyid
    assert info["encrypted"] is True


def test_the_private_key_is_encrypted_with_the_passphrase_from_the_environment(tmp_path: Path) -> None:
    assert generate(tmp_path, "alice", env={PASSPHRASE_ENV: "correct horse"}).exit_code == 0
    private = tmp_path / "alice.key"
    assert b"ENCRYPTED PRIVATE KEY" in private.read_bytes()
    with pytest.raises(KeyFileError, match="encrypted"):
        load_signer(private, passphrase=None)
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_signer(private, passphrase=b"battery staple")
    signer = load_signer(private, passphrase=b"correct horse")
    assert signer.public_key.keyid == load_public_key(tmp_path / "alice.pub").keyid


def test_generate_prompts_for_the_passphrase_twice_when_the_environment_has_none(tmp_path: Path) -> None:
    result = generate(tmp_path, "alice", env={PASSPHRASE_ENV: None}, input="s3cret\ns3cret\n")
    assert result.exit_code == 0, result.output
    load_signer(tmp_path / "alice.key", passphrase=b"s3cret")


def test_generate_refuses_to_overwrite_existing_key_files(tmp_path: Path) -> None:
    assert generate(tmp_path, "alice", env={PASSPHRASE_ENV: "one"}).exit_code == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("alice.key", "alice.pub")}
    result = generate(tmp_path, "alice", env={PASSPHRASE_ENV: "two"})
    assert result.exit_code == KeyFileError.exit_code
    assert "already exists" in result.stderr
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_generate_refuses_when_only_the_public_file_exists_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "alice.pub").write_text("someone else's key\n")
    result = generate(tmp_path, "alice", "--no-encryption")
    assert result.exit_code == KeyFileError.exit_code
    assert not (tmp_path / "alice.key").exists()
    assert (tmp_path / "alice.pub").read_text() == "someone else's key\n"


def test_an_unencrypted_key_is_written_only_with_the_explicit_flag(tmp_path: Path) -> None:
    result = generate(tmp_path, "ci", "--no-encryption", env={PASSPHRASE_ENV: "ignored"})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["encrypted"] is False
    assert b"ENCRYPTED" not in (tmp_path / "ci.key").read_bytes()
    assert stat.S_IMODE((tmp_path / "ci.key").stat().st_mode) == 0o600
    load_signer(tmp_path / "ci.key", passphrase=None)


def test_an_empty_passphrase_is_refused(tmp_path: Path) -> None:
    result = generate(tmp_path, "alice", env={PASSPHRASE_ENV: ""})
    assert result.exit_code == KeyFileError.exit_code
    assert "empty" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_key_id_is_the_sha256_of_the_raw_public_key_cut_to_16_hex(tmp_path: Path) -> None:
    assert generate(tmp_path, "alice", "--no-encryption").exit_code == 0
    public = serialization.load_pem_public_key((tmp_path / "alice.pub").read_bytes())
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert load_public_key(tmp_path / "alice.pub").keyid == hashlib.sha256(raw).hexdigest()[:16]


def test_a_key_name_with_a_slash_is_refused(tmp_path: Path) -> None:
    result = generate(tmp_path, "../escape", "--no-encryption")
    assert result.exit_code == KeyFileError.exit_code
    assert not (tmp_path.parent / "escape.key").exists()


def test_a_public_key_that_is_not_ed25519_is_refused(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "rsa.pub"
    path.write_bytes(
        rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(KeyFileError, match="not an Ed25519 public key"):
        load_public_key(path)
