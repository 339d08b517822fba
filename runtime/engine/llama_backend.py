"""The ctypes surface of llama.cpp that the batching engine uses, and nothing more.

Every llama.cpp call of the engine goes through here, so a failure becomes an `EngineError` at this seam and the rest
of the engine is plain Python. Only the scheduler thread calls into a context; the model and vocabulary are read-only
after loading and may be used from any thread (tokenising in the request handler, for instance).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp as llama
import numpy as np

from sealbox.runtime.engine.base import EngineError, EngineLoadError, EngineUnavailable, InvalidRequest

log = logging.getLogger("sealbox.llama")

# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous message).
_LEVELS = {3: logging.WARNING, 4: logging.ERROR}
_CONTINUE = 5
_last_level = 0


@llama.llama_log_callback
def _log_to_logging(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp narrates every tensor while loading; only warnings and errors are worth an operator's attention.
    global _last_level
    if level != _CONTINUE:
        _last_level = level
    if _last_level in _LEVELS:
        message = text.decode("utf-8", "replace").rstrip()
        if message:
            log.log(_LEVELS[_last_level], "%s", message)


_init_lock = threading.Lock()
_initialised = False


def _init_once() -> None:
    global _initialised
    with _init_lock:
        if not _initialised:
            llama.llama_log_set(_log_to_logging, ctypes.c_void_p(0))
            llama.llama_backend_init()
            _initialised = True


class ModelLoadError(EngineLoadError):
    """llama.cpp could not load the GGUF file (or build a context for it)."""


class DecodeError(EngineUnavailable):
    """llama_decode failed for a reason other than a full cache."""


class KVCacheFullError(EngineError):
    """llama_decode found no room in the KV cache for the batch (return code 1)."""


class Model:
    """A loaded GGUF model and its vocabulary."""

    def __init__(self, path: Path, *, n_gpu_layers: int = 0, extra_buffers: bool = True) -> None:
        """`extra_buffers`: llama.cpp's CPU weight layouts (AMX tiles, repacked blocks). Faster where they work; the
        AMX kernels crash the process on CPUs that report AMX to a guest that cannot run it (see `models.probe`)."""
        _init_once()
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such model file")
        params = llama.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = extra_buffers
        handle = llama.llama_model_load_from_file(str(path).encode(), params)
        if not handle:
            raise ModelLoadError(f"{path}: llama.cpp could not load this GGUF file")
        self.path = path
        self.handle = handle
        self.vocab = llama.llama_model_get_vocab(handle)
        self.n_vocab: int = llama.llama_vocab_n_tokens(self.vocab)
        self.n_embd: int = llama.llama_model_n_embd(handle)
        self.n_ctx_train: int = llama.llama_model_n_ctx_train(handle)
        self.size_bytes: int = llama.llama_model_size(handle)
        """Bytes of all weights: what computing one token reads at least once."""
        n_head = max(1, llama.llama_model_n_head(handle))
        self.kv_values_per_cell: int = (
            llama.llama_model_n_layer(handle) * llama.llama_model_n_head_kv(handle) * (self.n_embd // n_head)
        )
        """Values one KV cell holds in K (and as many in V), every layer; bytes depend on the context's cache types."""
        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self._eog = np.zeros(self.n_vocab, dtype=bool)
        for token in range(self.n_vocab):
            self._eog[token] = llama.llama_vocab_is_eog(self.vocab, token)
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._piece_lock = threading.Lock()

    def close(self) -> None:
        if self.handle:
            llama.llama_model_free(self.handle)
            self.handle = None

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(self.vocab, data, len(data), buffer, capacity, add_bos, special)
        if n < 0:  # the buffer was too small: -n is the size needed
            capacity = -n
            buffer = (llama.llama_token * capacity)()
            n = llama.llama_tokenize(self.vocab, data, len(data), buffer, capacity, add_bos, special)
        if n < 0:
            raise EngineError(f"llama.cpp could not tokenize a text of {len(data)} bytes")
        return buffer[:n]

    def piece(self, token: int) -> bytes:
        """The bytes one token renders to (control tokens render empty); cached, so a token costs one lookup."""
        cached = self._pieces[token]
        if cached is not None:
            return cached
        with self._piece_lock:
            n = llama.llama_token_to_piece(self.vocab, token, self._piece_buffer, 256, 0, False)
            if n < 0:
                bigger = ctypes.create_string_buffer(-n)
                n = llama.llama_token_to_piece(self.vocab, token, bigger, -n, 0, False)
                value = bigger.raw[:n]
            else:
                value = self._piece_buffer.raw[:n]
        self._pieces[token] = value
        return value

    def is_eog(self, token: int) -> bool:
        return bool(self._eog[token])

    @property
    def bos_text(self) -> str:
        """The BOS token's text, as a chat template prints it (empty when the vocabulary has none)."""
        return self._special_text(llama.llama_vocab_bos(self.vocab))

    @property
    def eos_text(self) -> str:
        return self._special_text(llama.llama_vocab_eos(self.vocab))

    def _special_text(self, token: int) -> str:
        if not 0 <= token < self.n_vocab:
            return ""
        return llama.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    def check_tokens(self, tokens: list[int], what: str) -> None:
        """llama.cpp aborts the whole process on a token id outside the vocabulary: refuse one before it sees it.

        Raises:
            InvalidRequest: a token id is outside 0 .. n_vocab - 1.
        """
        if any(token < 0 or token >= self.n_vocab for token in tokens):
            raise InvalidRequest(f"{what} holds a token id outside the vocabulary (0..{self.n_vocab - 1})")


