"""`sealbox serve`: translates the command's options into `ServeOptions` and the start's refusals into exit codes.

The start itself (guard first, then doctor, keys, audit log, models, socket) is `sealbox.runtime.server.startup`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Protocol

import typer
from rich.console import Console
from rich.markup import escape

from sealbox.runtime.cli.refusal import refuse
from sealbox.runtime.server.startup import ServeOptions, ServeRefused, prepare

_err = Console(stderr=True)


def serve(
    root: Annotated[Path | None, typer.Option("--root", help="Appliance root (default: $SEALBOX_ROOT, /var/lib/sealbox as root).")] = None,
    model: Annotated[list[str], typer.Option("--model", help="Serve this local GGUF instead of the release's models (development); repeatable.")] = [],
    policy_file: Annotated[Path | None, typer.Option("--policy", help="Policy TOML (default: the release's, else the built-in one).")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Listen address (default: the policy's, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Listen port (default: the policy's, 8080).")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve without API keys; only on a loopback address.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse to start when `sealbox doctor` finds any failure.")] = False,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for llama.cpp (default: all).")] = None,
    no_audit: Annotated[bool, typer.Option("--no-audit", help="Development only: keep no audit log (refused with --strict).")] = False,
) -> None:
    """Serve the active release's models on an OpenAI-compatible API, with auth, admission control and an audit log."""
    options = ServeOptions(root=root, models=tuple(model), policy_file=policy_file, host=host, port=port,
                           no_auth=no_auth, strict=strict, threads=threads, no_audit=no_audit)  # fmt: skip
    run_prepared(lambda: prepare(options), command="sealbox serve")


class Prepared(Protocol):
    report: Callable[[str], None]

    def run(self) -> None: ...


def run_prepared(prepare_start: Callable[[], Prepared], *, command: str) -> None:
    """Check and open what the start needs, report on stderr, serve until a signal; a refusal at any step becomes the
    command's message and exit code (`sealbox serve` and `sealbox gateway` alike)."""
    try:
        prepared = prepare_start()
        prepared.report = lambda line: _err.print(escape(line), highlight=False, soft_wrap=True)
        prepared.run()
    except ServeRefused as exc:
        raise refuse(exc, command=command) from exc
