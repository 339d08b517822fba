"""`sealbox trust`: the host's trusted publisher keys and threshold; every change is in the audit log."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from typer.testing import CliRunner

from sealbox.bundler.cli.trust import trust_app
from sealbox.bundler.keys import load_public_key
from sealbox.bundler.trust import TrustStore, TrustStoreError
from install_support import audit_events, make_keys
from sealbox.runtime.audit.verify import verify_directory
from sealbox.runtime.hostroot import HostRoot

app = typer.Typer()
app.add_typer(trust_app, name="trust")
runner = CliRunner(env={"COLUMNS": "400"})


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keys(tmp_path_factory.mktemp("keys"), "alice", "bob", "carol")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


def trust(root: Path, *args: str):
    return runner.invoke(app, ["trust", *args, "--root", str(root), "--json"])


def key_id(keys: Path, name: str) -> str:
    return load_public_key(keys / f"{name}.pub").keyid


def test_add_stores_the_key_under_its_id_and_records_it(root: Path, keys: Path) -> None:
    result = trust(root, "add", str(keys / "alice.pub"))
    assert result.exit_code == 0, result.output
    added = json.loads(result.stdout)
    assert (added["key_id"], added["name"]) == (key_id(keys, "alice"), "alice")
    stored = root / "trust" / f"{added['key_id']}.pub"
    assert load_public_key(stored).keyid == added["key_id"]
    assert stat.S_IMODE(stored.stat().st_mode) == 0o644
    assert audit_events(root)[-1] == ("trust.add", {"key_id": added["key_id"], "name": "alice"})
    assert verify_directory(root / "audit").ok


def test_list_shows_names_ids_and_the_threshold(root: Path, keys: Path) -> None:
    assert trust(root, "add", str(keys / "alice.pub")).exit_code == 0
    assert trust(root, "add", str(keys / "bob.pub"), "--name", "release-officer").exit_code == 0
    listing = json.loads(trust(root, "list").stdout)
    assert listing["threshold"] == 1
    assert [(k["name"], k["key_id"]) for k in listing["keys"]] == [
        ("alice", key_id(keys, "alice")),
        ("release-officer", key_id(keys, "bob")),
    ]


def test_add_refuses_a_key_already_trusted_and_a_name_already_taken(root: Path, keys: Path) -> None:
    assert trust(root, "add", str(keys / "alice.pub")).exit_code == 0
    again = trust(root, "add", str(keys / "alice.pub"), "--name", "other")
    assert again.exit_code == TrustStoreError.exit_code and "already trusted" in again.output
    taken = trust(root, "add", str(keys / "bob.pub"), "--name", "alice")
    assert taken.exit_code == TrustStoreError.exit_code and "is taken" in taken.output
    assert len(TrustStore(HostRoot(root)).keys()) == 1


def test_add_refuses_a_file_that_is_not_an_ed25519_public_key(root: Path, tmp_path: Path) -> None:
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key\n")
    for path, reason in ((rsa_pub, "not an Ed25519 public key"), (garbage, "not a PEM public key")):
        result = trust(root, "add", str(path))
        assert result.exit_code == TrustStoreError.exit_code and reason in result.output
    assert not (root / "trust").exists() or not list((root / "trust").iterdir())
    assert audit_events(root) == []


def test_remove_by_name_or_id_prefix_and_record_it(root: Path, keys: Path) -> None:
    for name in ("alice", "bob"):
        assert trust(root, "add", str(keys / f"{name}.pub")).exit_code == 0
    assert json.loads(trust(root, "remove", "bob").stdout)["key_id"] == key_id(keys, "bob")
    prefix = key_id(keys, "alice")[:6]
    assert json.loads(trust(root, "remove", prefix).stdout)["name"] == "alice"
    assert TrustStore(HostRoot(root)).keys() == []
    assert [event for event, _ in audit_events(root)] == ["trust.add", "trust.add", "trust.remove", "trust.remove"]
    missing = trust(root, "remove", "bob")
    assert missing.exit_code == TrustStoreError.exit_code and "no trusted key" in missing.output


def test_the_threshold_cannot_exceed_the_keys_and_a_key_cannot_be_removed_below_it(root: Path, keys: Path) -> None:
    for name in ("alice", "bob"):
        assert trust(root, "add", str(keys / f"{name}.pub")).exit_code == 0
    too_high = trust(root, "threshold", "3")
    assert too_high.exit_code == TrustStoreError.exit_code and "between 1 and the 2" in too_high.output
    assert json.loads(trust(root, "threshold", "2").stdout) == {"threshold": 2}
    assert (root / "trust" / "threshold").read_text() == "2\n"
    refused = trust(root, "remove", "alice")
    assert refused.exit_code == TrustStoreError.exit_code and "under threshold 2" in refused.output
    assert len(TrustStore(HostRoot(root)).keys()) == 2
    assert audit_events(root)[-1] == ("trust.threshold", {"threshold": 2, "previous": 1})


def test_an_empty_store_cannot_verify_anything(root: Path) -> None:
    with pytest.raises(TrustStoreError, match="holds no key"):
        TrustStore(HostRoot(root)).policy()


def test_a_key_file_renamed_to_another_id_is_refused(root: Path, keys: Path) -> None:
    assert trust(root, "add", str(keys / "alice.pub")).exit_code == 0
    stored = root / "trust" / f"{key_id(keys, 'alice')}.pub"
    stored.rename(root / "trust" / f"{key_id(keys, 'bob')}.pub")
    with pytest.raises(TrustStoreError, match="not the key its name says"):
        TrustStore(HostRoot(root)).policy()


def test_a_change_that_cannot_be_audited_is_undone(root: Path, keys: Path) -> None:
    assert trust(root, "add", str(keys / "alice.pub")).exit_code == 0
    audit = root / "audit"
    shutil.rmtree(audit)
    audit.write_text("not a directory\n")  # the log cannot be opened now
    result = trust(root, "add", str(keys / "bob.pub"))
    assert result.exit_code == 26 and "cannot record trust.add" in result.output
    assert [k.name for k in TrustStore(HostRoot(root)).keys()] == ["alice"]
