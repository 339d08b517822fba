"""The `sealbox` command's root: every sub-command, named by where it lives and imported only when run.

Both wings register here by name, the bundle side (`keys`, `bundle`, `trust`) and the appliance side (`doctor`,
`plan`, `audit`, `serve`, `eval`); this root sits above both, so neither wing imports the other's commands. `doctor` and
`serve` first register the bundle side's manifest-signature check, which the appliance cannot import itself.
"""

from __future__ import annotations

import typer

from sealbox.runtime.cli.lazy_group import LazyCommand, lazy_group

_MANIFEST_CHECK = "sealbox.bundler.cli.doctor:register"

COMMANDS = {
    "keys": "sealbox.bundler.cli.keys:keys_app",
    "bundle": "sealbox.bundler.cli.bundle:bundle_app",
    "trust": "sealbox.bundler.cli.trust:trust_app",
    "doctor": LazyCommand("sealbox.runtime.cli.doctor:doctor", prepare=(_MANIFEST_CHECK,)),
    "plan": "sealbox.runtime.cli.plan:plan",
    "audit": "sealbox.runtime.cli.audit:audit_app",
    "serve": LazyCommand("sealbox.runtime.cli.serve:serve", prepare=(_MANIFEST_CHECK,)),  # `serve --strict` runs the doctor
    "eval": "sealbox.runtime.cli.eval:eval_command",
    "gateway": "sealbox.runtime.cli.gateway:gateway",
}

app = typer.Typer(
    name="sealbox",
    help="Carry local LLMs into air-gapped hosts in signed bundles and serve them there under lock.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=lazy_group(COMMANDS),
)


@app.callback()
def _root() -> None:
    """Keeps `sealbox` a group (typer would make a lone command the root)."""


def main() -> None:
    app()
