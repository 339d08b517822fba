"""The `sealbox` command: one typer app, a sub-app per concern. Each wing contributes its own commands."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="sealbox",
    help="Carry local LLMs into air-gapped hosts in signed bundles and serve them there under lock.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Keeps `sealbox` a group when only one command is registered (typer would make a lone command the root)."""


def _keys() -> None:
    from bundler.cli import keys
    from runtime.cli import api_keys

    keys.keys_app.add_typer(api_keys.api_app, name="api")
    app.add_typer(keys.keys_app, name="keys")


PUBLISHER_COMMANDS = ("create", "verify", "sign", "inspect")
"""`bundle` sub-commands of the publisher's side: they never need the installer (and its policy and audit imports)."""


def _bundle() -> None:
    from bundler.cli import bundle

    if sys.argv[2:3] and sys.argv[2] in PUBLISHER_COMMANDS:
        app.add_typer(bundle.bundle_app, name="bundle")
        return
    from bundler.cli import install  # noqa: F401  (install adds its commands to bundle_app)

    app.add_typer(bundle.bundle_app, name="bundle")


def _trust() -> None:
    from bundler.cli import trust

    app.add_typer(trust.trust_app, name="trust")


def _manifest_check() -> None:
    from bundler.cli import doctor as manifest_check

    manifest_check.register()  # the doctor's signature check (runtime cannot import bundler to do it itself)


def _doctor() -> None:
    from runtime.cli import doctor

    _manifest_check()
    app.command("doctor")(doctor.doctor)


def _plan() -> None:
    from runtime.cli import plan

    app.command("plan")(plan.plan)


def _audit() -> None:
    from runtime.cli import audit

    app.add_typer(audit.audit_app, name="audit")


def _serve() -> None:
    from runtime.cli import serve

    _manifest_check()  # `serve --strict` runs the doctor
    app.command("serve")(serve.serve)


COMMANDS = {
    "keys": _keys, "bundle": _bundle, "trust": _trust, "doctor": _doctor, "plan": _plan, "audit": _audit,
    "serve": _serve,
}  # fmt: skip


def _register(command: str | None = None) -> None:
    """Register `command`'s sub-app only when it is named (each imports only what it needs, so `bundle verify` does
    not pay for the web stack's start-up), else every one of them (root help, completion)."""
    if command in COMMANDS:
        COMMANDS[command]()
        return
    for register in COMMANDS.values():
        register()


def main() -> None:
    _register(sys.argv[1] if len(sys.argv) > 1 else None)
    app()
