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

    from bundler.cli import install, trust  # noqa: F401  (install adds its commands to bundle_app)

    app.add_typer(trust.trust_app, name="trust")

    from runtime.cli import doctor

    app.command("doctor")(doctor.doctor)

    from runtime.cli import plan

    app.command("plan")(plan.plan)

    from runtime.cli import audit

    app.add_typer(audit.audit_app, name="audit")

    from runtime.cli import api_keys, serve

    keys.keys_app.add_typer(api_keys.api_app, name="api")
    app.command("serve")(serve.serve)


def main() -> None:
    _register()
    app()
