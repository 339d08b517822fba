"""`sealbox plan`: the concurrency math for one model on this host, before anything is served."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, get_args

import typer
from rich.console import Console
from rich.table import Table

from sealbox.runtime.memory_plan import (
    AUTO_SEQUENCES,
    DEFAULT_MEMORY_FRACTION,
    MemoryPlan,
    MemoryPlanError,
    host_memory_bytes,
    plan_model,
    split_for_plan,
)
from sealbox.runtime.layer_split import LayerSplit
from sealbox.runtime.policy import LimitsPolicy
from sealbox.runtime.sizes import HELP as SIZE_HELP
from sealbox.runtime.exit_codes import ExitCode
from sealbox.runtime.sizes import SizeError, format_size, parse_size

KV_CACHE_TYPES = tuple(kind for kind in get_args(LimitsPolicy.model_fields["kv_cache"].annotation) if kind != "auto")


def plan(
    model: Annotated[Path, typer.Option("--model", help="The GGUF file.", exists=True, dir_okay=False)],
    ctx: Annotated[int, typer.Option("--ctx", min=1, help="Tokens one sequence holds (prompt + completion).")] = 4096,
    users: Annotated[
        int, typer.Option("--users", min=0, help=f"Sequences served at once; 0: as many as fit at --ctx, at most "
                          f"{AUTO_SEQUENCES} (what the default policy's max_sequences = 0 serves).")
    ] = 0,
    memory: Annotated[
        str | None, typer.Option("--memory", help=f"Host memory for the model, e.g. 24G ({SIZE_HELP}; default: available now).")
    ] = None,
    gpu_memory: Annotated[
        str | None,
        typer.Option("--gpu-memory", help=f"GPU memory for the model, e.g. 80G, or one size per GPU: 80G,80G ({SIZE_HELP}; "
                     "default: the free memory of the GPUs the installed engine can use)."),
    ] = None,
    fraction: Annotated[
        float, typer.Option("--fraction", min=0.05, max=1.0, help="Share of that memory to plan with (headroom).")
    ] = DEFAULT_MEMORY_FRACTION,
    kv_cache: Annotated[
        str, typer.Option("--kv-cache", help="KV cache element type: q8_0 or f16. The policy's \"auto\" times "
                          "both at a model's first start and the server logs its choice.")
    ] = "q8_0",
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Print weight bytes, KV bytes per token and per sequence, how many sequences fit, the largest context at that
    many users, and the GPU layers that fit: the numbers `sealbox serve` sizes itself with."""
    if kv_cache not in KV_CACHE_TYPES:
        raise typer.BadParameter(f"one of {', '.join(KV_CACHE_TYPES)}, not {kv_cache!r}", param_hint="--kv-cache")
    try:
        memory_bytes = parse_size(memory) if memory is not None else host_memory_bytes()
        gpus = [parse_size(size) for size in gpu_memory.split(",")] if gpu_memory is not None else engine_gpu_bytes()
        gpu_bytes = sum(gpus) if gpus else None
        result = plan_model(model, kv_cache=kv_cache, memory_bytes=memory_bytes, context=ctx, users=users,
                            fraction=fraction, gpu_memory_bytes=gpu_bytes)  # fmt: skip
        split = split_for_plan(result, gpus) if gpus else None
    except (MemoryPlanError, SizeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(ExitCode.USAGE) from exc
    except (OSError, ValueError) as exc:
        typer.echo(f"error: {model}: {exc}", err=True)
        raise typer.Exit(ExitCode.USAGE) from exc
    if as_json:
        typer.echo(json.dumps(to_dict(result) | split_to_dict(split), indent=2))
    else:
        render(model, result, Console())
        if split is not None:
            render_split(split, Console())
    if result.sequences_that_fit < 1:
        raise typer.Exit(ExitCode.FAILED)


def engine_gpu_bytes() -> list[int]:
    """Free memory of each GPU the installed engine will use (none for a CPU engine, or one that cannot run here)."""
    from sealbox.runtime.engine.accelerator import AcceleratorError, host_decision

    try:
        decision = host_decision()
    except AcceleratorError:
        return []
    return [gpu.available_bytes for gpu in decision.gpus] if decision.device == "cuda" else []


def split_to_dict(split: LayerSplit | None) -> dict[str, object]:
    if split is None:
        return {}
    shares = [{"gpu": share.index, "layers": share.layers, "output_head": share.output_head,
               "memory_bytes": share.memory_bytes, "why_unused": share.why_unused} for share in split.shares]  # fmt: skip
    return {"gpu_split": shares, "cpu_layers": split.cpu_layers, "gpu_split_note": split.note}


def render_split(split: LayerSplit, console: Console) -> None:
    for line in split.lines():
        console.print(line, highlight=False)
    if split.note:
        console.print(split.note, highlight=False)


def to_dict(result: MemoryPlan) -> dict[str, object]:
    shape = result.shape
    return {
        "weight_bytes": shape.weight_bytes,
        "layers": shape.layers,
        "kv_bytes_per_token": shape.kv_bytes_per_token,
        "kv_cache": {"k": shape.type_k, "v": shape.type_v},
        "kv_bytes_per_sequence": result.kv_bytes_per_sequence,
        "compute_bytes": result.compute_bytes,
        "memory_bytes": result.memory_bytes,
        "gpu_memory_bytes": result.gpu_memory_bytes,
        "fraction": result.fraction,
        "kv_budget_bytes": result.kv_budget_bytes,
        "kv_cells_budget": result.kv_cells_budget,
        "context": result.context,
        "users": result.users,
        "sequences_that_fit": result.sequences_that_fit,
        "context_for_users": result.context_for_users,
        "gpu_layers": result.gpu_layers,
        "fits": result.fits,
    }


def render(model: Path, result: MemoryPlan, console: Console) -> None:
    shape = result.shape
    table = Table(title=f"sealbox plan — {model.name}", show_header=False)
    table.add_column("", no_wrap=True)
    table.add_column("", justify="right")
    table.add_row("weights", f"{format_size(shape.weight_bytes)} ({shape.layers} layers)")
    table.add_row(f"KV cache per token (K {shape.type_k}, V {shape.type_v})", format_size(shape.kv_bytes_per_token))
    table.add_row(f"KV cache per sequence ({result.context} tokens)", format_size(result.kv_bytes_per_sequence))
    table.add_row("compute buffers (estimate)", format_size(result.compute_bytes))
    where = "GPU" if result.gpu_layers > shape.layers else "host"
    budget_of = result.gpu_memory_bytes if where == "GPU" else result.memory_bytes
    table.add_row(
        f"memory planned ({where}, {result.fraction:.0%} of {format_size(budget_of or 0)})",
        format_size(int((budget_of or 0) * result.fraction)),
    )
    table.add_row("KV budget", f"{format_size(max(0, result.kv_budget_bytes))} ({result.kv_cells_budget} tokens)")
    table.add_row(f"sequences that fit at {result.context} tokens", str(result.sequences_that_fit))
    table.add_row(f"largest context for {result.users} users", str(result.context_for_users))
    gpu = "no GPU" if result.gpu_memory_bytes is None else f"{result.gpu_layers} of {shape.layers + 1}"
    table.add_row("GPU layers that fit", gpu)
    console.print(table)
    if result.fits:
        console.print(f"[green]{result.users} users × {result.context} tokens fit.[/]")
    elif result.sequences_that_fit >= 1:
        console.print(
            f"[yellow]{result.users} users × {result.context} tokens do not all fit at once: serve shares "
            f"{result.kv_cells_budget} KV cells among them and queues requests until theirs fits "
            f"(or serve {result.sequences_that_fit} users, or a context of {result.context_for_users}).[/]"
        )
    else:
        console.print(f"[red]not even one sequence of {result.context} tokens fits in this memory.[/]")
