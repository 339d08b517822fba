"""The `sealbox` command: one typer app, a sub-app per concern. Each wing contributes its own commands."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sealbox",
    help="Carry local LLMs into air-gapped hosts in signed bundles and serve them there under lock.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Imported here so that each command module can import `app` sub-apps without cycles.
    from bundler.cli import bundle, keys  # noqa: F401

    app.add_typer(keys.keys_app, name="keys")
    app.add_typer(bundle.bundle_app, name="bundle")


def main() -> None:
    _register()
    app()
