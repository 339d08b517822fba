"""`sealbox gateway`: translates the command's options into `GatewayOptions` and refusals into exit codes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sealbox.runtime.cli.serve import run_prepared
from sealbox.runtime.gateway.startup import GatewayOptions, prepare_gateway


def gateway(
    root: Annotated[Path | None, typer.Option("--root", help="Gateway root: its API keys and audit log (default: $SEALBOX_ROOT).")] = None,
    policy_file: Annotated[Path | None, typer.Option("--policy", help="Policy TOML whose gateway section names the engine hosts.")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Listen address (default: the policy's gateway.host).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Listen port (default: the policy's gateway.port).")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve without API keys; only on a loopback address.")] = False,
    no_audit: Annotated[bool, typer.Option("--no-audit", help="Development only: keep no audit log.")] = False,
) -> None:
    """Front several engine hosts (each a `sealbox serve`) with one API: keys, fairness, audit, routing by load."""
    options = GatewayOptions(root=root, policy_file=policy_file, host=host, port=port, no_auth=no_auth,
                             no_audit=no_audit)  # fmt: skip
    run_prepared(lambda: prepare_gateway(options), command="sealbox gateway")
