"""A real `sealbox serve` process on a loopback port, for tests that drive it with the official `openai` client.

The server binds its port before it loads models and prints "sealbox serving" on stderr once they are up, so when
`ServerProcess.start` has read that line, connections are accepted (no polling, no sleeps). Its stderr is kept for
failure messages.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from sealbox.runtime.staging_server import free_loopback_port as free_port
from sealbox.runtime.staging_server import stop_child, wait_for_ready_line

if TYPE_CHECKING:
    import httpx
    import openai

REPO = Path(__file__).resolve().parents[1]
SEALBOX = [sys.executable, "-c", "from sealbox.cli import main; main()"]


def sealbox(*args: str, root: Path | None = None, env: dict[str, str] | None = None,
            input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run a `sealbox` command in a child process (the real CLI, its own exit code)."""
    command = [*SEALBOX, *args] + (["--root", str(root)] if root is not None else [])
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, input=input, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"sealbox {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def create_api_key(root: Path, name: str, purpose: str = "testing") -> str:
    return sealbox("keys", "api", "create", name, "--purpose", purpose, root=root).stdout.strip()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's appliance root (its server's keys, state and audit log); a test module imports it to share it."""
    return tmp_path_factory.mktemp("appliance")


@pytest.fixture(scope="module")
def api_key(root: Path) -> str:
    """An API key on the module's root, for the module's clients."""
    return create_api_key(root, "tester")


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, root: Path, api_key: str, tiny_model: Path,
           embedding_model: Path) -> Iterator[ServerProcess]:  # fmt: skip
    """The module's server: the tiny and the embedding model under the module's `POLICY`, on its root."""
    with ServerProcess(root, models=[tiny_model, embedding_model], policy_text=request.module.POLICY) as process:
        yield process


@dataclass
class ServerProcess:
    root: Path
    models: list[Path] = field(default_factory=list)
    policy: Path | None = None
    policy_text: str | None = None
    """A policy's TOML, written to `<root>/policy.toml` and served with (instead of a `policy` file)."""
    no_auth: bool = False
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    """llama.cpp threads: one, because on a 2-core machine running the tests too, a second spinning thread makes
    decoding 10-50x slower."""
    executable: list[str] = field(default_factory=lambda: list(SEALBOX))
    """The `sealbox` to run: this checkout's by default, or an installed release's `venv/bin/sealbox`."""
    host: str = "127.0.0.1"
    """`--host`: another address only inside a network namespace the test made (`executable` runs `unshare`)."""
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[str] | None = None
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def audit(self) -> Path:
        """The server's audit log directory under its root."""
        return self.root / "audit"

    def command(self) -> list[str]:
        command = [*self.executable, "serve", "--root", str(self.root), "--host", self.host, "--port", str(self.port),
                   "--threads", str(self.threads)]  # fmt: skip
        for model in self.models:
            command += ["--model", str(model)]
        if self.policy is not None:
            command += ["--policy", str(self.policy)]
        if self.no_auth:
            command.append("--no-auth")
        return command + self.extra_args

    def start(self, timeout_s: float = 120) -> ServerProcess:
        if self.policy_text is not None:
            self.policy = self.root / "policy.toml"
            self.policy.write_text(self.policy_text)
        env = {**os.environ, **self.env}
        self.process = subprocess.Popen(
            self.command(), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        if not wait_for_ready_line(self.process, self.stderr_lines, timeout_s):
            self.stop()
            raise RuntimeError(f"sealbox serve did not start:\n{self.stderr}")
        return self

    def run_to_exit(self, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a server that is expected to refuse to start; returns its exit code and stderr."""
        return subprocess.run(self.command(), cwd=REPO, env={**os.environ, **self.env}, capture_output=True,
                              text=True, timeout=timeout_s)  # fmt: skip

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        stop_child(self.process, timeout_s=30)
        return self.process.returncode

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class KeyedServer:
    """A running server and an API key for it, with the clients a test drives it with."""

    server: ServerProcess
    key: str

    @property
    def audit(self) -> Path:
        return self.server.audit

    def client(self) -> openai.OpenAI:
        import openai

        return openai.OpenAI(base_url=self.server.base_url, api_key=self.key, max_retries=0)

    def http(self, **headers: str) -> httpx.Client:
        import httpx

        return httpx.Client(base_url=self.server.url, timeout=60,
                            headers={"Authorization": f"Bearer {self.key}", **headers})  # fmt: skip
