"""`sealbox serve` with a vLLM engine: the child supervised by sealbox, behind sealbox's own front.

No machine of this project has vLLM's GPUs, so the child is a stand-in: a small real package named `vllm`
(tests/vllm_standin) whose `vllm.entrypoints.openai.api_server` takes vLLM's flags and key and serves vLLM's OpenAI
shapes from a fixed streamer. It is put on the path of an interpreter made for the test (a venv whose `.pth` adds
this project's environment and the stand-in), and sealbox runs from that interpreter, so its child, started with
`python -I` exactly as in production, imports the stand-in. Everything else is real: the `sealbox serve` process,
its egress guard in the child's interpreter, the supervisor, the official `openai` client, loopback sockets.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from install_support import audit_events

REPO = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "vllm_standin"
RAY_STANDIN = Path(__file__).resolve().parent / "ray_standin"
HEAD_ADDRESS = "127.0.0.7"
MODEL = "standin-7b"
ANSWER = "Sealed boxes keep secrets well."
DEADLINE_S = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: Callable[[], object], what: str, deadline_s: float = DEADLINE_S) -> object:
    """Poll `condition` until it returns something true; fail naming `what` at the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if result := condition():
            return result
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def interpreter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv whose site-packages reach this project's environment and the stand-ins `vllm` and `ray` (read under
    -I too)."""
    venv = tmp_path_factory.mktemp("vllm-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = (venv / "lib").glob("python*/site-packages")
    ours = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "sealbox-test.pth").write_text(f"import site; site.addsitedir({str(ours)!r})\n{STANDIN}\n{RAY_STANDIN}\n")
    return venv / "bin" / "python"


class ProbeListener:
    """A loopback port the policy does not allow, counting every connection that reaches it."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.port = int(self.socket.getsockname()[1])
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.accepted += 1
            connection.close()

    def close(self) -> None:
        self.socket.close()


@dataclass
class Front:
    process: subprocess.Popen[bytes]
    port: int
    child_port: int
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, object]:
        (engine,) = httpx.get(self.url + "/v1/gateway/status", timeout=10).json()["engines"]
        return engine

    def ready_child(self) -> int | None:
        """The child's pid once the front has it in rotation."""
        try:
            engine = self.status()
        except httpx.HTTPError:
            return None
        return engine["pid"] if engine["healthy"] and engine["pid"] else None  # type: ignore[return-value]

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


