"""`sealbox bundle install | list | rollback | gc`: the isolated host's side of `bundle`, loaded by `bundle_app` when named.

Refusals print one line and exit with their class's code (20-29 for install, see `bundler.errors`); `--json` puts the
result or the refusal on stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sealbox.bundler.audit_trail import AuditTrailError
from sealbox.bundler.cli.progress import stderr_progress
from sealbox.bundler.delta import DeltaBaseError
from sealbox.bundler.errors import BundleError
from sealbox.bundler.evaluation_gate import staged_results
from sealbox.bundler.install import InstallRequest, install_bundle
from sealbox.bundler.mesh_keys import install_mesh_keys
from sealbox.bundler.offline_venv import VenvError
from sealbox.bundler.releases import ReleaseError, Releases, policy_in_force
from sealbox.bundler.service_files import ServiceFileError, enable
from sealbox.bundler.trust import TrustStore, TrustStoreError
from sealbox.runtime.evaluation import evaluation_text, read_result
from sealbox.runtime.cli.refusal import refuse
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.mesh.host_identity import MeshIdentityError
from sealbox.runtime.policy import PolicyError
from sealbox.runtime.sizes import format_size

_out = Console()
_HANDLED = (BundleError, TrustStoreError, VenvError, ServiceFileError, ReleaseError, AuditTrailError, PolicyError,
            MeshIdentityError, OSError)  # fmt: skip

RootOption = Annotated[
    Path | None, typer.Option("--root", help="Appliance root (default: $SEALBOX_ROOT, /var/lib/sealbox as root).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result (or the refusal) as JSON on stdout.")]


@contextmanager
def _refusals(as_json: bool) -> Iterator[None]:
    try:
        yield
    except _HANDLED as exc:
        code = getattr(exc, "exit_code", 1)
        if as_json:
            data: dict[str, Any] = {"ok": False, "error": type(exc).__name__, "exit_code": code, "message": str(exc)}
            if isinstance(exc, DeltaBaseError):
                data["missing"] = [item.to_dict() for item in exc.missing]
            typer.echo(json.dumps(data))
        raise refuse(exc, code) from exc


@contextmanager
def _locked_releases(host: HostRoot, as_json: bool) -> Iterator[Releases]:
    """The host's releases under their lock, for one change (rollback, gc); a refusal becomes the exit code."""
    with _refusals(as_json):
        releases = Releases(host)
        with releases.lock():
            yield releases


def _ask(question: str) -> bool:
    try:
        return typer.confirm(question, default=False, err=True)
    except (click.Abort, typer.Abort, EOFError):  # nothing to answer on: declined (a script must say --yes)
        return False


def _ask_on_terminal(question: str) -> bool:
    """Skipping the evaluation gate is asked of a person: without a terminal it is refused (a script says --yes)."""
    if not sys.stdin.isatty():
        return False
    return _ask(question)


