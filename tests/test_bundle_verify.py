"""`sealbox bundle verify` refuses every way a copied bundle can be wrong, each with its own exit code and a reason.

One signed bundle (a tiny GGUF split into 64 KiB parts, a policy, a file) is built once; each test copies it and
breaks one thing.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from sealbox.bundler.create import CreateRequest, create_bundle
from sealbox.bundler.errors import (
    DigestMismatchError,
    ExpiredError,
    ExtraFileError,
    FormatError,
    MissingFileError,
    PathError,
    SignatureError,
    SizeMismatchError,
    ThresholdError,
    UntrustedSignerError,
)
from sealbox.bundler.keys import generate_key_pair, load_public_key, load_signer
from sealbox.bundler.manifest import canonical_json
from sealbox.bundler.signing import envelope_bytes, new_envelope, sign
from sealbox.bundler.verify import verify_bundle
from install_support import app, runner

PART = 64 * 1024
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    for name in ("alice", "bob", "carol", "mallory"):
        generate_key_pair(name, folder, passphrase=None)
    return folder


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory, keys: Path, tiny_model: Path) -> Path:
    """A bundle signed by alice whose model spans several parts."""
    assert tiny_model.stat().st_size > 3 * PART, "the tiny model must span several parts for these tests"
    work = tmp_path_factory.mktemp("golden")
    notes = work / "notes.txt"
    notes.write_text("runbook: verify before install\n")
    out = work / "bundle"
    result = runner.invoke(
        app,
        [
            "bundle", "create", "--name", "tiny", "--version", "1", "--out", str(out),
            "--model", str(tiny_model), "--policy", str(REPO / "policies" / "default.toml"), "--file", str(notes),
            "--sign-key", str(keys / "alice.key"), "--max-part-size", "64K", "--expires", "30d", "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def bundle(golden: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(golden, copy)
    return copy


def verify(bundle: Path, keys: Path, *trusted: str, threshold: int = 1, extra: tuple[str, ...] = ()):
    args = ["bundle", "verify", str(bundle), "--threshold", str(threshold), *extra]
    for name in trusted or ("alice",):
        args += ["--trust", str(keys / f"{name}.pub")]
    return runner.invoke(app, args)


def envelope(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_bytes())


def manifest(bundle: Path) -> dict[str, Any]:
    return json.loads(base64.b64decode(envelope(bundle)["payload"]))


def model_parts(bundle: Path) -> list[Path]:
    entry = next(e for e in manifest(bundle)["blobs"] if e["role"] == "model")
    return [bundle / "blobs" / "sha256" / f"{entry['sha256']}.part{i:03d}" for i in range(len(entry["parts"]))]


def resign(bundle: Path, keys: Path, change: Callable[[dict[str, Any]], None], *signers: str) -> None:
    """Rewrite the manifest and sign it properly: the signature is valid, so only the later checks can refuse it."""
    data = manifest(bundle)
    change(data)
    fresh = new_envelope(canonical_json(data))
    for name in signers or ("alice",):
        sign(fresh, load_signer(keys / f"{name}.key", passphrase=None))
    (bundle / "manifest.json").write_bytes(envelope_bytes(fresh))


def refused(result, error: type[Exception], *fragments: str) -> None:
    assert result.exit_code == error.exit_code, (result.exit_code, result.output)
    line = result.stderr.strip()
    assert "\n" not in line, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_verify_accepts_the_untouched_bundle(bundle: Path, keys: Path) -> None:
    result = verify(bundle, keys, extra=("--json",))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["signed_by"] == [load_public_key(keys / "alice.pub").keyid]
    assert report["files_checked"] == len(model_parts(bundle)) + 3  # model parts, policy, notes, SBOM
    assert report["bytes_checked"] == sum(e["size"] for e in manifest(bundle)["blobs"])


def test_verify_refuses_a_part_with_one_flipped_byte(bundle: Path, keys: Path) -> None:
    part = model_parts(bundle)[1]
    data = bytearray(part.read_bytes())
    data[1000] ^= 0x01
    part.write_bytes(data)
    refused(verify(bundle, keys), DigestMismatchError, part.name, "part 1 of", "models/")


def test_verify_refuses_a_truncated_part(bundle: Path, keys: Path) -> None:
    part = model_parts(bundle)[2]
    os.truncate(part, PART - 1)
    refused(verify(bundle, keys), SizeMismatchError, part.name, "part 2 of", f"{PART - 1} bytes", "truncated")


def test_verify_refuses_a_missing_part(bundle: Path, keys: Path) -> None:
    part = model_parts(bundle)[0]
    part.unlink()
    refused(verify(bundle, keys), MissingFileError, part.name, "missing", "part 0 of")


def test_verify_refuses_an_extra_file(bundle: Path, keys: Path) -> None:
    (bundle / "blobs" / "sha256" / "README.txt").write_text("not signed\n")
    refused(verify(bundle, keys), ExtraFileError, "blobs/sha256/README.txt", "not listed")


def test_verify_refuses_an_extra_empty_directory(bundle: Path, keys: Path) -> None:
    (bundle / "payload").mkdir()
    refused(verify(bundle, keys), ExtraFileError, "payload/")


def test_verify_refuses_two_swapped_parts(bundle: Path, keys: Path) -> None:
    first, second = model_parts(bundle)[:2]
    swap = first.with_suffix(".swap")
    first.rename(swap)
    second.rename(first)
    swap.rename(second)
    refused(verify(bundle, keys), DigestMismatchError, first.name, "part 0 of")


def test_verify_refuses_a_manifest_edited_after_signing(bundle: Path, keys: Path) -> None:
    raw = envelope(bundle)
    data = json.loads(base64.b64decode(raw["payload"]))
    data["expires"] = "2099-01-01T00:00:00Z"
    raw["payload"] = base64.b64encode(canonical_json(data)).decode()
    (bundle / "manifest.json").write_text(json.dumps(raw))
    refused(verify(bundle, keys), SignatureError, "does not match the manifest", "edited after signing")


def test_verify_refuses_a_bundle_signed_only_by_an_untrusted_key(bundle: Path, keys: Path) -> None:
    resign(bundle, keys, lambda data: None, "mallory")
    mallory = load_public_key(keys / "mallory.pub").keyid
    refused(verify(bundle, keys, "alice"), UntrustedSignerError, "no signature by a trusted key", mallory)


def test_verify_refuses_signatures_below_the_threshold(bundle: Path, keys: Path) -> None:
    result = verify(bundle, keys, "alice", "bob", "carol", threshold=2)
    refused(result, ThresholdError, "signed by 1 of the 2 required trusted keys")


def test_cosigning_with_a_second_key_reaches_the_threshold(bundle: Path, keys: Path) -> None:
    signed = runner.invoke(app, ["bundle", "sign", str(bundle), "--sign-key", str(keys / "bob.key"), "--json"])
    assert signed.exit_code == 0, signed.output
    assert len(json.loads(signed.stdout)["signed_by"]) == 2
    result = verify(bundle, keys, "alice", "bob", "carol", threshold=2, extra=("--json",))
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["signed_by"]) == 2


def test_the_same_key_trusted_twice_counts_once(bundle: Path, keys: Path) -> None:
    result = verify(bundle, keys, "alice", "alice", threshold=2)
    assert result.exit_code == 2
    assert "distinct trusted keys" in result.output


def test_cosigning_refuses_a_bundle_whose_bytes_do_not_match(bundle: Path, keys: Path) -> None:
    part = model_parts(bundle)[0]
    data = bytearray(part.read_bytes())
    data[0] ^= 0xFF
    part.write_bytes(data)
    before = (bundle / "manifest.json").read_bytes()
    result = runner.invoke(app, ["bundle", "sign", str(bundle), "--sign-key", str(keys / "bob.key")])
    refused(result, DigestMismatchError, part.name)
    assert (bundle / "manifest.json").read_bytes() == before


def test_verify_refuses_an_expired_bundle(tmp_path: Path, keys: Path) -> None:
    source = tmp_path / "notes.txt"
    source.write_text("old\n")
    past = datetime.now(timezone.utc) - timedelta(days=100)
    request = CreateRequest(
        name="old", version=1, out=tmp_path / "old", signers=[load_signer(keys / "alice.key", passphrase=None)],
        files=[source], now=past, expires=past + timedelta(days=90),
    )  # fmt: skip
    create_bundle(request)
    refused(verify(tmp_path / "old", keys), ExpiredError, "expired at")


@pytest.mark.parametrize("path", ["../../etc/cron.d/evil", "/etc/cron.d/evil", "models/../../evil"])
def test_verify_refuses_a_signed_manifest_path_that_escapes(bundle: Path, keys: Path, path: str) -> None:
    def escape(data: dict[str, Any]) -> None:
        data["blobs"][0]["path"] = path

    resign(bundle, keys, escape)
    refused(verify(bundle, keys), PathError, repr(path))


def test_verify_refuses_a_symlinked_part_even_when_its_bytes_match(bundle: Path, keys: Path, tmp_path: Path) -> None:
    part = model_parts(bundle)[1]
    elsewhere = tmp_path / "outside"
    shutil.copyfile(part, elsewhere)
    part.unlink()
    part.symlink_to(elsewhere)
    refused(verify(bundle, keys), PathError, part.name, "symlink")


def test_verify_refuses_a_symlinked_manifest(bundle: Path, keys: Path, tmp_path: Path) -> None:
    real = tmp_path / "manifest.json"
    shutil.move(bundle / "manifest.json", real)
    (bundle / "manifest.json").symlink_to(real)
    refused(verify(bundle, keys), PathError, "manifest.json", "symlink")


def test_verify_refuses_a_manifest_that_is_not_an_envelope(bundle: Path, keys: Path) -> None:
    (bundle / "manifest.json").write_text('{"name": "tiny"}')
    refused(verify(bundle, keys), FormatError, "not a DSSE envelope")


def test_verify_refuses_a_signed_manifest_of_an_unknown_format_version(bundle: Path, keys: Path) -> None:
    resign(bundle, keys, lambda data: data.update(format_version=99))
    refused(verify(bundle, keys), FormatError, "format_version 99")


def test_verify_refuses_a_directory_without_a_manifest(bundle: Path, keys: Path) -> None:
    (bundle / "manifest.json").unlink()
    refused(verify(bundle, keys), MissingFileError, "manifest.json", "interrupted create")


def test_full_digests_catch_parts_that_join_to_another_blob_digest(bundle: Path, keys: Path) -> None:
    """Parts match their signed digests, but the signed whole-blob digest is wrong: only a full re-hash sees it."""

    def lie(data: dict[str, Any]) -> None:
        model = next(e for e in data["blobs"] if e["role"] == "model")
        files = model_parts(bundle)
        model["sha256"] = "0" * 64
        for index, part in enumerate(files):
            part.rename(part.with_name(f"{'0' * 64}.part{index:03d}"))

    resign(bundle, keys, lie)
    assert verify(bundle, keys).exit_code == 0  # documented: split blobs are covered through their part digests
    refused(verify(bundle, keys, extra=("--full-digests",)), DigestMismatchError, "join to sha256")


def test_the_first_failure_in_manifest_order_is_reported_whatever_the_threads(bundle: Path, keys: Path) -> None:
    parts = model_parts(bundle)
    for part in (parts[0], parts[-1]):
        data = bytearray(part.read_bytes())
        data[-1] ^= 0x01
        part.write_bytes(data)
    trusted = [load_public_key(keys / "alice.pub")]
    for _ in range(5):
        with pytest.raises(DigestMismatchError) as caught:
            verify_bundle(bundle, trusted=trusted, workers=4)
        assert caught.value.part == 0


def test_verify_json_names_the_failed_part(bundle: Path, keys: Path) -> None:
    part = model_parts(bundle)[1]
    os.truncate(part, 10)
    result = verify(bundle, keys, extra=("--json",))
    assert result.exit_code == SizeMismatchError.exit_code
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert (report["error"], report["part"], report["file"]) == ("SizeMismatchError", 1, f"blobs/sha256/{part.name}")


def test_inspect_lists_every_blob_and_signature_without_verifying(bundle: Path, keys: Path) -> None:
    result = runner.invoke(app, ["bundle", "inspect", str(bundle), "--trust", str(keys / "alice.pub"), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert {e["role"] for e in shown["manifest"]["blobs"]} == {"model", "policy", "file", "sbom"}
    assert shown["signatures"] == [{"keyid": load_public_key(keys / "alice.pub").keyid, "status": "valid (trusted)"}]
    table = runner.invoke(app, ["bundle", "inspect", str(bundle)])
    assert table.exit_code == 0, table.output
    assert "models/" in table.stdout and "not checked" in table.stdout
