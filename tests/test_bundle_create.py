"""`sealbox bundle create`: one pass over every byte, split parts, refusals before writing, crash-safe and resumable."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from sealbox.bundler.blobs import FAT32_MAX_FILE, BlobWriter
from sealbox.bundler.cli.bundle import bundle_app
from sealbox.bundler.create import WORK_DIR, parse_expiry
from sealbox.bundler.errors import InputError, MissingFileError
from sealbox.bundler.keys import generate_key_pair, load_public_key
from sealbox.bundler.manifest import Manifest

app = typer.Typer()
app.add_typer(bundle_app, name="bundle")
runner = CliRunner(env={"COLUMNS": "400"})
REPO = Path(__file__).resolve().parents[1]
POLICY = REPO / "policies" / "default.toml"
CRASH_LIMIT = 1024 * 1024

# Python ignores SIGXFSZ; the child restores the kernel default, so writing past RLIMIT_FSIZE kills it on the spot,
# mid-write, like a power cut or `kill -9` would: no exception handler, no cleanup runs.
CRASHING_SEALBOX = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, ({CRASH_LIMIT}, {CRASH_LIMIT}))
from sealbox.cli import main
sys.argv[0] = "sealbox"
main()
"""


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    generate_key_pair("alice", folder, passphrase=None)
    return folder


def create(out: Path, keys: Path, *inputs: str):
    args = ["bundle", "create", "--name", "demo", "--version", "3", "--out", str(out)]
    args += ["--sign-key", str(keys / "alice.key"), "--json", *inputs]
    return runner.invoke(app, args)


def verify(bundle: Path, keys: Path):
    return runner.invoke(app, ["bundle", "verify", str(bundle), "--trust", str(keys / "alice.pub")])


