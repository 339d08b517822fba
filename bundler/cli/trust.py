"""`sealbox trust add | list | remove | threshold`: the isolated host's trusted publisher keys, changed by hand, offline."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sealbox.bundler.audit_trail import AuditTrailError
from sealbox.bundler.trust import TrustedKey, TrustStore, TrustStoreError
from sealbox.runtime.cli.refusal import refuse
from sealbox.runtime.hostroot import HostRoot

trust_app = typer.Typer(help="Publisher keys this host trusts to sign bundles, and how many must sign.", no_args_is_help=True)
_out = Console()

RootOption = Annotated[
    Path | None,
    typer.Option("--root", help="Appliance root (default: $SEALBOX_ROOT, /var/lib/sealbox as root); keys in <root>/trust."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _store(root: Path | None) -> TrustStore:
    return TrustStore(HostRoot.resolve(root))


def _refused(exc: TrustStoreError | AuditTrailError) -> typer.Exit:
    return refuse(exc)


def _change(change: Callable[[TrustStore], TrustedKey], *, root: Path | None, as_json: bool, done: str) -> None:
    """Add or remove one key (recorded in the audit trail) and print the key it was about: `<done> key <id> (<name>)`."""
    try:
        changed = change(_store(root))
    except (TrustStoreError, AuditTrailError) as exc:
        raise _refused(exc) from exc
    if as_json:
        typer.echo(json.dumps(changed.to_dict()))
        return
    typer.echo(f"{done} key {changed.key_id} ({changed.name})")


@trust_app.command("add")
def add(
    public_key: Annotated[Path, typer.Argument(help="The publisher's public key file (.pub).")],
    name: Annotated[str | None, typer.Option("--name", help="A name for the key (default: the file name).")] = None,
    root: RootOption = None,
    as_json: JsonOption = False,
) -> None:
    """Trust a publisher key. Compare its key id with the publisher's out of band before adding it."""
    _change(lambda store: store.add(public_key, name=name), root=root, as_json=as_json, done="trusted")


@trust_app.command("list")
def list_keys(root: RootOption = None, as_json: JsonOption = False) -> None:
    """Show the trusted keys and the signature threshold."""
    store = _store(root)
    try:
        keys, threshold = store.keys(), store.threshold()
    except TrustStoreError as exc:
        raise _refused(exc) from exc
    if as_json:
        typer.echo(json.dumps({"threshold": threshold, "keys": [item.to_dict() for item in keys]}))
        return
    if not keys:
        typer.echo(f"no trusted keys in {store.directory}; add one with `sealbox trust add PUB`")
        return
    table = Table("key id", "name", "added")
    for item in keys:
        table.add_row(item.key_id, escape(item.name), item.added)
    _out.print(table)
    typer.echo(f"threshold: {threshold} of {len(keys)} trusted keys must sign")


@trust_app.command("remove")
def remove(
    key: Annotated[str, typer.Argument(help="Key id (or a unique prefix) or name.")],
    root: RootOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop trusting a key; bundles signed only by it no longer install."""
    _change(lambda store: store.remove(key), root=root, as_json=as_json, done="removed")


@trust_app.command("threshold")
def threshold(
    count: Annotated[int | None, typer.Argument(help="Distinct trusted keys that must sign (omit to show it).")] = None,
    root: RootOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show or set how many distinct trusted keys must sign a bundle (2 = two-person rule)."""
    store = _store(root)
    try:
        value = store.threshold() if count is None else store.set_threshold(count)
    except (TrustStoreError, AuditTrailError) as exc:
        raise _refused(exc) from exc
    if as_json:
        typer.echo(json.dumps({"threshold": value}))
        return
    typer.echo(f"threshold: {value}")
