"""How every `sealbox` command says no: one line on stderr, and the exit status of the refusal's class."""

from __future__ import annotations

import typer

from sealbox.runtime.exit_codes import ExitCode


def refuse(error: Exception | str, code: int | None = None, *, command: str = "sealbox") -> typer.Exit:
    """Print `error` as a refusal and return the exit to raise: `raise refuse(exc) from exc`.

    The code is `code`, else the error's own `exit_code` (see `ExitCode`), else `ExitCode.FAILED`.
    """
    from rich.console import Console  # here, not at the top: a command that succeeds never needs rich
    from rich.markup import escape

    status = code if code is not None else int(getattr(error, "exit_code", ExitCode.FAILED))
    Console(stderr=True).print(f"[bold red]{command}: refused:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    return typer.Exit(status)
