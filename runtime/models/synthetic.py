"""Writes llama-architecture GGUF models for tests, the demo and benchmarks: a real tokenizer, seeded random weights.

llama.cpp aborts the whole process on a malformed vocabulary (a duplicate token, a missing byte-fallback piece), so
the table is built to be valid: control tokens, all 256 byte-fallback pieces `<0x00>`..`<0xFF>`, then unique word
pieces. Sizes run from ~0.5 MB (tests) to hundreds of MB (benchmarks); the same seed always gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from sealbox.runtime.sizes import parse_size

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word but not "
    "what all were we when your can said there use an each which she do how their if will up other about out many then "
    "them these so some her would make like him into time has look two more write go see number no way could people my "
    "than first water been call who oil its now find long down day did get come made may part patient bank record model "
    "data audit secure host server request token key value name city river light house small large green blue red hello "
    "world yes json true false null"
).split()

_CONTROL = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
_PUNCT = list(".,:;!?'\"(){}[]-_/0123456789")

# Token types as llama.cpp reads them (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL_T, _BYTE = 1, 2, 3, 6


Q8_0 = gguf.GGMLQuantizationType.Q8_0
WEIGHT_TYPES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}
"""Bytes per weight: a Q8_0 block is 32 int8 weights and one f16 scale."""


@dataclass(frozen=True)
class Shape:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, types): unique by construction, byte fallback complete."""
    tokens = list(_CONTROL)
    types = [_UNKNOWN] + [_CONTROL_T] * (len(_CONTROL) - 1)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [_BYTE] * 256
    pieces: list[str] = []
    for word in _WORDS:
        # SPM merges two adjacent pieces only into a piece that exists: every prefix must, for words to form.
        for end in range(2, len(word) + 1):
            pieces.append("\u2581" + word[:end])
            pieces.append(word[:end])
    pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["\u2581" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += _PUNCT + ["\u2581" + p for p in _PUNCT] + ["\u2581", "\n"]
    seen = set(tokens)
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(_NORMAL)
    # Longer pieces score higher so SPM merges prefer whole words.
    scores = [0.0] * (len(_CONTROL) + 256) + [float(len(t)) - i * 1e-4 for i, t in enumerate(tokens[len(_CONTROL) + 256 :])]
    assert len(set(tokens)) == len(tokens)
    return tokens, scores, types


def shape_for_size(target_bytes: int, *, bytes_per_weight: float, vocab: int) -> Shape:
    """The smallest embedding width whose layer count (≤ 24) reaches the target size."""
    for n_embd in (64, 128, 256, 384, 512, 768, 1024, 1536, 2048):
        n_ff = n_embd * 2
        n_head = max(2, n_embd // 64)  # head size 64 as in real small models (SmolLM, TinyLlama); 32 at width 64
        n_head_kv = n_head // 2
        kv_width = n_head_kv * (n_embd // n_head)
        per_layer = (2 * n_embd * n_embd + 2 * kv_width * n_embd + 3 * n_embd * n_ff) * bytes_per_weight
        fixed = 2 * vocab * n_embd * bytes_per_weight
        n_layer = max(1, round((target_bytes - fixed) / per_layer))
        if n_layer <= 24:
            return Shape(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff)
    return Shape(n_embd=2048, n_layer=max(1, int(target_bytes // (20 * 2048 * 2048 * bytes_per_weight))),
                 n_head=64, n_head_kv=32, n_ff=4096)


def write_test_model(
    path: Path,
    *,
    size: str | int = "1MB",
    seed: int = 0,
    context_length: int = 4096,
    weight_type: str = "auto",
    name: str = "sealbox-test-model",
    embedding: bool = False,
    chat_template: str = CHAT_TEMPLATE,
    never_ends: bool = False,
    head_size: int | None = None,
) -> Path:
    """Write a loadable llama GGUF of about `size` bytes. `weight_type`: f32, f16, q8_0 (8-bit blocks, as models are
    commonly served on CPUs), or auto (f32 below 8 MB, else f16).

    `never_ends`: the output rows of the control tokens (EOS, `<|im_end|>`…) are zero, so their logit is 0 while about
    half the vocabulary scores above it: a top-k sampler never picks them and completions run to `max_tokens`, which
    is what a throughput benchmark needs (a random model otherwise ends after a dozen tokens).
    `head_size`: attention head size instead of the default (64, or 32 for the narrowest models)."""
    target = parse_size(size) if isinstance(size, str) else int(size)
    if weight_type == "auto":
        weight_type = "f32" if target < (8 << 20) else "f16"
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {', '.join(WEIGHT_TYPES)} (got {weight_type!r})")
    dtype = np.float16 if weight_type == "f16" else np.float32
    tokens, scores, types = vocabulary()
    shape = shape_for_size(target, bytes_per_weight=WEIGHT_TYPES[weight_type], vocab=len(tokens))
    if head_size is not None:  # another head size at the same width (it must divide the width)
        n_head = shape.n_embd // head_size
        shape = Shape(n_embd=shape.n_embd, n_layer=shape.n_layer, n_head=n_head, n_head_kv=max(1, n_head // 2),
                      n_ff=shape.n_ff)  # fmt: skip
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")

    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_license("apache-2.0")
    writer.add_context_length(context_length)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_file_type(
        {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[
            weight_type
        ]
    )
    if embedding:
        writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template)

    def matrix(name: str, values: np.ndarray) -> None:
        if weight_type == "q8_0":  # rows are whole 32-weight blocks: every width here is a multiple of 32
            writer.add_tensor(name, gguf.quants.quantize(values, Q8_0), raw_dtype=Q8_0)
        else:
            writer.add_tensor(name, values.astype(dtype))

    def tensor(name: str, *dims: int, scale: float | None = None) -> None:
        std = scale if scale is not None else 1 / np.sqrt(dims[-1])
        matrix(name, rng.standard_normal(dims, dtype=np.float32) * std)

    def ones(name: str, n: int) -> None:
        writer.add_tensor(name, np.ones(n, dtype=np.float32))

    n_vocab, e = len(tokens), shape.n_embd
    kv_width = shape.n_head_kv * shape.head_dim
    tensor("token_embd.weight", n_vocab, e, scale=1.0)
    ones("output_norm.weight", e)
    output = rng.standard_normal((n_vocab, e), dtype=np.float32) * (4 / np.sqrt(e))
    if never_ends:
        output[[i for i, kind in enumerate(types) if kind in (_CONTROL_T, _UNKNOWN)]] = 0
    matrix("output.weight", output)
    for i in range(shape.n_layer):
        ones(f"blk.{i}.attn_norm.weight", e)
        ones(f"blk.{i}.ffn_norm.weight", e)
        tensor(f"blk.{i}.attn_q.weight", e, e)
        tensor(f"blk.{i}.attn_k.weight", kv_width, e)
        tensor(f"blk.{i}.attn_v.weight", kv_width, e)
        tensor(f"blk.{i}.attn_output.weight", e, e)
        tensor(f"blk.{i}.ffn_gate.weight", shape.n_ff, e)
        tensor(f"blk.{i}.ffn_up.weight", shape.n_ff, e)
        tensor(f"blk.{i}.ffn_down.weight", e, shape.n_ff)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


MALFORMED_KINDS = ("not_gguf", "truncated", "duplicate_vocab", "bad_magic_version")


def write_malformed_model(path: Path, kind: str, *, seed: int = 0) -> Path:
    """A model file that must be refused: the server probes it in a child so it never takes the server down."""
    path = Path(path)
    if kind == "not_gguf":
        path.write_bytes(b"PK\x03\x04 this is a zip, not a model" + bytes(64))
    elif kind == "truncated":
        good = write_test_model(path.with_name(path.name + ".good"), seed=seed)
        data = good.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
        good.unlink()
    elif kind == "bad_magic_version":
        good = write_test_model(path.with_name(path.name + ".good"), seed=seed)
        data = bytearray(good.read_bytes())
        data[4:8] = (99).to_bytes(4, "little")
        path.write_bytes(bytes(data))
        good.unlink()
    elif kind == "duplicate_vocab":
        # A header our parser accepts, with a vocabulary llama.cpp aborts on: "▁of" patched into a second "▁to"
        # (same byte length, so every offset after it stays valid).
        good = write_test_model(path.with_name(path.name + ".good"), seed=seed)
        data = bytearray(good.read_bytes())
        good.unlink()
        original, duplicate = "\u2581of".encode(), "\u2581to".encode()
        index = data.find(len(original).to_bytes(8, "little") + original)
        if index < 0:
            raise RuntimeError("token to duplicate not found in the generated vocabulary")
        data[index + 8 : index + 8 + len(original)] = duplicate
        path.write_bytes(bytes(data))
    else:
        raise ValueError(f"unknown malformed kind {kind!r}; one of {MALFORMED_KINDS}")
    return path
