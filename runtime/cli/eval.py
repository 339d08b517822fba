"""`sealbox eval`: the live release's evaluation suite, run on demand (a scheduled check for drift of the host itself).

The suite runs against a private staging server of the `current` release (its interpreter, models and policy, on
loopback with a throw-away key), not against the service: clients are neither slowed nor seen. The result is recorded in
the audit log (`eval.run`) and kept as `<root>/run/evaluation.json` for the doctor; the exit code is 0 only if it passed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sealbox.runtime.evaluation import LAST_RUN_FILE, SUITE_FILE, EvalClient, Suite, SuiteError, run_suite
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.server.model_registry import ActiveRelease, ReleaseError
from sealbox.runtime.exit_codes import ExitCode
from sealbox.runtime.staging_server import StagingServer, StagingServerError, release_python

_err = Console(stderr=True)
_out = Console()


def _record(host: HostRoot, release: ActiveRelease, fields: dict[str, object]) -> None:
    from sealbox.runtime.audit.log import AuditLog
    from sealbox.runtime.policy import Policy

    policy = Policy.load(release.policy_path) if release.policy_path.is_file() else Policy.default()
    log = AuditLog.open(host.audit, policy.audit, retention=False)
    try:
        log.append("eval.run", release=release.label, name=release.name, version=release.version, **fields)
    finally:
        log.close()


def eval_command(
    root: Annotated[Path | None, typer.Option("--root", help="Appliance root (default: $SEALBOX_ROOT, /var/lib/sealbox as root).")] = None,
    suite_file: Annotated[Path | None, typer.Option("--suite", help="Another suite (TOML/JSON) instead of the release's.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="llama.cpp threads of the staging server.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Run the live release's evaluation suite against it in a private staging server; exit 32 (ExitCode.EVALUATION_FAILED) if it fails."""
    host = HostRoot.resolve(root)
    try:
        release = ActiveRelease.load(host)
        suite = Suite.load(suite_file or release.directory / SUITE_FILE)
        with tempfile.TemporaryDirectory(prefix="sealbox-eval-") as work:
            server = StagingServer(python=release_python(release.directory),
                                   models={model.name: model.path for model in release.models},
                                   policy_text=release.policy_path.read_text(encoding="utf-8"), work=Path(work),
                                   threads=threads or suite.staging.threads,
                                   start_timeout_s=suite.staging.start_timeout_s)  # fmt: skip
            with server:
                result = run_suite(suite, EvalClient(server.base_url, server.api_key))
    except (ReleaseError, SuiteError, StagingServerError, OSError) as exc:
        _err.print(f"[bold red]sealbox eval:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(ExitCode.FAILED) from exc
    status = "passed" if result.passed else "failed"
    stored = {"status": status, "release": release.label, **result.to_dict()}
    host.run.mkdir(parents=True, exist_ok=True)
    (host.run / LAST_RUN_FILE).write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _record(host, release, result.audit_fields())
    if as_json:
        typer.echo(json.dumps(stored))
    else:
        table = Table("case", "model", "result", "score", "latency ms", "tokens/s", "checks")
        for case in result.cases:
            checks = " ".join(f"{name}:{'ok' if ok else 'FAIL'}" for name, ok in case.checks.items())
            table.add_row(escape(case.name), escape(case.model), "pass" if case.passed else "FAIL", f"{case.score:.2f}",
                          f"{case.latency_ms:.0f}", f"{case.tokens_per_s:.1f}", escape(checks + (f" {case.error}" if case.error else "")))  # fmt: skip
        _out.print(table)
        typer.echo(f"{release.label}: {result.summary()}")
    if not result.passed:
        raise typer.Exit(ExitCode.EVALUATION_FAILED)
