"""A private `sealbox serve` child for evaluating a release that is not live: loopback, a free port, its own root.

The child runs the release's own interpreter (its offline venv when it has one) on the release's models and policy, but
under a throw-away root: its API key exists only for this evaluation, its audit log and state stay out of the
appliance's, and TLS is off (the client is this process, on loopback). It binds its port before loading the models and
prints "sealbox serving" once they are up, so reading that line on stderr is the readiness signal (no polling).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

READY_LINE = "sealbox serving"
STOP_TIMEOUT_S = 30
PORT_ATTEMPTS = 3


class StagingServerError(Exception):
    """The staging server did not start (its stderr's tail is in the message)."""


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_ready_line(process: subprocess.Popen[str], lines: list[str], timeout_s: float) -> bool:
    """Whether a `sealbox serve` child printed READY_LINE within `timeout_s` and still runs; its stderr goes into `lines`
    (a thread reads it to the end). Woken by the line or by the end of stderr, as only the line means serving: a
    process whose stderr has just closed may not have been reaped yet, so `poll()` alone would call it alive."""
    assert process.stderr is not None
    done = threading.Event()
    serving = threading.Event()

    def read() -> None:
        for line in process.stderr:  # type: ignore[union-attr]
            lines.append(line)
            if READY_LINE in line:
                serving.set()
                done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    done.wait(timeout_s)
    return serving.is_set() and process.poll() is None


def stop_child(process: subprocess.Popen[str], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM (the server's orderly stop), then SIGKILL when it has not exited within `timeout_s`."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def staging_policy_toml(policy_text: str) -> str:
    """The release's policy with TLS off (the only client is the evaluator, on loopback) and one sequence (cases run
    one at a time, and the live server may hold most of the memory meanwhile); everything else as shipped."""
    data = tomllib.loads(policy_text)
    server = data.setdefault("server", {})
    server["tls_cert"] = ""
    server["tls_key"] = ""
    server["tls_client_ca"] = ""
    data.setdefault("limits", {})["max_sequences"] = 1
    lines = []
    for section, values in data.items():
        if not isinstance(values, dict):
            lines.append(f"{json.dumps(section)} = {_toml_value(values)}")
            continue
        lines.append(f"[{json.dumps(section)}]")
        lines += [f"{json.dumps(key)} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    """A TOML value for what a policy holds: strings, numbers, booleans, arrays, and tables (written inline)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(key)} = {_toml_value(item)}" for key, item in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(value)  # a JSON string, number or boolean is the same TOML value


@dataclass
class StagingServer:
    python: Path
    """The interpreter whose sealbox serves: the release's `venv/bin/python`, else this one."""
    models: dict[str, Path]
    """Model name (what clients ask for) → GGUF file."""
    policy_text: str
    work: Path
    """An empty directory of the caller's; the throw-away root lives in it."""
    threads: int | None = None
    start_timeout_s: float = 300
    port: int = 0
    api_key: str = ""
    process: subprocess.Popen[str] | None = None
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def stderr_tail(self) -> str:
        return "".join(self.stderr_lines[-15:]).strip()

    def _prepare(self) -> list[str]:
        from sealbox.runtime.api_keys import ApiKeyStore

        root = self.work / "root"
        models = self.work / "models"
        root.mkdir(mode=0o700)
        models.mkdir()
        _, self.api_key = ApiKeyStore(root / "api-keys.json").create("sealbox-eval", purpose="release evaluation")
        policy = self.work / "policy.toml"
        policy.write_text(staging_policy_toml(self.policy_text), encoding="utf-8")
        command = [str(self.python), "-P", "-c", "from sealbox.cli import main; main()", "serve", "--root", str(root),
                   "--host", "127.0.0.1", "--policy", str(policy)]  # fmt: skip
        for name, path in sorted(self.models.items()):
            link = models / f"{name}.gguf"  # the name clients ask for is the file's stem
            link.symlink_to(path.absolute())
            command += ["--model", str(link)]
        if self.threads is not None:
            command += ["--threads", str(self.threads)]
        return command

    def start(self) -> StagingServer:
        """Raises StagingServerError when the child exits or is not serving within `start_timeout_s`."""
        command = self._prepare()
        env = {key: value for key, value in os.environ.items() if key not in ("SEALBOX_ROOT", "PYTHONPATH")}
        for attempt in range(PORT_ATTEMPTS):  # a free port can be taken between the probe and the child's bind
            self.port = free_loopback_port()
            self.stderr_lines = []
            self.process = subprocess.Popen([*command, "--port", str(self.port)], stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                            cwd=self.work, start_new_session=True)  # fmt: skip
            if wait_for_ready_line(self.process, self.stderr_lines, self.start_timeout_s):
                return self
            self.stop()
            if "Address already in use" not in self.stderr_tail or attempt == PORT_ATTEMPTS - 1:
                break
        raise StagingServerError(f"the staging server did not start:\n{self.stderr_tail}")

    def stop(self) -> None:
        if self.process is not None:
            stop_child(self.process)

    def __enter__(self) -> StagingServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def release_python(release_dir: Path) -> Path:
    """The release's own interpreter when it carries a venv (its sealbox and llama.cpp build), else this one."""
    venv_python = release_dir / "venv" / "bin" / "python"
    return venv_python if venv_python.exists() else Path(sys.executable)
