"""The concurrency math: how much memory the weights, the KV cache and the compute buffers take, and so how many
sequences at what context one host can serve without being OOM-killed.

`sealbox plan` prints it; `sealbox serve` sizes its engine with the same numbers (`MemoryPlan.engine_sizing`), so what
the operator is shown is what the server does. Memory is committed when the context is built (llama.cpp allocates
the whole KV cache up front), so a plan that fits at start cannot grow into an OOM later.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sealbox.runtime.policy import LimitsPolicy
from sealbox.runtime.sizes import KiB, MiB, format_size

if TYPE_CHECKING:
    from sealbox.runtime.layer_split import LayerSplit
    from sealbox.runtime.models.calibration import KernelChoice
    from sealbox.runtime.models.gguf_facts import ModelFile


DEFAULT_BATCH = 512
"""Tokens per decode step; sizes the compute buffers (kept equal to the engine's default)."""
FIXED_OVERHEAD_BYTES = 64 * MiB
"""Graph metadata, scheduler copies and allocator slack beyond the buffers estimated here."""
DEFAULT_MEMORY_FRACTION = LimitsPolicy.model_fields["memory_fraction"].default
AUTO_SEQUENCES = 64
"""Sequences a policy's `max_sequences = 0` asks for when memory holds them all at full context (fewer when not):
enough that 64 concurrent users are decoded together instead of queueing, where a fixed 16 made half of 32 wait."""

_BLOCK = re.compile(r"^blk\.(\d+)\.")


class MemoryPlanError(Exception):
    """The model cannot be served in the memory given (not even one sequence fits), or a size does not parse."""


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the math needs to know about a model."""

    weight_bytes: int
    layer_bytes: int
    """Bytes of the largest repeating block: the unit of GPU offload."""
    layers: int
    n_embd: int
    n_head: int
    n_vocab: int
    context_length: int
    kv_bytes_per_token: int
    type_k: str = "f16"
    type_v: str = "f16"
    """The KV cache's element types that `kv_bytes_per_token` was computed for."""

    @property
    def other_bytes(self) -> int:
        """Weights outside the repeating blocks (token embeddings, output head, norms)."""
        return max(0, self.weight_bytes - self.layers * self.layer_bytes)

    @classmethod
    def from_gguf(
        cls, path: Path, *, type_k: str = "f16", type_v: str = "f16", model_file: ModelFile | None = None
    ) -> ModelShape:
        """The shape of a GGUF file: layers, KV heads and head size from its facts, weights from its tensors' sizes;
        from `model_file` when the caller read the header already, else from one read of it here."""
        from sealbox.runtime.models.gguf_facts import ModelFileError, kv_bytes_per_token, read_model_file

        if model_file is None:
            try:
                model_file = read_model_file(path)
            except ModelFileError as exc:
                raise MemoryPlanError(str(exc)) from exc
        facts = model_file.facts
        per_block: dict[int, int] = {}
        total = 0
        for name, size in model_file.tensor_sizes():
            total += size
            match = _BLOCK.match(name)
            if match:
                block = int(match.group(1))
                per_block[block] = per_block.get(block, 0) + size
        return cls(
            weight_bytes=total,
            layer_bytes=max(per_block.values(), default=0),
            layers=int(facts.block_count),
            n_embd=facts.embedding_length,
            n_head=facts.head_count or 1,
            n_vocab=facts.vocab_size,
            context_length=int(facts.context_length),
            kv_bytes_per_token=int(kv_bytes_per_token(facts, type_k, type_v)),
            type_k=type_k,
            type_v=type_v,
        )


@dataclass(frozen=True, kw_only=True)
class EngineSizing:
    """The engine's arguments that come from the plan."""

    n_seq_max: int
    n_ctx_per_seq: int
    kv_cells: int
    n_gpu_layers: int
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attention: bool = True


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    shape: ModelShape
    memory_bytes: int
    """Host memory the model may use."""
    fraction: float
    context: int
    users: int
    compute_bytes: int
    kv_budget_bytes: int
    gpu_memory_bytes: int | None
    gpu_layers: int
    flash_attention: bool = True
    """Whether the engine runs flash attention: as chosen, except off in a pool shared on the CPU (see
    `plan_model`) and always on with GPU layers."""

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * self.fraction)

    @property
    def kv_bytes_per_sequence(self) -> int:
        return self.shape.kv_bytes_per_token * self.context

    @property
    def kv_cells_budget(self) -> int:
        if self.kv_budget_bytes <= 0 or not self.shape.kv_bytes_per_token:
            return 0
        return self.kv_budget_bytes // self.shape.kv_bytes_per_token

    @property
    def sequences_that_fit(self) -> int:
        """Sequences that can all hold `context` tokens at once."""
        if self.kv_budget_bytes <= 0 or not self.kv_bytes_per_sequence:
            return 0
        return self.kv_budget_bytes // self.kv_bytes_per_sequence

    @property
    def context_for_users(self) -> int:
        """The largest context every one of `users` sequences can hold at once (capped by the model's own)."""
        if self.kv_budget_bytes <= 0 or not self.shape.kv_bytes_per_token or self.users < 1:
            return 0
        return min(self.shape.context_length, self.kv_budget_bytes // (self.shape.kv_bytes_per_token * self.users))

    @property
    def fits(self) -> bool:
        return self.sequences_that_fit >= self.users

    def engine_sizing(self) -> EngineSizing:
        """`users` sequences of `context` tokens; if they cannot all be full at once, they share the cells that fit
        and admission makes requests wait for room (never an OOM).

        Raises:
            MemoryPlanError: not even one sequence of `context` tokens fits.
        """
        cells = min(self.users * self.context, self.kv_cells_budget)
        if cells < self.context:
            raise MemoryPlanError(
                f"not even one sequence of {self.context} tokens fits: the KV budget is "
                f"{format_size(max(0, self.kv_budget_bytes))} and one sequence needs "
                f"{format_size(self.kv_bytes_per_sequence)}; lower the context or give the model more memory"
            )
        return EngineSizing(
            n_seq_max=self.users,
            n_ctx_per_seq=self.context,
            kv_cells=cells,
            n_gpu_layers=self.gpu_layers,
            type_k=self.shape.type_k,
            type_v=self.shape.type_v,
            flash_attention=self.flash_attention,
        )

    @property
    def shares_a_pool(self) -> bool:
        """The sequences cannot all be full at once: they share one pool of cells (see `engine_sizing`)."""
        return self.kv_cells_budget < self.users * self.context


def estimate_compute_bytes(shape: ModelShape, *, context: int, n_batch: int = DEFAULT_BATCH) -> int:
    """llama.cpp's compute and output buffers for one step of `n_batch` tokens (an estimate, on the safe side).

    Logits for every output (n_batch × n_vocab floats), the attention scores of a batch against one sequence's
    context (n_batch × context × n_head floats, without flash attention), and a few activations per token.
    """
    logits = n_batch * shape.n_vocab * 4
    scores = n_batch * context * shape.n_head * 4
    activations = n_batch * shape.n_embd * 4 * 16
    return logits + scores + activations + FIXED_OVERHEAD_BYTES


def plan(
    shape: ModelShape,
    *,
    memory_bytes: int,
    context: int,
    users: int,
    fraction: float = DEFAULT_MEMORY_FRACTION,
    gpu_memory_bytes: int | None = None,
    n_batch: int = DEFAULT_BATCH,
    kv_cells: int | None = None,
) -> MemoryPlan:
    """Plan `users` sequences of `context` tokens in `memory_bytes` (× `fraction`, the headroom the policy keeps).

    Without a GPU the weights (memory-mapped) and the KV cache share host memory. With `gpu_memory_bytes`, the whole
    model goes to the GPU when the weights and at least one full sequence fit there (the KV budget is then what the
    GPU has left); otherwise the KV cache is planned in host memory and as many layers as fit go to the GPU, each
    taking its weights and its share of the KV cache along. `kv_cells` (the policy's `[limits] kv_cells`) caps the
    KV budget at that many tokens' worth, whatever the memory would allow.
    """
    if context < 1 or users < 1:
        raise MemoryPlanError("context and users must be at least 1")
    context = min(context, shape.context_length) if shape.context_length else context
    compute = estimate_compute_bytes(shape, context=context, n_batch=n_batch)
    kv_cap = kv_cells * shape.kv_bytes_per_token if kv_cells else None

    def capped(budget: int) -> int:
        return budget if kv_cap is None else min(budget, kv_cap)

    kv_budget = capped(int(memory_bytes * fraction) - shape.weight_bytes - compute)
    gpu_layers = 0
    if gpu_memory_bytes is not None:
        on_gpu = int(gpu_memory_bytes * fraction) - shape.weight_bytes - compute
        if on_gpu >= shape.kv_bytes_per_token * context:
            kv_budget, gpu_layers = capped(on_gpu), shape.layers + 1
        else:
            cells = max(0, min(users * context, kv_budget // max(1, shape.kv_bytes_per_token)))
            gpu_layers = gpu_layers_that_fit(
                shape, gpu_memory_bytes=int(gpu_memory_bytes * fraction), kv_cells=cells, compute_bytes=compute
            )
    return MemoryPlan(
        shape=shape,
        memory_bytes=memory_bytes,
        fraction=fraction,
        context=context,
        users=users,
        compute_bytes=compute,
        kv_budget_bytes=kv_budget,
        gpu_memory_bytes=gpu_memory_bytes,
        gpu_layers=gpu_layers,
    )


def gpu_layers_that_fit(shape: ModelShape, *, gpu_memory_bytes: int, kv_cells: int, compute_bytes: int) -> int:
    """Layers to offload (llama.cpp's n_gpu_layers; layers + 1 also moves the output head)."""
    if shape.layers < 1:
        return 0
    kv_per_layer = kv_cells * shape.kv_bytes_per_token // shape.layers
    per_layer = shape.layer_bytes + kv_per_layer
    room = gpu_memory_bytes - compute_bytes
    if room <= 0 or per_layer <= 0:
        return 0
    layers = min(shape.layers, room // per_layer)
    if layers == shape.layers and room - layers * per_layer >= shape.other_bytes:
        return shape.layers + 1
    return int(layers)


def host_memory_bytes() -> int:
    """Memory available to a new process now (MemAvailable), falling back to physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KiB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gpu_free_bytes() -> int | None:
    """Free memory of the GPUs the installed engine will use, summed (llama.cpp's layer split spreads the model over
    them all; `runtime.layer_split` shows how), or None when the engine is not a CUDA build that can run here.

    A CPU engine on a GPU host gets None: planning its KV cache into GPU memory would put it in host memory for real.
    """
    from sealbox.runtime.engine.accelerator import AcceleratorError, host_decision

    try:
        decision = host_decision()
    except AcceleratorError:
        return None
    if decision.device != "cuda":
        return None
    return sum(gpu.available_bytes for gpu in decision.gpus)


def split_for_plan(result: MemoryPlan, gpu_memory_bytes: list[int]) -> LayerSplit:
    """The plan's layers and KV cache spread over GPUs of these sizes (before the policy's headroom)."""
    from sealbox.runtime.layer_split import split_layers

    shape = result.shape
    cells = min(result.users * result.context, result.kv_cells_budget)
    return split_layers(
        layers=shape.layers,
        layer_bytes=shape.layer_bytes,
        kv_bytes_per_layer=cells * shape.kv_bytes_per_token // max(1, shape.layers),
        output_bytes=shape.other_bytes,
        compute_bytes=result.compute_bytes,
        gpu_memory_bytes=[int(size * result.fraction) for size in gpu_memory_bytes],
    )


def plan_for_policy(
    model: Path,
    limits: LimitsPolicy,
    *,
    memory_bytes: int | None = None,
    gpu_memory_bytes: int | None = None,
    detect_gpu: bool = True,
    model_file: ModelFile | None = None,
    kernels: KernelChoice | None = None,
) -> MemoryPlan:
    """The plan `sealbox serve` sizes its engine with: the policy's context (0 = the model's own) and sequences, in the
    memory available now (or the amounts given), keeping the policy's headroom and its `kv_cells` cap. `kernels`:
    the KV types and attention the calibration chose (without it, the policy's, with q8_0 for "auto").

    Raises:
        MemoryPlanError: the model's facts cannot be read.
    """
    if gpu_memory_bytes is None and detect_gpu:
        gpu_memory_bytes = gpu_free_bytes()
    return plan_model(
        model,
        kv_cache=kernels.type_k if kernels is not None else _fixed_kv_cache(limits.kv_cache),
        v_cache=kernels.type_v if kernels is not None else None,
        flash_attention=kernels.flash_attention if kernels is not None else limits.flash_attention != "off",
        memory_bytes=memory_bytes if memory_bytes is not None else host_memory_bytes(),
        context=limits.context,
        users=limits.max_sequences,
        fraction=limits.memory_fraction,
        gpu_memory_bytes=gpu_memory_bytes,
        kv_cells=limits.kv_cells or None,
        model_file=model_file,
    )


def _fixed_kv_cache(kv_cache: str) -> str:
    """The policy's KV type where nothing was measured: q8_0 for "auto" (half the memory of f16)."""
    return "q8_0" if kv_cache == "auto" else kv_cache


def plan_model(
    model: Path,
    *,
    kv_cache: str,
    memory_bytes: int,
    context: int,
    users: int,
    fraction: float = DEFAULT_MEMORY_FRACTION,
    gpu_memory_bytes: int | None = None,
    kv_cells: int | None = None,
    model_file: ModelFile | None = None,
    v_cache: str | None = None,
    flash_attention: bool = True,
) -> MemoryPlan:
    """`plan` for a GGUF file and a KV cache type (`context` 0 = the model's own; `users` 0 = `AUTO_SEQUENCES`, or
    as many as fit at full context when fewer do). `v_cache`: V's type when it differs from K's.

    The cache is kept in f16 where llama.cpp cannot quantize it: a head whose size is not a whole number of q8_0
    blocks (32 values; Phi-2's 80, for one) is refused or aborts the process. A quantized V needs flash attention,
    which the engine leaves off for a pool shared by all sequences on the CPU (see `LlamaBatchEngine`): there V stays
    f16, and the plan is made again with that, so that the memory the engine takes is the memory planned.
    """
    from sealbox.runtime.models.gguf_facts import KV_BLOCK, kv_bytes_per_token, read_model_file

    model_file = model_file or read_model_file(model)
    facts = model_file.facts
    type_k, type_v = kv_cache, v_cache or kv_cache
    if facts.head_dim % KV_BLOCK[type_k] or facts.head_dim % KV_BLOCK[type_v]:
        type_k = type_v = "f16"
    if not flash_attention:
        type_v = "f16"
    shape = ModelShape.from_gguf(model, type_k=type_k, type_v=type_v, model_file=model_file)

    def make(shape: ModelShape, users: int) -> MemoryPlan:
        return plan(shape, memory_bytes=memory_bytes, context=context or shape.context_length, users=users,
                    fraction=fraction, gpu_memory_bytes=gpu_memory_bytes, kv_cells=kv_cells)  # fmt: skip

    if users == 0:
        wanted = make(shape, AUTO_SEQUENCES)
        users = AUTO_SEQUENCES if wanted.fits else max(1, wanted.sequences_that_fit)
    result = make(shape, users)
    if result.gpu_layers:
        return replace(result, flash_attention=True)
    if result.shares_a_pool:  # flash attention off on the CPU in a shared pool: V must be f16
        if type_v != "f16":
            shape = replace(shape, type_v="f16", kv_bytes_per_token=kv_bytes_per_token(facts, type_k, "f16"))
            result = make(shape, users)
        return replace(result, flash_attention=False)
    return replace(result, flash_attention=flash_attention)
