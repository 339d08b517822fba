"""`sealbox doctor`: the appliance self-check as a report for a compliance officer, or JSON for machines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sealbox.runtime.doctor import Appliance, CheckStatus, DoctorReport, run_doctor
from sealbox.runtime.egress.guard import install_egress_guard
from sealbox.runtime.mesh.checkup import probe_egress
from sealbox.runtime.egress.offline_env import apply_offline_environment
from sealbox.runtime.exit_codes import ExitCode
from sealbox.runtime.hostroot import HostRoot

_STYLE = {
    CheckStatus.PASS: "[bold green]PASS[/]",
    CheckStatus.WARN: "[bold yellow]WARN[/]",
    CheckStatus.FAIL: "[bold red]FAIL[/]",
    CheckStatus.UNKNOWN: "[bold blue]UNKNOWN[/]",
}


def doctor(
    root: Annotated[Path | None, typer.Option("--root", help="Appliance root (default: $SEALBOX_ROOT, /var/lib/sealbox as root).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when any check fails.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check the installed appliance: release, signatures, models, audit chain, egress lockdown, GPU, mesh keys and
    peers. Sends packets only to the peers the policy's [mesh] names."""
    # The same order as `serve`: offline variables, then the guard with the release's allowlist, then the work.
    apply_offline_environment()
    host = HostRoot.resolve(root)
    install_egress_guard(probe_egress(Appliance(host).policy))  # the mesh peers the mesh-peers check talks to
    report = run_doctor(host)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        render(report, Console())
    if strict and not report.ok:
        raise typer.Exit(ExitCode.FAILED)


def render(report: DoctorReport, console: Console) -> None:
    table = Table(title=f"sealbox doctor — {escape(report.root)} — {report.created_at}", show_lines=True, expand=True)
    table.add_column("Check", no_wrap=True)
    table.add_column("Status", no_wrap=True)
    table.add_column("Finding")
    for check in report.checks:
        finding = escape(check.summary)
        if check.details:
            finding += "\n" + "\n".join(f"[dim]• {escape(line)}[/]" for line in check.details)
        table.add_row(check.title, _STYLE[check.status], finding)
    console.print(table)
    counts = {status: sum(c.status is status for c in report.checks) for status in CheckStatus}
    tally = ", ".join(f"{counts[s]} {s.value}" for s in CheckStatus)
    verdict = "[bold green]no failures[/]" if report.ok else f"[bold red]{len(report.failures)} failure(s)[/]"
    console.print(f"{verdict} ({tally})")

