"""`sealbox doctor` and `sealbox serve --strict` on an appliance made by a real install of a signed bundle.

The bundle is signed with a real Ed25519 key (tests/install_support.py's publisher), its key is in the trust store,
and `bundler.install` lays the release out. The real `sealbox` command runs in a child process, so the manifest
signature check the bundle side registers with the doctor (`bundler/cli/doctor.py`) is the one under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sealbox.bundler.install import InstallRequest, install_bundle
from sealbox.bundler.manifest import MANIFEST_FILE
from install_support import Publisher, make_keys, model_item, trust
from sealbox.runtime.hostroot import HostRoot
from server_support import ServerProcess, create_api_key, sealbox


@dataclass(frozen=True)
class Appliance:
    root: Path
    release: Path
    model: Path  # the release's link, models/tiny.gguf
    blob: Path  # the store file it points at
    digest: str


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keys(tmp_path_factory.mktemp("keys"), "alice", "mallory")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: Path, tiny_model: Path) -> dict[str, Path]:
    """Version 1 signed by the trusted publisher and by a key the host does not trust; version 2 by the publisher."""
    folder = tmp_path_factory.mktemp("bundles")
    publisher = Publisher(keys)
    made = {
        signer: publisher.publish(folder / signer, [model_item(tiny_model)], name="demo", version=1, signers=(signer,))
        for signer in ("alice", "mallory")
    }
    made["alice-v2"] = publisher.publish(folder / "alice-v2", [model_item(tiny_model)], name="demo", version=2)
    return made


@pytest.fixture
def appliance(tmp_path: Path, keys: Path, bundles: dict[str, Path]) -> Appliance:
    host = trust(tmp_path / "root", keys / "alice.pub")
    result = install_bundle(InstallRequest(bundle=bundles["alice"], root=host))
    release = result.release.directory
    model = release / "models" / "tiny.gguf"
    blob = model.resolve()
    return Appliance(host.path, release, model, blob, hashlib.sha256(blob.read_bytes()).hexdigest())


def tamper(path: Path) -> None:
    """Flip one byte in the middle of a store blob (installed read-only: `bundle install` makes blobs 0444)."""
    os.chmod(path, stat.S_IMODE(path.stat().st_mode) | stat.S_IWUSR)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def doctor(root: Path) -> tuple[int, dict[str, dict[str, object]], dict[str, object]]:
    done = sealbox("doctor", "--json", "--strict", root=root, check=False)
    assert done.stdout, done.stderr
    report = json.loads(done.stdout)
    return done.returncode, {check["name"]: check for check in report["checks"]}, report


def strict_server(appliance: Appliance) -> ServerProcess:
    return ServerProcess(root=appliance.root, extra_args=["--strict"])


# --- the intact appliance ----------------------------------------------------------------------------------------


def test_doctor_verifies_the_installed_manifest_signature_against_the_trust_store(appliance: Appliance):
    code, checks, report = doctor(appliance.root)
    assert code == 0 and report["failures"] == [], report["failures"]
    signature = checks["manifest-signature"]
    assert signature["status"] == "pass", signature
    assert signature["summary"] == "demo version 1: signed by 1 of the 1 required trusted keys (threshold 1)"
    assert any(line.startswith("signed by alice (") for line in signature["details"]), signature["details"]
    assert checks["models"]["status"] == "pass"


def test_serve_strict_starts_on_an_intact_installed_release_and_serves_its_model(appliance: Appliance):
    key = create_api_key(appliance.root, "alice")
    with strict_server(appliance) as server:
        models = httpx.get(f"{server.base_url}/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        ready = httpx.get(f"{server.url}/ready", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert [m["id"] for m in models.json()["data"]] == ["tiny"]
    assert ready.json()["models"][0]["sha256"] == appliance.digest


# --- a tampered model --------------------------------------------------------------------------------------------


def test_doctor_reports_a_tampered_model_file_naming_the_model_and_the_digests(appliance: Appliance):
    tamper(appliance.blob)
    code, checks, report = doctor(appliance.root)
    assert code == 1
    assert report["failures"] == ["models"]
    (line,) = checks["models"]["details"]
    actual = hashlib.sha256(appliance.blob.read_bytes()).hexdigest()
    assert line == (f"tiny: {appliance.model}: sha256 {actual}, expected {appliance.digest} "
                    "(modified since install)")  # fmt: skip


def test_serve_strict_refuses_to_start_on_a_tampered_model_and_names_it(appliance: Appliance):
    create_api_key(appliance.root, "alice")
    tamper(appliance.blob)
    done = strict_server(appliance).run_to_exit()
    assert done.returncode == 3, done.stderr  # EXIT_REFUSED
    assert "sealbox serving" not in done.stderr
    assert "refused: sealbox doctor found 1 failure(s): Model files: 1 problem(s) in 1 model(s)" in done.stderr
    assert f"Model files: tiny: {appliance.model}: sha256 " in done.stderr
    assert f"expected {appliance.digest} (modified since install)" in done.stderr


def test_serve_without_strict_starts_but_does_not_serve_the_tampered_model(appliance: Appliance):
    key = create_api_key(appliance.root, "alice")
    tamper(appliance.blob)
    with ServerProcess(root=appliance.root) as server:
        models = httpx.get(f"{server.base_url}/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        ready = httpx.get(f"{server.url}/ready", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert models.json()["data"] == []
    assert ready.status_code == 503
    (model,) = ready.json()["models"]
    assert model["ready"] is False and appliance.digest in model["problem"]


# --- a manifest the trust store does not vouch for ---------------------------------------------------------------


def test_a_manifest_replaced_by_one_an_untrusted_key_signed_fails_the_signature_check(
    appliance: Appliance, bundles: dict[str, Path]
):
    shutil.copyfile(bundles["mallory"] / MANIFEST_FILE, appliance.release / MANIFEST_FILE)
    code, checks, report = doctor(appliance.root)
    assert code == 1 and report["failures"] == ["manifest-signature"]
    signature = checks["manifest-signature"]
    assert signature["summary"].startswith("manifest.json: no signature by a trusted key (signed by ")
    done = strict_server(appliance).run_to_exit()
    assert done.returncode == 3 and "Manifest signature: manifest.json: no signature by a trusted key" in done.stderr


def test_a_trusted_manifest_of_another_release_is_not_accepted_as_this_releases(
    appliance: Appliance, bundles: dict[str, Path]
):
    """Validly signed, but not the manifest this release was installed from (install.json records its digest)."""
    shutil.copyfile(bundles["alice-v2"] / MANIFEST_FILE, appliance.release / MANIFEST_FILE)
    code, checks, _ = doctor(appliance.root)
    assert code == 1
    signature = checks["manifest-signature"]
    assert signature["status"] == "fail"
    assert "is not the manifest this release was installed from" in signature["summary"], signature


def test_the_installed_appliance_is_a_real_install(appliance: Appliance):
    """The fixture is what `bundle install` makes: current → releases/demo-1, the model a link into the store."""
    host = HostRoot(appliance.root)
    assert host.current.resolve() == appliance.release.resolve()
    assert appliance.model.is_symlink() and appliance.blob.parent == host.store.resolve()
    assert stat.S_IMODE(appliance.blob.stat().st_mode) == 0o444