def signed_manifest(bundle: Path) -> Manifest:
    envelope = json.loads((bundle / "manifest.json").read_bytes())
    return Manifest.from_bytes(base64.b64decode(envelope["payload"]))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_create_writes_a_signed_bundle_that_verifies(tmp_path: Path, keys: Path, tiny_model: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    out = tmp_path / "bundle"
    result = create(out, keys, "--model", str(tiny_model), "--policy", str(POLICY), "--file", str(notes))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["signed_by"] == [load_public_key(keys / "alice.pub").keyid]
    manifest = signed_manifest(out)
    assert (manifest.name, manifest.version) == ("demo", 3)
    by_path = {entry.path: entry for entry in manifest.blobs}
    assert by_path[f"models/{tiny_model.name}"].sha256 == sha256(tiny_model)
    assert by_path["policies/default.toml"].sha256 == sha256(POLICY)
    assert by_path["files/notes.txt"].sha256 == sha256(notes)
    assert by_path["sbom.cdx.json"].role == "sbom"
    assert by_path[f"models/{tiny_model.name}"].meta["architecture"] == "llama"
    assert by_path[f"models/{tiny_model.name}"].provenance == str(tiny_model.absolute())
    assert sorted(os.listdir(out)) == ["blobs", "manifest.json"]
    assert verify(out, keys).exit_code == 0


def test_create_splits_a_large_blob_into_parts_of_the_maximum_size(tmp_path: Path, keys: Path, tiny_model: Path) -> None:
    out = tmp_path / "bundle"
    result = create(out, keys, "--model", str(tiny_model), "--max-part-size", "64K")
    assert result.exit_code == 0, result.output
    entry = signed_manifest(out).entries("model")[0]
    size = tiny_model.stat().st_size
    assert len(entry.parts) == -(-size // 65536) > 1
    assert [part.size for part in entry.parts[:-1]] == [65536] * (len(entry.parts) - 1)
    data = tiny_model.read_bytes()
    for index, part in enumerate(entry.parts):
        stored = out / "blobs" / "sha256" / f"{entry.sha256}.part{index:03d}"
        assert stored.read_bytes() == data[index * 65536 : (index + 1) * 65536]
        assert part.sha256 == sha256(stored)
    assert entry.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("size", "part_size"),
    [
        (5 * 1024**2 + 123, 2 * 1024**2),  # whole blocks written direct, then a buffered tail
        (5 * 1024**2 + 123, 2 * 1024**2 + 512),  # a part ends mid-block: the file turns buffered part-way
        (20_000, 3000),  # no write is ever in whole blocks
    ],
)
def test_the_blob_writer_stores_every_byte_whether_writes_go_direct_or_buffered(
    tmp_path: Path, size: int, part_size: int
) -> None:
    data = os.urandom(size)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    bundle = tmp_path / "bundle"
    blob = BlobWriter(bundle, work_dir=tmp_path / "work", max_part_size=part_size).write(source)
    stored = [(bundle / name).read_bytes() for name in blob.files]
    assert b"".join(stored) == data
    assert blob.sha256 == hashlib.sha256(data).hexdigest()
    assert [len(part) for part in stored] == [part.size for part in blob.parts]
    assert [hashlib.sha256(part).hexdigest() for part in stored] == [part.sha256 for part in blob.parts]


def test_create_refuses_a_non_gguf_model_before_writing_anything(tmp_path: Path, keys: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 100)
    out = tmp_path / "bundle"
    result = create(out, keys, "--model", str(fake))
    assert result.exit_code == InputError.exit_code
    assert f"{fake}: not a GGUF model" in result.stderr
    assert not out.exists()


def test_create_refuses_an_invalid_policy_before_writing_anything(tmp_path: Path, keys: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[limits]\nmax_tokens = -5\n")
    out = tmp_path / "bundle"
    result = create(out, keys, "--policy", str(policy))
    assert result.exit_code == InputError.exit_code
    assert "limits.max_tokens" in result.stderr
    assert not out.exists()


def test_create_refuses_two_inputs_with_the_same_bundle_path(tmp_path: Path, keys: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        (tmp_path / folder / "notes.txt").write_text(folder)
    result = create(tmp_path / "out", keys, "--file", str(tmp_path / "a" / "notes.txt"), "--file", str(tmp_path / "b" / "notes.txt"))
    assert result.exit_code == InputError.exit_code
    assert "files/notes.txt" in result.stderr
    assert not (tmp_path / "out").exists()


def test_create_refuses_an_out_directory_that_already_holds_a_bundle(tmp_path: Path, keys: Path) -> None:
    out = tmp_path / "bundle"
    assert create(out, keys, "--policy", str(POLICY)).exit_code == 0
    before = (out / "manifest.json").read_bytes()
    result = create(out, keys, "--policy", str(POLICY))
    assert result.exit_code == InputError.exit_code
    assert "already holds a bundle" in result.stderr
    assert (out / "manifest.json").read_bytes() == before


def test_create_refuses_an_out_directory_with_someone_elses_files(tmp_path: Path, keys: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    result = create(out, keys, "--policy", str(POLICY))
    assert result.exit_code == InputError.exit_code
    assert "thesis.tex" in result.stderr
    assert sorted(os.listdir(out)) == ["thesis.tex"]


def crash_mid_create(out: Path, keys: Path, *inputs: Path) -> subprocess.CompletedProcess[bytes]:
    """Run `sealbox bundle create` in a child that the kernel kills while it writes a blob larger than 1 MiB."""
    args = ["bundle", "create", "--name", "demo", "--version", "3", "--out", str(out)]
    args += ["--sign-key", str(keys / "alice.key")]
    for path in inputs:
        args += ["--policy" if path.suffix == ".toml" else "--file", str(path)]
    child = subprocess.run([sys.executable, "-c", CRASHING_SEALBOX, *args], capture_output=True, cwd=REPO, timeout=120)
    assert child.returncode == -signal.SIGXFSZ, child.stderr.decode()
    return child


def create_again(out: Path, keys: Path, notes: Path, large: Path) -> dict[str, object]:
    """`bundle create` run again into the crashed `out` with the policy, `notes` and `large`; its JSON summary."""
    result = create(out, keys, "--policy", str(POLICY), "--file", str(notes), "--file", str(large))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    """A small file (completes before the crash) and a 3 MiB one (the crash happens while writing it)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("small enough to finish\n")
    large = tmp_path / "large.bin"
    large.write_bytes(os.urandom(3 * 1024 * 1024))
    return notes, large


@pytest.fixture
def crashed(tmp_path: Path, keys: Path, inputs: tuple[Path, Path]) -> Path:
    """A bundle directory whose `bundle create` was killed mid-way."""
    out = tmp_path / "bundle"
    crash_mid_create(out, keys, POLICY, *inputs)
    return out


def test_a_crash_mid_create_leaves_a_directory_that_does_not_verify(crashed: Path, keys: Path) -> None:
    out = crashed
    assert not (out / "manifest.json").exists()
    result = verify(out, keys)
    assert result.exit_code == MissingFileError.exit_code
    assert "manifest.json: missing" in result.stderr


def test_a_rerun_after_a_crash_reuses_the_complete_blobs_without_rewriting_them(
    crashed: Path, keys: Path, inputs: tuple[Path, Path]
) -> None:
    notes, large = inputs
    out = crashed
    done = out / "blobs" / "sha256" / sha256(notes)
    before = done.stat()
    summary = create_again(out, keys, notes, large)
    assert summary["blobs_reused"] == 2  # policy and notes
    assert summary["bytes_reused"] == POLICY.stat().st_size + notes.stat().st_size
    assert summary["blobs_written"] == 2  # the large file and the SBOM
    after = done.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not (out / WORK_DIR).exists()
    assert verify(out, keys).exit_code == 0


def test_a_rerun_rewrites_a_source_that_changed_since_the_crash(
    crashed: Path, keys: Path, inputs: tuple[Path, Path]
) -> None:
    notes, large = inputs
    out = crashed
    notes.write_text("edited after the crash, so the old blob must not be reused\n")
    assert create_again(out, keys, notes, large)["blobs_reused"] == 1  # the policy only
    assert signed_manifest(out).entries("file")[1].sha256 == sha256(notes)
    assert verify(out, keys).exit_code == 0  # the stale notes blob was removed, not left as an extra file


def test_create_json_summary_names_every_blob(tmp_path: Path, keys: Path) -> None:
    result = create(tmp_path / "bundle", keys, "--policy", str(POLICY), "--expires", "2w")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [blob["path"] for blob in summary["blobs"]] == ["policies/default.toml", "sbom.cdx.json"]
    manifest = signed_manifest(tmp_path / "bundle")
    assert manifest.expires - manifest.created == timedelta(weeks=2)


def test_manifest_keeps_fields_it_does_not_know() -> None:
    data = {
        "format": "sealbox-bundle", "format_version": 1, "name": "n", "version": 1,
        "created": "2030-01-01T00:00:00Z", "expires": "2030-02-01T00:00:00Z", "from_the_future": {"x": 1},
        "target": {"python": "3.11", "implementation": "cp", "abi": "cp311", "platforms": ["any"], "gpu": "sm90"},
        "base": None,
        "blobs": [{"role": "file", "path": "files/a", "size": 0, "sha256": hashlib.sha256(b"").hexdigest(),
                   "parts": [{"size": 0, "sha256": hashlib.sha256(b"").hexdigest()}], "meta": {}, "provenance": "",
                   "signed_extra": True}],
    }  # fmt: skip
    again = Manifest.from_dict(json.loads(json.dumps(data))).to_dict()
    assert again == data


def test_the_default_part_size_fits_fat32() -> None:
    assert FAT32_MAX_FILE == 4 * 1024**3 - 1


def test_expiry_takes_durations_and_dates() -> None:
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert parse_expiry("90d", now) == now + timedelta(days=90)
    assert parse_expiry("12h", now) == now + timedelta(hours=12)
    assert parse_expiry("2031-06-30", now) == datetime(2031, 6, 30, tzinfo=timezone.utc)
    with pytest.raises(ValueError):
        parse_expiry("soon", now)