def install(
    directory: Annotated[Path, typer.Argument(help="The bundle directory (as copied from the medium).")],
    root: RootOption = None,
    allow_downgrade: Annotated[
        bool, typer.Option("--allow-downgrade", help="Install a version not above the installed one (asks; recorded).")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Answer yes to the downgrade and skip-eval questions (for scripts).")] = False,
    replace_name: Annotated[
        bool,
        typer.Option(
            "--replace-name",
            help="Install a bundle under another name than the one this appliance runs (always asked, never by "
            "--yes; recorded).",
        ),
    ] = False,
    skip_eval: Annotated[
        bool, typer.Option("--skip-eval", help="Go live without running the bundle's evaluation suite (asks; recorded).")
    ] = False,
    enable_service: Annotated[
        bool, typer.Option("--enable", help="Also load the egress rules and enable and start the service (root).")
    ] = False,
    mesh_host: Annotated[
        str | None, typer.Option("--mesh-host", help="This host's name in the policy's [mesh] (walls for its peers).")
    ] = None,
    mesh_keys: Annotated[
        Path | None, typer.Option("--mesh-keys", help="This host's key package from `sealbox keys mesh create`.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Verify a bundle against <root>/trust and make it the live release (atomic; a crash leaves the old one live)."""
    host = HostRoot.resolve(root)
    with _refusals(as_json):
        request = InstallRequest(
            bundle=directory,
            root=host,
            allow_downgrade=allow_downgrade,
            confirm=(lambda _q: True) if yes else _ask,
            replace_name=replace_name,
            confirm_name=_ask,
            skip_eval=skip_eval,
            confirm_skip_eval=(lambda _q: True) if yes else _ask_on_terminal,
            mesh_host=mesh_host,
            mesh_keys=mesh_keys,
        )
        with stderr_progress() as progress:
            result = install_bundle(request, progress)
        if mesh_keys is not None:
            install_mesh_keys(mesh_keys, result.release.policy(), mesh_host)
        commands = enable(host.path) if enable_service else []
    if as_json:
        typer.echo(json.dumps(result.to_dict() | {"enabled": commands}))
        return
    release = result.release
    verb = "activated" if result.activated else "already current:"
    typer.echo(f"{verb} {release.label} (manifest {result.manifest_sha256[:16]}) in {result.seconds:.1f} s")
    typer.echo(
        f"  {result.blobs_copied} blob(s) copied ({format_size(result.bytes_copied)}), "
        f"{result.blobs_present} already in the store; previous: {result.previous or 'none'}"
    )
    if result.downgrade:
        typer.echo("  DOWNGRADE (confirmed and recorded in the audit log)")
    if result.resumed:
        typer.echo("  the release was already on disk (an interrupted install, or an older release): activated it")
    for note in result.notes:
        typer.echo(f"  note: {note}")
    if result.gc and (result.gc.releases_removed or result.gc.blobs_removed):
        typer.echo(
            f"  gc: removed {', '.join(result.gc.releases_removed) or 'no releases'}, "
            f"{len(result.gc.blobs_removed)} blob(s), {format_size(result.gc.bytes_freed)}"
        )
    if commands:
        typer.echo("  enabled: " + "; ".join(commands))
    else:
        typer.echo(f"  service files (not enabled): {release.directory / 'service'}")


def list_releases(root: RootOption = None, as_json: JsonOption = False) -> None:
    """Show the installed releases, oldest first; `*` marks the live one."""
    host = HostRoot.resolve(root)
    with _refusals(as_json):
        releases = Releases(host)
        items, current = releases.all(), releases.current()
    live = current.label if current else None
    staged = staged_results(host)
    if as_json:
        rows = [
            {
                "release": r.label,
                "current": r.label == live,
                **r.release.to_dict(),
                "installed_at": r.install.installed_at,
                "manifest_sha256": r.install.manifest_sha256,
                "downgrade": r.install.downgrade,
                "evaluation": read_result(r.directory),
            }
            for r in items
        ]
        held = [{"release": label, "evaluation": result} for label, result in staged]
        typer.echo(json.dumps({"current": live, "releases": rows, "staged": held}))
        return
    if not items and not staged:
        typer.echo(f"no releases in {host.releases}")
        return
    table = Table("", "release", "version", "installed", "models", "manifest", "evaluation")
    for r in items:
        models = ", ".join(m.name for m in r.release.models) or "-"
        table.add_row("*" if r.label == live else "", escape(r.label), str(r.release.version),
                      r.install.installed_at[:19], escape(models), r.install.manifest_sha256[:16],
                      escape(evaluation_text(read_result(r.directory))))  # fmt: skip
    for label, result in staged:
        table.add_row("", escape(label), "", "staged, not live", "", str(result.get("manifest_sha256", ""))[:16],
                      escape(evaluation_text(result)))  # fmt: skip
    _out.print(table)


def rollback(
    release: Annotated[str | None, typer.Argument(help="Release to go back to (default: the one before current).")] = None,
    root: RootOption = None,
    allow_untrusted: Annotated[
        bool,
        typer.Option(
            "--allow-untrusted",
            help="Go back to a release the trust store no longer accepts (a removed key signed it); recorded.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Switch `current` back to an earlier release that the trust store accepts (atomic; recorded in the audit log)."""
    host = HostRoot.resolve(root)
    with _locked_releases(host, as_json) as releases:
        trust = TrustStore(host).policy()
        before, after = releases.rollback(release, trust=trust, allow_untrusted=allow_untrusted)
    if as_json:
        typer.echo(json.dumps({"ok": True, "from": before.label if before else None, "to": after.label}))
        return
    typer.echo(f"rolled back: current is now {after.label} (was {before.label if before else 'none'})")


def gc(
    root: RootOption = None,
    keep: Annotated[int | None, typer.Option("--keep", min=1, help="Releases to keep (default: policy releases.keep).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Remove releases beyond the last N (never the current one) and store blobs no kept release uses."""
    host = HostRoot.resolve(root)
    with _locked_releases(host, as_json) as releases:
        count = keep if keep is not None else policy_in_force(host).releases.keep
        result = releases.gc(count)
    if as_json:
        typer.echo(json.dumps({"ok": True, "keep": count, **result.to_dict()}))
        return
    typer.echo(
        f"kept the last {count} release(s); removed {', '.join(result.releases_removed) or 'no releases'}, "
        f"{len(result.blobs_removed)} blob(s) ({format_size(result.bytes_freed)})"
    )
