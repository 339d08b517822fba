"""`kill -9` of `bundle install` at any step leaves the previous release live and intact; re-running completes it.

The installer SIGKILLs itself at a named point (run through `tests/crash_launcher.py`): no handler, no `finally` runs, like a
power cut. Each case installs version 1, crashes the install of version 2 in a real subprocess, checks what a
reader of `<root>` would see, then runs the same install again.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sealbox.bundler.crashpoints import POINTS
from sealbox.bundler.install import InstallRequest, install_bundle
from sealbox.bundler.releases import Releases
from install_support import REPO, Publisher, make_keys, model_item, snapshot, trust, write_gguf
from sealbox.runtime.audit.verify import verify_directory
from sealbox.runtime.hostroot import HostRoot

CRASH_LAUNCHER = Path(__file__).with_name("crash_launcher.py")

PART = 8 * 1024
BEFORE_SWITCH = [p for p in POINTS if p not in ("activated", "venv-built")]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keys(tmp_path_factory.mktemp("keys"), "alice")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bundles")
    alpha = write_gguf(folder / "alpha.gguf", seed=1)
    beta = write_gguf(folder / "beta.gguf", seed=2, values=10_000)  # ~40 KB: five parts of 8 KiB
    publisher = Publisher(keys)
    return {
        "v1": publisher.publish(folder / "v1", [model_item(alpha)], version=1),
        "v2": publisher.publish(folder / "v2", [model_item(alpha), model_item(beta)], version=2, max_part_size=PART),
        "alpha": alpha,
        "beta": beta,
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_install(bundle: Path, root: Path, crash_at: str | None) -> subprocess.CompletedProcess[str]:
    if crash_at:
        command = [sys.executable, str(CRASH_LAUNCHER), crash_at]
    else:
        command = [sys.executable, "-c", "import sys; from sealbox.cli import main; sys.argv[0] = 'sealbox'; main()"]
    command += ["bundle", "install", str(bundle), "--root", str(root), "--json"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def live_models(root: Path) -> dict[str, str]:
    """What a server reading `<root>/current/release.json` would load, by digest of the bytes it would read."""
    release = Releases(HostRoot(root)).current()
    assert release is not None
    return {m.name: sha256(release.directory / m.path) for m in release.release.models}


@pytest.fixture
def host(tmp_path: Path, keys: Path, bundles: dict[str, Path]) -> HostRoot:
    host = trust(tmp_path / "root", keys / "alice.pub")
    install_bundle(InstallRequest(bundle=bundles["v1"], root=host))
    return host


@pytest.mark.parametrize("point", BEFORE_SWITCH)
def test_a_crash_before_the_switch_leaves_the_previous_release_live_and_a_rerun_completes(
    point: str, host: HostRoot, bundles: dict[str, Path]
) -> None:
    v1_before = snapshot(host.releases / "demo-1")
    alpha, beta = sha256(bundles["alpha"]), sha256(bundles["beta"])

    crashed = run_install(bundles["v2"], host.path, point)

    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert os.readlink(host.current) == "releases/demo-1"
    assert snapshot(host.releases / "demo-1") == v1_before
    assert live_models(host.path) == {"alpha": alpha}
    if point == "blob-copy":
        temp = host.staging / "install-demo-2" / "blobs" / f".{beta}.tmp"
        assert 0 < temp.stat().st_size < bundles["beta"].stat().st_size, "killed in the middle of the copy"
    if point in ("release-placed", "current-link"):
        assert (host.releases / "demo-2" / "release.json").exists(), "placed whole, not yet live"

    finished = run_install(bundles["v2"], host.path, None)

    assert finished.returncode == 0, finished.stderr
    assert os.readlink(host.current) == "releases/demo-2"
    assert live_models(host.path) == {"alpha": alpha, "beta": beta}
    assert not host.staging.exists()
    assert sorted(p.name for p in host.store.iterdir()) == sorted([alpha, beta])
    assert not (host.path / ".current.new").exists()
    assert verify_directory(host.audit).ok


def test_a_crash_right_after_the_switch_leaves_the_new_release_live_and_the_old_one_intact(
    host: HostRoot, bundles: dict[str, Path]
) -> None:
    v1_before = snapshot(host.releases / "demo-1")
    crashed = run_install(bundles["v2"], host.path, "activated")
    assert crashed.returncode == -signal.SIGKILL
    assert os.readlink(host.current) == "releases/demo-2"
    assert live_models(host.path) == {"alpha": sha256(bundles["alpha"]), "beta": sha256(bundles["beta"])}
    assert snapshot(host.releases / "demo-1") == v1_before

    finished = run_install(bundles["v2"], host.path, None)
    assert finished.returncode == 0, finished.stderr
    assert '"activated": false' in finished.stdout



def test_the_shipped_installer_ignores_the_old_crash_variable(tmp_path: Path) -> None:
    """No environment variable reaches a crash point: only a test's own launcher can make the installer stop."""
    keys = make_keys(tmp_path / "keys", "alice")
    root = trust(tmp_path / "root", keys / "alice.pub")
    (tmp_path / "m").mkdir()
    bundle = Publisher(keys).publish(tmp_path / "b1", [model_item(write_gguf(tmp_path / "m" / "alpha.gguf", seed=1))],
                                     version=1)  # fmt: skip
    command = [sys.executable, "-c", "import sys; from sealbox.cli import main; sys.argv[0] = 'sealbox'; main()"]
    command += ["bundle", "install", str(bundle), "--root", str(root.path), "--json"]
    done = subprocess.run(command, cwd=REPO, env=os.environ | {"SEALBOX_TEST_CRASH_AT": "verified"},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert os.readlink(root.current) == "releases/demo-1"
