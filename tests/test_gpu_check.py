"""`scripts/gpu-check` runs only on a lent GPU machine; here: the script parses, explains itself, and its Python client
measures and compares for real against a CPU `sealbox serve` (a few requests on the tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from server_support import ServerProcess

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu-check"
CLIENT = REPO / "scripts" / "gpu-check-client"


def test_gpu_check_is_valid_bash_and_says_what_travels() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    done = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    for needed in ("prepare", "build", "bench", ".gpu-check/llama-src.tar.xz", ".gpu-check/wheels/", "ARCHS"):
        assert needed in done.stdout
    wrong = subprocess.run([str(SCRIPT), "benchmark"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "prepare" in wrong.stderr


def _client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CLIENT), *args], capture_output=True, text=True, timeout=300)


def test_the_client_measures_a_cpu_sealbox_serve_and_compares_two_runs(tiny_model: Path, tmp_path: Path) -> None:
    policy = "[limits]\nmax_tokens = 4\nmax_sequences = 2\nqueue_size = 8\n"
    (tmp_path / "root").mkdir()
    with ServerProcess(root=tmp_path / "root", models=[tiny_model], no_auth=True, policy_text=policy) as server:
        assert _client("wait", "--base", server.url, "--timeout", "60").returncode == 0
        out = tmp_path / "sealbox.json"
        done = _client("measure", "--base", server.url, "--name", "sealbox", "--levels", "1,2", "--max-tokens", "4",
                       "--requests-each", "1", "--out", str(out))  # fmt: skip
        assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [level["clients"] for level in result["levels"]] == [1, 2]
    assert all(level["tokens"] > 0 and level["server_errors"] == 0 and level["errors"] == 0 for level in result["levels"])
    assert all(0 < level["ttft_p50_s"] <= level["ttft_p99_s"] for level in result["levels"])
    assert result["gpu_memory_bytes"] is None  # no --pid: nothing asked of nvidia-smi

    same = _client("compare", str(out), str(out))
    assert same.returncode == 0 and " 1.00x " in same.stdout, same.stdout

    broken = json.loads(out.read_text())
    broken["name"], broken["levels"][1]["server_errors"] = "peer", 1
    broken["levels"][1]["first_error"] = "500 Internal Server Error"
    (tmp_path / "peer.json").write_text(json.dumps(broken))
    failed = _client("compare", str(out), str(tmp_path / "peer.json"))
    assert failed.returncode == 1
    assert "FAIL: peer at 2 clients: 1 server errors (5xx or dropped), first: 500 Internal Server Error" in failed.stdout