@dataclass(frozen=True, kw_only=True)
class ContextSettings:
    n_ctx: int
    """KV cells in total: split evenly into one stream per sequence, or one pool when `unified`."""
    n_seq_max: int
    n_batch: int
    n_threads: int
    embeddings: bool = False
    unified: bool = False
    """One pool of cells for all sequences: a short request leaves room for a long one and `seq_cp` is metadata only,
    but every token attends over the whole pool. Split streams attend over their own cells only (fast under load)."""
    type_k: str = "f16"
    type_v: str = "f16"
    """The KV cache's element types (`KV_TYPES`); a quantized V needs flash attention."""
    swa_full: bool = False
    """Sliding-window layers (Gemma 2 and 3, for instance) keep every cell of a sequence instead of its last window
    (plus a batch): more memory, no gain in what a request can reuse unless it rewinds past the window. Off, as in
    llama.cpp's server; the scheduler then checks what a sequence still holds before reusing its prefix."""
    flash_attention: bool = False
    """Off by default: llama.cpp's CPU flash attention sums in an order that depends on where a sequence's cells lie
    in the cache. In a unified pool that depends on the other sequences, so the same greedy request could answer
    differently under load; a split stream holds one sequence's cells from its start, so there it is safe (and faster).
    Worth it on a GPU."""


KV_TYPES = {"f16": llama.GGML_TYPE_F16, "q8_0": llama.GGML_TYPE_Q8_0}
"""The KV cache types the engine offers (`[limits] kv_cache`), by llama.cpp's type id."""


def _bytes_per_value(kind: str) -> float:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind.upper()]]
    return size / block


