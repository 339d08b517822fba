"""A typer group whose sub-commands are imported only when click resolves them.

`sealbox bundle verify` must not pay for the web stack, nor `sealbox serve` for the bundle side: each sub-command
names where it lives ("module:attribute") and is imported when named, or when the root's help lists them all.
Nothing here reads `sys.argv`; click's own dispatch decides what is loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import typer
import typer.main
from typer.core import TyperGroup


@dataclass(frozen=True)
class LazyCommand:
    """Where a sub-command lives, and the functions to call before it runs (each "module:function")."""

    target: str
    prepare: tuple[str, ...] = field(default=())


def _resolve(reference: str) -> Any:
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _as_command(name: str, target: Any) -> Any:
    """A click command for a typer app (a group) or a plain typer command function."""
    if isinstance(target, typer.Typer):
        command = typer.main.get_group(target)
    else:
        single = typer.Typer()
        single.command(name)(target)
        command = typer.main.get_command(single)
    command.name = name
    return command


def lazy_group(commands: Mapping[str, LazyCommand | str]) -> type[TyperGroup]:
    """A `TyperGroup` class (for `typer.Typer(cls=...)`) that adds `commands` to those registered eagerly."""
    lazy = {name: spec if isinstance(spec, LazyCommand) else LazyCommand(spec) for name, spec in commands.items()}

    class LazyGroup(TyperGroup):
        def list_commands(self, ctx: Any) -> list[str]:
            return [*super().list_commands(ctx), *(name for name in lazy if name not in self.commands)]

        def get_command(self, ctx: Any, cmd_name: str) -> Any:
            if cmd_name in self.commands or cmd_name not in lazy:
                return super().get_command(ctx, cmd_name)
            spec = lazy[cmd_name]
            for step in spec.prepare:
                _resolve(step)()
            command = _as_command(cmd_name, _resolve(spec.target))
            self.commands[cmd_name] = command
            return command

    return LazyGroup
