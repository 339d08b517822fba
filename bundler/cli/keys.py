"""`sealbox keys`: make publisher key pairs; passphrases come from the environment or a prompt, never an argument."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from securesystemslib.signer import CryptoSigner

from sealbox.bundler.errors import KeyFileError
from sealbox.bundler.keys import PASSPHRASE_ENV, generate_key_pair, load_signer, private_key_is_encrypted
from sealbox.runtime.cli.lazy_group import lazy_group
from sealbox.runtime.cli.refusal import refuse

keys_app = typer.Typer(
    help="Publisher keys (Ed25519) that sign bundles; `keys api` for the server's API keys, `keys mesh` for mTLS.",
    no_args_is_help=True,
    cls=lazy_group({"api": "sealbox.runtime.cli.api_keys:api_app", "mesh": "sealbox.bundler.cli.mesh_keys:mesh_app"}),
)


def passphrase(prompt: str, *, confirm: bool) -> bytes:
    """`$SEALBOX_KEY_PASSPHRASE` when set (unattended use), else an interactive prompt that does not echo."""
    if (value := os.environ.get(PASSPHRASE_ENV)) is not None:
        return value.encode("utf-8")
    return typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm).encode("utf-8")


def open_signer(path: Path) -> CryptoSigner:
    """Load a private key for signing, asking for its passphrase only when it is encrypted."""
    secret = passphrase(f"Passphrase for {path}", confirm=False) if private_key_is_encrypted(path) else None
    return load_signer(path, passphrase=secret)


@keys_app.command("generate")
def generate(
    name: Annotated[str, typer.Argument(help="Key name: files NAME.key and NAME.pub.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the key files.")] = Path("."),
    no_encryption: Annotated[
        bool, typer.Option("--no-encryption", help="Write the private key unencrypted (e.g. for an HSM import).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the key id and paths as JSON.")] = False,
) -> None:
    """Generate an Ed25519 key pair: NAME.key (0600, passphrase-encrypted) and NAME.pub (give this to hosts)."""
    try:
        secret = None if no_encryption else passphrase(f"Passphrase for {name}.key", confirm=True)
        files = generate_key_pair(name, out, passphrase=secret)
    except KeyFileError as exc:
        raise refuse(exc) from exc
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "key_id": files.key_id,
                    "private": str(files.private),
                    "public": str(files.public),
                    "encrypted": files.encrypted,
                }
            )
        )
        return
    typer.echo(f"key id {files.key_id}")
    typer.echo(f"private {files.private} ({'encrypted' if files.encrypted else 'NOT encrypted'}, mode 0600)")
    typer.echo(f"public  {files.public}")
