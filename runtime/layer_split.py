"""How a model's layers spread over several GPUs: llama.cpp's layer split, predicted from GPU memory sizes.

llama.cpp (split mode `layer`, its default) gives each GPU a share of the repeating blocks proportional to its free
memory, puts the output head on the last GPU, and keeps a compute buffer on each GPU it uses. This module predicts
that placement so `sealbox plan` and the doctor can show it per GPU and say why a GPU is left out, before anything
is loaded. Pure: sizes in, split out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sealbox.runtime.sizes import format_size


@dataclass(frozen=True, kw_only=True)
class GpuShare:
    index: int
    memory_bytes: int
    layers: int
    output_head: bool = False
    why_unused: str | None = None


@dataclass(frozen=True, kw_only=True)
class LayerSplit:
    layers: int
    """Repeating blocks in the model."""
    shares: tuple[GpuShare, ...]
    note: str | None = None
    """Why not every layer is on a GPU, or why not every GPU is used."""

    @property
    def gpu_layers(self) -> int:
        """llama.cpp's n_gpu_layers: the blocks on GPUs, plus one for the output head."""
        return sum(share.layers for share in self.shares) + any(share.output_head for share in self.shares)

    @property
    def cpu_layers(self) -> int:
        return self.layers - sum(share.layers for share in self.shares)

    @property
    def fractions(self) -> tuple[float, ...]:
        """llama.cpp's tensor_split for this placement (one share per GPU)."""
        total = sum(share.layers for share in self.shares)
        return tuple(share.layers / total if total else 0.0 for share in self.shares)

    def lines(self) -> list[str]:
        out = []
        for share in self.shares:
            if share.why_unused:
                out.append(f"GPU {share.index}: not used: {share.why_unused}")
            else:
                head = " + output head" if share.output_head else ""
                out.append(f"GPU {share.index}: {share.layers} of {self.layers} layers{head} "
                           f"({format_size(share.memory_bytes)} planned)")  # fmt: skip
        if self.cpu_layers:
            out.append(f"CPU: {self.cpu_layers} of {self.layers} layers")
        return out


def split_layers(
    *,
    layers: int,
    layer_bytes: int,
    kv_bytes_per_layer: int,
    output_bytes: int,
    compute_bytes: int,
    gpu_memory_bytes: Sequence[int],
) -> LayerSplit:
    """Place `layers` blocks (each `layer_bytes` of weights and `kv_bytes_per_layer` of KV cache) and the output head
    (`output_bytes`) on GPUs of the given memory (already the share the policy lets the model use).

    Each used GPU keeps `compute_bytes` for its buffers. Blocks go in proportion to memory, as llama.cpp does, capped
    by what each GPU holds; blocks that fit nowhere stay on the CPU.
    """
    per_layer = layer_bytes + kv_bytes_per_layer
    rooms = [memory - compute_bytes for memory in gpu_memory_bytes]
    usable = [index for index, room in enumerate(rooms) if room >= per_layer > 0]
    capacity = {index: rooms[index] // per_layer for index in usable}
    placed = {index: 0 for index in usable}
    left = layers
    # Proportional shares first (llama.cpp's tensor_split by memory), then whatever room remains, GPU by GPU.
    weight = sum(gpu_memory_bytes[index] for index in usable)
    for index in usable:
        share = layers * gpu_memory_bytes[index] // weight if weight else 0
        placed[index] = min(share, capacity[index], left)
        left -= placed[index]
    for index in usable:
        extra = min(capacity[index] - placed[index], left)
        placed[index] += extra
        left -= extra
    used = [index for index in usable if placed[index]]
    head_on = None
    if left == 0 and used:
        last = used[-1]
        if rooms[last] - placed[last] * per_layer >= output_bytes:
            head_on = last
    shares = []
    for index, memory in enumerate(gpu_memory_bytes):
        if index not in usable:
            why = f"{format_size(max(0, memory))} holds the compute buffers ({format_size(compute_bytes)}) and no layer"
            shares.append(GpuShare(index=index, memory_bytes=0, layers=0, why_unused=why))
            continue
        if not placed[index]:
            shares.append(GpuShare(index=index, memory_bytes=0, layers=0, why_unused="the other GPUs hold every layer"))
            continue
        planned = compute_bytes + placed[index] * per_layer + (output_bytes if head_on == index else 0)
        shares.append(GpuShare(index=index, memory_bytes=planned, layers=placed[index], output_head=head_on == index))
    note = None
    if not gpu_memory_bytes:
        note = "no GPU: every layer runs on the CPU"
    elif left:
        note = f"{left} of {layers} layers do not fit in GPU memory and run on the CPU (slower)"
    elif head_on is None:
        note = "the output head does not fit beside the blocks and runs on the CPU"
    elif len(used) < len(gpu_memory_bytes):
        note = f"{len(gpu_memory_bytes) - len(used)} GPU(s) not used (see each line)"
    elif len(used) > 1:
        note = f"layer split over {len(used)} GPUs in proportion to their memory"
    return LayerSplit(layers=layers, shares=tuple(shares), note=note)
