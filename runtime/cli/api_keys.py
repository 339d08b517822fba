"""`sealbox keys api`: the API keys clients present; each names a principal and a default purpose for the audit log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sealbox.runtime.api_keys import ApiKeyError, ApiKeyStore
from sealbox.runtime.cli.refusal import refuse
from sealbox.runtime.hostroot import HostRoot

api_app = typer.Typer(help="API keys for `sealbox serve` (only their hashes are stored).", no_args_is_help=True)
_err = Console(stderr=True)

RootOption = Annotated[
    Path | None, typer.Option("--root", help="Appliance root (default: $SEALBOX_ROOT, /var/lib/sealbox as root).")
]


def _store(root: Path | None) -> ApiKeyStore:
    return ApiKeyStore(HostRoot.resolve(root).api_keys)


@api_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Principal the audit log names for this key's requests.")],
    purpose: Annotated[str, typer.Option("--purpose", help="Default purpose of processing, recorded per request.")] = "unspecified",
    root: RootOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the key and its entry as JSON.")] = False,
) -> None:
    """Create a key and print it once: it is not stored and cannot be shown again."""
    try:
        entry, secret = _store(root).create(name, purpose=purpose)
    except ApiKeyError as exc:
        raise refuse(exc) from exc
    if as_json:
        typer.echo(json.dumps({"name": entry.name, "purpose": entry.purpose, "key": secret}))
        return
    _err.print(f"API key for [bold]{escape(entry.name)}[/] (purpose: {escape(entry.purpose)}); "
               "shown once, store it now:", highlight=False)  # fmt: skip
    typer.echo(secret)


@api_app.command("list")
def list_keys(
    root: RootOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the entries as JSON.")] = False,
) -> None:
    """List keys: name, purpose, when created and revoked. No secret is shown (none is stored)."""
    try:
        keys = _store(root).load()
    except ApiKeyError as exc:
        raise refuse(exc) from exc
    if as_json:
        typer.echo(json.dumps([{"name": k.name, "purpose": k.purpose, "created_at": k.created_at,
                                "revoked_at": k.revoked_at} for k in keys]))  # fmt: skip
        return
    table = Table(title="API keys")
    for column in ("name", "purpose", "created", "state"):
        table.add_column(column)
    for key in keys:
        table.add_row(escape(key.name), escape(key.purpose), key.created_at,
                      "active" if key.active else f"revoked {key.revoked_at}")  # fmt: skip
    Console().print(table)


@api_app.command("revoke")
def revoke(name: Annotated[str, typer.Argument(help="The key's name.")], root: RootOption = None) -> None:
    """Revoke a key: a running server refuses it from its next request on."""
    try:
        entry = _store(root).revoke(name)
    except ApiKeyError as exc:
        raise refuse(exc) from exc
    _err.print(f"revoked {escape(entry.name)} at {entry.revoked_at}", highlight=False)
