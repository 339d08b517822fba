"""Delta bundles: `create --base` packs only what the base lacks; installing one needs the base's blobs in the store."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import sealbox.bundler.cli.install  # noqa: F401
from sealbox.bundler.cli.bundle import bundle_app
from sealbox.bundler.create import CreateRequest, create_bundle
from sealbox.bundler.delta import BaseManifest, DeltaBaseError, create_delta
from sealbox.bundler.keys import load_public_key, load_signer
from sealbox.bundler.manifest import BLOB_DIR
from sealbox.bundler.verify import verify_bundle
from install_support import audit_events, make_keys, snapshot, trust
from sealbox.runtime.hostroot import HostRoot

app = typer.Typer()
app.add_typer(bundle_app, name="bundle")
runner = CliRunner(env={"COLUMNS": "400"})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keys(tmp_path_factory.mktemp("keys"), "alice")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    files = {}
    for name, size in (("weights-a.bin", 300_000), ("weights-b.bin", 200_000), ("weights-c.bin", 100_000)):
        files[name] = folder / name
        files[name].write_bytes(os.urandom(size))
    files["policy"] = folder / "site.toml"
    files["policy"].write_text("[releases]\nkeep = 5\n")
    return files


def request(out: Path, keys: Path, version: int, *files: Path, policy: Path) -> CreateRequest:
    return CreateRequest(
        name="demo",
        version=version,
        out=out,
        signers=[load_signer(keys / "alice.key", passphrase=None)],
        files=list(files),
        policies=[policy],
        sbom=False,
        max_part_size=64 * 1024,
    )


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: Path, inputs: dict[str, Path]) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bundles")
    base = create_bundle(request(folder / "v1", keys, 1, inputs["weights-a.bin"], inputs["weights-b.bin"], policy=inputs["policy"]))
    delta_request = request(folder / "v2", keys, 2, inputs["weights-a.bin"], inputs["weights-c.bin"], policy=inputs["policy"])
    create_delta(delta_request, BaseManifest.load(base.directory / "manifest.json"))
    return {"v1": base.directory, "v2": folder / "v2"}


def test_create_delta_packs_only_the_blobs_the_base_lacks_and_still_verifies(
    bundles: dict[str, Path], inputs: dict[str, Path], keys: Path
) -> None:
    result = verify_bundle(bundles["v2"], trusted=[load_public_key(keys / "alice.pub")])
    manifest = result.manifest
    in_base = {entry.path for entry in manifest.blobs if entry.in_base}
    assert in_base == {"files/weights-a.bin", "policies/site.toml"}
    carried = {entry.sha256 for entry in manifest.carried()}
    assert carried == {sha256(inputs["weights-c.bin"])}
    on_disk = {name.split(".")[0] for name in os.listdir(bundles["v2"] / BLOB_DIR)}
    assert on_disk == carried
    assert manifest.base is not None and (manifest.base.name, manifest.base.version) == ("demo", 1)
    assert not (bundles["v2"] / ".sealbox-delta").exists()


def test_a_delta_installs_on_a_host_that_holds_its_base(
    tmp_path: Path, keys: Path, bundles: dict[str, Path], inputs: dict[str, Path]
) -> None:
    host = trust(tmp_path / "root", keys / "alice.pub")
    assert runner.invoke(app, ["bundle", "install", str(bundles["v1"]), "--root", str(host.path)]).exit_code == 0
    result = runner.invoke(app, ["bundle", "install", str(bundles["v2"]), "--root", str(host.path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["release"], summary["blobs_copied"], summary["bytes_copied"]) == ("demo-2", 1, 100_000)
    release = host.releases / "demo-2"
    assert (release / "files" / "weights-a.bin").read_bytes() == inputs["weights-a.bin"].read_bytes()
    assert (release / "files" / "weights-c.bin").read_bytes() == inputs["weights-c.bin"].read_bytes()
    assert (release / "policy.toml").read_text() == inputs["policy"].read_text()


@pytest.mark.parametrize("host_state", ["empty", "base-blob-collected"])
def test_a_delta_without_its_base_in_the_store_is_refused_listing_exactly_what_is_missing(
    host_state: str, tmp_path: Path, keys: Path, bundles: dict[str, Path], inputs: dict[str, Path]
) -> None:
    host = trust(tmp_path / "root", keys / "alice.pub")
    missing = {("files/weights-a.bin", sha256(inputs["weights-a.bin"])), ("policies/site.toml", sha256(inputs["policy"]))}
    if host_state == "base-blob-collected":
        assert runner.invoke(app, ["bundle", "install", str(bundles["v1"]), "--root", str(host.path)]).exit_code == 0
        (host.store / sha256(inputs["weights-a.bin"])).unlink()
        missing = {("files/weights-a.bin", sha256(inputs["weights-a.bin"]))}
    before = snapshot(host.path)

    result = runner.invoke(app, ["bundle", "install", str(bundles["v2"]), "--root", str(host.path), "--json"])

    assert result.exit_code == DeltaBaseError.exit_code, result.output
    refusal = json.loads(result.stdout)
    assert {(item["path"], item["sha256"]) for item in refusal["missing"]} == missing
    for path, digest in missing:
        assert path in refusal["message"] and digest in refusal["message"]
    assert "weights-c" not in refusal["message"]
    assert snapshot(host.path) == before
    assert audit_events(host.path)[-1][0] == "bundle.refused"
    assert not (host.releases / "demo-2").exists()


def test_base_manifest_can_be_read_from_an_installed_release(tmp_path: Path, keys: Path, bundles: dict[str, Path]) -> None:
    host = trust(tmp_path / "root", keys / "alice.pub")
    assert runner.invoke(app, ["bundle", "install", str(bundles["v1"]), "--root", str(host.path)]).exit_code == 0
    from_release = BaseManifest.load(HostRoot(host.path).current)
    from_bundle = BaseManifest.load(bundles["v1"])
    assert from_release == from_bundle


def test_create_delta_never_writes_a_byte_of_the_blobs_its_base_already_holds(
    tmp_path: Path, keys: Path, inputs: dict[str, Path]
) -> None:
    """Counted by the kernel: the `sealbox` child's write(2) total (/proc/self/io `wchar`) stays below one base blob."""
    import subprocess
    import sys

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 << 20))
    counting = (
        "import atexit, sys; atexit.register(lambda: sys.stderr.write('\\nWCHAR ' + "
        "open('/proc/self/io').read().split('wchar: ')[1].split()[0] + '\\n')); "
        "from sealbox.cli import main; sys.argv[0] = 'sealbox'; main()"
    )

    def create(out: Path, version: int, *extra: str) -> int:
        args = ["bundle", "create", "--name", "demo", "--version", str(version), "--out", str(out),
                "--sign-key", str(keys / "alice.key"), "--file", str(big), "--policy", str(inputs["policy"]), *extra]  # fmt: skip
        done = subprocess.run([sys.executable, "-c", counting, *args], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        return int(done.stderr.rsplit("WCHAR ", 1)[1].split()[0])

    full = create(tmp_path / "v1", 1)
    assert full >= big.stat().st_size  # the full bundle writes the big blob: the counter sees it
    written = create(tmp_path / "v2", 2, "--file", str(inputs["weights-c.bin"]), "--base", str(tmp_path / "v1"))
    assert written < big.stat().st_size // 8, f"the delta wrote {written} bytes; the base blob it skips is {big.stat().st_size}"
    delta = verify_bundle(tmp_path / "v2", trusted=[load_public_key(keys / "alice.pub")])
    assert {e.path for e in delta.manifest.carried()} == {"files/weights-c.bin", "sbom.cdx.json"}
