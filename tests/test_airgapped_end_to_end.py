"""End to end, as on a real site: a bundle made on a connected host with real wheels (sealbox, its dependencies, the
llama-cpp-python wheel from the local build) is installed on an "isolated host" — a network namespace holding only
loopback — and the installed release's own `sealbox` serves a chat completion there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_lockdown

REPO = Path(__file__).resolve().parents[1]
SEALBOX = [sys.executable, "-c", "from sealbox.cli import main; main()"]
PASSPHRASE = {"SEALBOX_KEY_PASSPHRASE": "end-to-end test"}

@pytest.fixture(autouse=True)
def isolated_host_possible() -> None:
    """An "isolated host" is a network namespace: skipped without one on a developer's machine, failed under CI."""
    require_lockdown("unshare", "ip", netns=True)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*SEALBOX, *args], capture_output=True, text=True, cwd=REPO, env={**os.environ, **PASSPHRASE, **(env or {})},
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, f"sealbox {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A signed bundle with the tiny model and sealbox[engine] with every dependency, as wheels for this platform."""
    work = tmp_path_factory.mktemp("connected-host")
    run("keys", "generate", "publisher", "--out", str(work))
    out = work / "bundle"
    run(
        "bundle", "create", "--name", "site", "--version", "1", "--out", str(out), "--model", str(tiny_model),
        "--policy", str(REPO / "policies" / "default.toml"), "--sealbox-wheel",
        "--sign-key", str(work / "publisher.key"),
    )  # fmt: skip
    return out


def in_isolated_host(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a shell script inside a fresh network namespace that has loopback and nothing else."""
    command = ["unshare", "-rn", "bash", "-euo", "pipefail", "-c", f"ip link set lo up\n{script}"]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900,
                          env={**os.environ, **PASSPHRASE, **env})  # fmt: skip


def test_the_bundle_carries_sealbox_and_a_llama_cpp_wheel(bundle: Path) -> None:
    inspect = run("bundle", "inspect", str(bundle), "--json")
    paths = [entry["path"] for entry in json.loads(inspect.stdout)["manifest"]["blobs"]]
    assert any(p.startswith("wheels/sealbox-") for p in paths), paths
    assert any(p.startswith("wheels/llama_cpp_python-") for p in paths), paths
    assert any(p.startswith("wheels/fastapi-") for p in paths), paths


ISOLATED_CLIENT = """
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from openai import OpenAI
from server_support import ServerProcess, create_api_key

root = Path(sys.argv[1])
key = create_api_key(root, "site-user")
with ServerProcess(root, executable=[str(root / "current" / "venv" / "bin" / "sealbox")]) as server:
    client = OpenAI(base_url=server.base_url, api_key=key)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    print("ANSWER", reply.usage.completion_tokens)
"""


def test_the_bundle_installs_offline_and_the_releases_own_sealbox_serves_there(bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "isolated-root"
    sealbox = f'{sys.executable} -c "from sealbox.cli import main; main()"'
    script = f"""
test "$(ip -o route show | wc -l)" = 0   # no route but loopback, before anything else
{sealbox} trust add {bundle.parent / "publisher.pub"} --root {root}
{sealbox} bundle install {bundle} --root {root}
{root}/current/venv/bin/sealbox --help > /dev/null
{sys.executable} -c '{ISOLATED_CLIENT}' {root}
{sealbox} audit verify --root {root}
"""
    result = in_isolated_host(script)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert "ANSWER 4" in result.stdout
    assert "VALID" in result.stdout
    assert (root / "current" / "venv" / "bin" / "sealbox").read_text().startswith(f"#!{root}/releases/site-1/venv/bin/python")