def start_front(interpreter: Path, tmp_path: Path, probe: ProbeListener, *, cluster: str = "") -> Front:
    """`sealbox serve` on a vLLM policy; `cluster` adds lines to its `[vllm]` section."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                   "standin_phone_home_port": probe.port}))
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    port, child_port = free_port(), free_port()
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[egress]\nallow_ports = [{port}, {child_port}]\n\n[vllm]\nmodel_dir = "{model}"\n'
                      f'served_name = "{MODEL}"\nport = {child_port}\nmax_num_seqs = 4\nrestart_backoff_s = 0.2\n'
                      f"{cluster}\n[gateway]\nhealth_interval_s = 0.5\n")  # fmt: skip
    stderr = tmp_path / "serve.stderr"
    command = [str(interpreter), "-c", "import sys; from sealbox.cli import main; sys.argv[0] = 'sealbox'; main()",
               "serve", "--root", str(tmp_path / "root"), "--policy", str(policy), "--port", str(port),
               "--no-auth"]  # fmt: skip
    with stderr.open("wb") as sink:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sink, cwd=tmp_path)
    return Front(process, port, child_port, stderr)


@pytest.fixture
def probe() -> Iterator[ProbeListener]:
    listener = ProbeListener()
    yield listener
    listener.close()


def stop(front: Front) -> None:
    if front.process.poll() is None:
        front.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        front.process.wait(timeout=60)
        print(f"stopped in {time.monotonic() - started:.1f} s")


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting for its parent."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def workers(front: Front) -> list[int]:
    """The pids of the worker processes the stand-in children started, in order."""
    return [int(pid) for pid in re.findall(r"standin worker pid (\d+)", front.log())]


def chat(front: Front, *, stream: bool) -> str:
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "Say something."}]
    if not stream:
        return client.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content or ""
    chunks = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def test_the_vllm_child_serves_through_the_front_restarts_when_killed_and_stops_with_sealbox(
    interpreter: Path, tmp_path: Path, probe: ProbeListener
) -> None:
    front = start_front(interpreter, tmp_path, probe)
    try:
        first = wait_for(front.ready_child, "the vLLM child in rotation")
        assert chat(front, stream=False) == ANSWER
        assert chat(front, stream=True) == ANSWER
        with pytest.raises(openai.NotFoundError):  # the front's OpenAI-shaped 404, as for any engine host
            openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0).chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}])

        # The child's own port takes no request without the key made for this run (vLLM's --api-key).
        assert httpx.get(f"http://127.0.0.1:{front.child_port}/v1/models", timeout=10).status_code == 401

        os.kill(first, signal.SIGKILL)  # type: ignore[arg-type]
        second = wait_for(lambda: (pid := front.ready_child()) not in (None, first) and pid, "a restarted child")
        assert front.status()["restarts"] == 1
        assert chat(front, stream=True) == ANSWER
        first_worker, second_worker = workers(front)
        assert not alive(first_worker), "the killed child's worker process was left behind"
        assert alive(second_worker)
    finally:
        stop(front)
    assert not alive(second_worker), "the child's worker outlived sealbox serve"
    # uvicorn ends an orderly shutdown by raising the signal it caught again: -SIGTERM is a clean stop here.
    assert front.process.returncode in (0, -signal.SIGTERM), front.log()
    assert f"vLLM child {second} stopped" in front.log()
    assert not alive(second), "the vLLM child outlived sealbox serve"  # type: ignore[arg-type]
    # One audit record per request, naming the engine and the model directory's digest (config + weights here).
    from sealbox.runtime.vllm.front import local_model_files, model_dir_digest

    served = [fields for event, fields in audit_events(tmp_path / "root") if fields.get("engine_host") == "vllm"]
    assert len(served) == 3
    assert {fields["model_sha256"] for fields in served} == {model_dir_digest(local_model_files(tmp_path / "model"))}


def test_the_egress_guard_runs_in_the_childs_interpreter_and_blocks_its_phone_home(
    interpreter: Path, tmp_path: Path, probe: ProbeListener
) -> None:
    """The stand-in tries a loopback port the policy does not allow at start: nothing reaches it, and the child's
    guard says so (remove the guard from the bootstrap and the probe counts a connection)."""
    front = start_front(interpreter, tmp_path, probe)
    try:
        wait_for(front.ready_child, "the vLLM child in rotation")
        log = front.log()
    finally:
        stop(front)
    assert probe.accepted == 0
    assert "standin phone-home: refused: EgressBlockedError" in log, log
    assert f"blocked socket.connect to 127.0.0.1:{probe.port}" in log, log


def test_a_sealbox_killed_outright_takes_its_vllm_child_with_it(
    interpreter: Path, tmp_path: Path, probe: ProbeListener
) -> None:
    front = start_front(interpreter, tmp_path, probe)
    try:
        child = wait_for(front.ready_child, "the vLLM child in rotation")
    finally:
        front.process.kill()  # no chance to stop the child itself: the parent-death signal must
        front.process.wait(timeout=30)
    try:
        wait_for(lambda: not alive(child), "the orphaned child to end")  # type: ignore[arg-type]
    finally:
        # The child's own workers are vLLM's to end on SIGTERM (and the unit's cgroup's under systemd); the
        # stand-in's sleeping worker is not, so the test ends it rather than leave it behind.
        for worker in workers(front):
            if alive(worker):
                os.kill(worker, signal.SIGKILL)


def test_restarts_back_off_while_the_child_never_becomes_ready_and_reset_once_it_did() -> None:
    from sealbox.runtime.vllm.supervisor import Backoff

    backoff = Backoff(1.0, 5.0)
    assert [backoff.after(was_ready=False) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.after(was_ready=True) == 1.0
    assert backoff.after(was_ready=False) == 2.0


def test_a_symlink_planted_where_vllms_cache_belongs_stops_the_start(
    interpreter: Path, tmp_path: Path, probe: ProbeListener
) -> None:
    """The child writes compiled kernels there: a link would send them (and what reads them back) elsewhere."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "root" / "run").mkdir(parents=True)
    (tmp_path / "root" / "run" / "vllm-cache").symlink_to(elsewhere)
    front = start_front(interpreter, tmp_path, probe)
    assert front.process.wait(timeout=60) != 0
    assert "vllm-cache: vLLM's cache must be a directory of this account; it is a symlink" in front.log(), front.log()
    assert list(elsewhere.iterdir()) == []