class Context:
    """One llama.cpp context serving `n_seq_max` sequences."""

    def __init__(self, model: Model, settings: ContextSettings) -> None:
        params = llama.llama_context_default_params()
        params.n_ctx = settings.n_ctx
        params.n_batch = settings.n_batch
        params.n_ubatch = settings.n_batch
        params.n_seq_max = settings.n_seq_max
        params.n_threads = settings.n_threads
        params.n_threads_batch = settings.n_threads
        params.kv_unified = settings.unified
        if settings.type_v != "f16" and not settings.flash_attention:
            raise ValueError(f"a {settings.type_v} V cache needs flash attention (llama.cpp keeps V f16 without it)")
        params.type_k = KV_TYPES[settings.type_k]
        params.type_v = KV_TYPES[settings.type_v]
        params.no_perf = True
        params.swa_full = settings.swa_full
        params.embeddings = settings.embeddings
        params.flash_attn_type = (
            llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attention else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        if settings.embeddings:
            params.pooling_type = llama.LLAMA_POOLING_TYPE_MEAN
        handle = llama.llama_init_from_model(model.handle, params)
        if not handle:
            raise ModelLoadError(
                f"{model.path}: llama.cpp could not create a context of {settings.n_ctx} cells "
                f"for {settings.n_seq_max} sequences"
            )
        self.model = model
        self.handle = handle
        self.memory = llama.llama_get_memory(handle)
        self.n_ctx: int = llama.llama_n_ctx(handle)
        self.n_ctx_seq: int = llama.llama_n_ctx_seq(handle)
        """Cells one sequence can reach (llama.cpp rounds a stream up to a multiple of 256)."""
        self.n_seq_max: int = llama.llama_n_seq_max(handle)
        self.n_batch: int = llama.llama_n_batch(handle)
        self.embeddings = settings.embeddings
        self.unified = settings.unified
        self.n_swa: int = 0 if settings.swa_full else llama.llama_model_n_swa(model.handle)
        """The attention window of the model's sliding-window layers, whose older cells llama.cpp drops (0: none)."""
        self.kv_bytes_per_cell = model.kv_values_per_cell * (
            _bytes_per_value(settings.type_k) + _bytes_per_value(settings.type_v)
        )
        """Bytes one KV cell takes in this context's cache, at its K and V types."""

    def close(self) -> None:
        if self.handle:
            llama.llama_free(self.handle)
            self.handle = None

    def decode(self, batch: BatchBuffer) -> None:
        rc = llama.llama_decode(self.handle, batch.struct)
        if rc == 0:
            return
        if rc == 1:
            raise KVCacheFullError(f"no room in the KV cache for a batch of {batch.n_tokens} tokens")
        raise DecodeError(f"llama_decode failed with code {rc} on a batch of {batch.n_tokens} tokens")

    def forget(self, seq_id: int, start: int = 0) -> None:
        """Drop a sequence's cells from position `start` on (all of them by default)."""
        llama.llama_memory_seq_rm(self.memory, seq_id, start, -1)

    def first_position(self, seq_id: int) -> int:
        """The lowest position a sequence still holds in every layer (-1 when it holds none): above 0 once a
        sliding-window layer dropped its oldest cells."""
        return llama.llama_memory_seq_pos_min(self.memory, seq_id)

    def share(self, source: int, target: int, length: int) -> None:
        """Make positions [0, length) of `source` the start of `target` (whose own cells are dropped first).

        In a unified pool the cells are shared (metadata only); between split streams llama.cpp copies the whole
        stream, so the tail past `length` is dropped afterwards.
        """
        llama.llama_memory_seq_rm(self.memory, target, -1, -1)
        if self.unified:
            llama.llama_memory_seq_cp(self.memory, source, target, 0, length)
        else:
            llama.llama_memory_seq_cp(self.memory, source, target, -1, -1)
            llama.llama_memory_seq_rm(self.memory, target, length, -1)

    def clear(self) -> None:
        llama.llama_memory_clear(self.memory, True)

    def logits(self, batch_index: int) -> np.ndarray:
        """A copy of the logits the last decode produced at `batch_index` (one float per vocabulary token)."""
        return self.logits_view(batch_index).copy()

    def logits_view(self, batch_index: int) -> np.ndarray:
        """The logits at `batch_index` in llama.cpp's own buffer: valid only until the next decode."""
        pointer = llama.llama_get_logits_ith(self.handle, batch_index)
        if not pointer:
            raise EngineError(f"the context has no logits at batch index {batch_index}")
        return np.ctypeslib.as_array(pointer, shape=(self.model.n_vocab,))

    def sequence_embedding(self, seq_id: int) -> list[float]:
        pointer = llama.llama_get_embeddings_seq(self.handle, seq_id)
        if not pointer:
            raise EngineError("the context produced no pooled embedding")
        return pointer[: self.model.n_embd]


class BatchBuffer:
    """A `llama_batch` over numpy arrays this object owns, reused for every step.

    Owning the arrays (instead of `llama_batch_init`) lets a prompt chunk be written with one vectorised slice
    assignment; each token carries exactly one sequence id, so `seq_id[i]` points at element i of a flat array.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        seq_base = self.seq.ctypes.data
        self._seq_pointers = (ctypes.POINTER(llama.llama_seq_id) * capacity)(
            *(ctypes.cast(seq_base + 4 * i, ctypes.POINTER(llama.llama_seq_id)) for i in range(capacity))
        )
        self.struct = llama.llama_batch()
        self.struct.token = self.token.ctypes.data_as(ctypes.POINTER(llama.llama_token))
        self.struct.embd = ctypes.POINTER(ctypes.c_float)()
        self.struct.pos = self.pos.ctypes.data_as(ctypes.POINTER(llama.llama_pos))
        self.struct.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.struct.seq_id = ctypes.cast(self._seq_pointers, ctypes.POINTER(ctypes.POINTER(llama.llama_seq_id)))
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.n_tokens = 0
        self.n_outputs = 0

    def clear(self) -> None:
        self.n_tokens = 0
        self.n_outputs = 0

    @property
    def room(self) -> int:
        return self.capacity - self.n_tokens

    def add(self, token: int, pos: int, seq_id: int, output: bool) -> int:
        """Append one token; returns its batch index (where its logits are read when `output`)."""
        i = self.n_tokens
        self.token[i] = token
        self.pos[i] = pos
        self.seq[i] = seq_id
        self.logits[i] = output
        self.n_tokens = i + 1
        self.struct.n_tokens = i + 1
        self.n_outputs += output
        return i

    def add_run(self, tokens: list[int], start_pos: int, seq_id: int, *, output_last: bool) -> int:
        """Append a run of one sequence's tokens at consecutive positions; returns the batch index of the last one."""
        i = self.n_tokens
        n = len(tokens)
        end = i + n
        self.token[i:end] = tokens
        self.pos[i:end] = np.arange(start_pos, start_pos + n, dtype=np.int32)
        self.seq[i:end] = seq_id
        self.logits[i:end] = 0
        if output_last:
            self.logits[end - 1] = 1
            self.n_outputs += 1
        self.n_tokens = end
        self.struct.n_tokens = end
        return end - 1