def test_a_child_that_never_becomes_ready_is_retried_with_growing_waits_while_the_front_answers_503(
    tmp_path: Path, probe: ProbeListener
) -> None:
    """This project's own interpreter has no `vllm`: each start ends at the import. The front stays up and says so."""
    front = start_front(Path(sys.executable), tmp_path, probe)
    try:
        wait_for(lambda: "starting it again in 0.8 s" in front.log(), "three failed starts")
        log = front.log()
        assert log.index("starting it again in 0.2 s") < log.index("in 0.4 s") < log.index("in 0.8 s")
        assert "No module named 'vllm'" in log
        with pytest.raises(openai.APIStatusError) as refused:
            chat(front, stream=False)
        assert refused.value.status_code == 503
        assert refused.value.body["code"] == "engines_unavailable"  # type: ignore[index]
        assert httpx.get(front.url + "/ready", timeout=10).status_code == 503
    finally:
        stop(front)


def pids_of(front: Front, label: str) -> list[int]:
    """The pids the supervisor logged starting for `label` ("Ray head", "vLLM child"), in order."""
    return [int(pid) for pid in re.findall(rf"{label} started \(pid (\d+)", front.log())]


def test_on_a_head_node_the_ray_head_runs_before_vllm_is_restarted_with_it_and_stops_after_it(
    interpreter: Path, tmp_path: Path, probe: ProbeListener
) -> None:
    ray_port = free_port()
    cluster = f'node_ip = "{HEAD_ADDRESS}"\nray_head = "{HEAD_ADDRESS}:{ray_port}"\nray_port = {ray_port}\n'
    front = start_front(interpreter, tmp_path, probe, cluster=cluster)
    try:
        first = wait_for(front.ready_child, "the vLLM child in rotation")
        log = front.log()
        (ray_started,) = re.findall(r"standin ray: started (\{.*\})", log)
        assert json.loads(ray_started)["argv"][:4] == ["start", "--head", "--port", str(ray_port)]
        assert json.loads(ray_started)["env"]["HF_HUB_OFFLINE"] == "1"  # the launch's offline environment
        # Ray's GCS listened before vLLM was started at all.
        assert log.index(f"standin ray: head listening on {HEAD_ADDRESS}:{ray_port}") < log.index("vLLM child started")
        (ray_first,) = pids_of(front, "Ray head")

        os.kill(ray_first, signal.SIGKILL)
        second = wait_for(lambda: (pid := front.ready_child()) not in (None, first) and pid, "vLLM after the Ray head")
        log = front.log()
        ray_first_again, ray_second = pids_of(front, "Ray head")
        assert ray_first_again == ray_first and alive(ray_second)
        assert f"Ray head {ray_first} exited with -9" in log
        assert not alive(first), "vLLM outlived the cluster it ran on"  # type: ignore[arg-type]
        # The second vLLM was started only once the second Ray head listened.
        assert log.index("vLLM child started", log.index(f"vLLM child {first} exited")) > log.rindex(
            "standin ray: head listening")
        assert chat(front, stream=False) == ANSWER
    finally:
        stop(front)
        for worker in workers(front):
            if alive(worker):
                os.kill(worker, signal.SIGKILL)
    log = front.log()
    assert front.process.returncode in (0, -signal.SIGTERM), log
    assert log.index(f"vLLM child {second} stopped") < log.index(f"Ray head {ray_second} stopped"), log
    assert not alive(ray_second), "the Ray head outlived sealbox serve"


def test_a_listener_counts_only_on_its_own_address_and_port_or_the_wildcard() -> None:
    """The supervisor's readiness check for the Ray head, read from the kernel's tables."""
    from sealbox.runtime.vllm.listening import is_listening

    with socket.create_server((HEAD_ADDRESS, 0)) as server:
        port = int(server.getsockname()[1])
        assert is_listening(HEAD_ADDRESS, port)
        assert not is_listening("127.0.0.8", port)
        with socket.socket() as bound_only:  # bound, never listening: no connection would be accepted
            bound_only.bind((HEAD_ADDRESS, 0))
            assert not is_listening(HEAD_ADDRESS, int(bound_only.getsockname()[1]))
    assert not is_listening(HEAD_ADDRESS, port)
    with socket.create_server(("0.0.0.0", 0)) as anywhere:
        assert is_listening(HEAD_ADDRESS, int(anywhere.getsockname()[1]))
