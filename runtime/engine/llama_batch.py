"""`LlamaBatchEngine`: llama.cpp in-process with continuous batching, behind the `Engine` seam.

Many requests share one context: each gets a KV sequence of its own and is decoded together with the others in one
batch per step (see `scheduler`). Requests are admitted by free sequences and KV cells (see `admission`); a request
that can never fit is refused at once, one that cannot fit now waits in a bounded queue, and a full queue answers
`Overloaded` with a Retry-After.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import replace
from collections.abc import AsyncIterator
from concurrent.futures import Future
from pathlib import Path

from sealbox.runtime import metrics
from sealbox.runtime.engine.admission import Admission
from sealbox.runtime.engine.base import (
    ContextLengthExceeded,
    Embeddings,
    EngineStats,
    EngineUnavailable,
    Finished,
    GenerationEvent,
    GenerationRequest,
    ModelCard,
    Overloaded,
)
from sealbox.runtime.engine.base import InvalidRequest
from sealbox.runtime.engine.event_stream import EventStream
from sealbox.runtime.engine.llama_backend import Context, ContextSettings, Model, ModelLoadError
from sealbox.runtime.engine.sampling import SamplerChain
from sealbox.runtime.engine.scheduler import EmbeddingJob, Scheduler
from sealbox.runtime.engine.task import Failed, GenerationTask

DEFAULT_BATCH = 512
"""Tokens decoded per step at most (prompt chunks and one token per running stream)."""
DEFAULT_PREFILL_CHUNK = 512
"""Prompt tokens added to a step while streams are running: bounds the pause a new prompt causes them. One
llama.cpp micro-batch (n_ubatch = n_batch): at 128 a 2k-token prompt was prefilled 35% slower on this CPU (matrix
products over fewer rows), and a reproducible prompt is always cut at these boundaries."""


class LlamaBatchEngine:
    def __init__(
        self,
        model_path: Path,
        card: ModelCard,
        *,
        n_seq_max: int,
        n_ctx_per_seq: int,
        queue_size: int,
        n_gpu_layers: int = 0,
        extra_buffers: bool = True,
        n_threads: int | None = None,
        embeddings: bool = False,
        kv_cells: int | None = None,
        n_batch: int = DEFAULT_BATCH,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        flash_attention: bool | None = None,
        type_k: str = "f16",
        type_v: str = "f16",
        reproducible_greedy: bool = False,
    ) -> None:
        """`kv_cells`: the KV budget in cells (default n_seq_max × n_ctx_per_seq: every sequence can reach its full
        context at once). A smaller budget from `runtime.memory_plan` puts all sequences in one shared pool and makes
        admission hold requests back until their prompt + max_tokens fits, rather than the host run out of memory.
        `flash_attention`: None leaves it on for split streams and off in a unified pool; True or False as given
        (the memory plan passes what the calibration measured fastest). Either is reproducible with split streams:
        a sequence's cells fill its own stream from the start, in the order they were written, so its sums run in
        the same order alone or under load. In a pool a sequence's cells lie wherever the others left room, so
        there flash attention stays off on the CPU, where a greedy request could otherwise answer differently under
        load (see `ContextSettings`); the plan turns it on for GPU offload.
        `type_k`, `type_v`: the KV cache's element types (f16, q8_0); a q8_0 V needs flash attention, so not in a
        unified pool on the CPU (`runtime.memory_plan.plan_model` plans V as f16 there).
        `reproducible_greedy`: greedy requests are reproducible as seeded ones are (see `Scheduler`)."""
        if n_seq_max < 1 or n_ctx_per_seq < 2 or queue_size < 0:
            raise ValueError("n_seq_max ≥ 1, n_ctx_per_seq ≥ 2 and queue_size ≥ 0 are required")
        self.model_path = model_path
        self.card = card
        self.n_seq_max = n_seq_max
        self.n_ctx_per_seq = n_ctx_per_seq
        self.queue_size = queue_size
        self.n_gpu_layers = n_gpu_layers
        self.extra_buffers = extra_buffers
        self.n_threads = n_threads or os.cpu_count() or 1
        self.embeddings = embeddings
        full = n_seq_max * n_ctx_per_seq
        self.kv_cells = min(kv_cells, full) if kv_cells is not None else full
        if self.kv_cells < n_ctx_per_seq:
            raise ValueError(f"kv_cells ({self.kv_cells}) must hold at least one full sequence ({n_ctx_per_seq})")
        # Memory for every sequence at full context: one stream per sequence, each attending over its own cells only.
        # Less: one pool shared by all (admission makes requests wait for cells), at the price of every token
        # attending over the whole pool.
        self.unified = self.kv_cells < full
        self.n_batch = max(n_batch, n_seq_max)
        self.prefill_chunk = prefill_chunk
        self.flash_attention = (not self.unified) if flash_attention is None else flash_attention
        if type_v != "f16" and not self.flash_attention:
            raise ValueError(f"a {type_v} V cache needs flash attention, which is off in a unified pool on the CPU")
        self.type_k, self.type_v = type_k, type_v
        self.reproducible_greedy = reproducible_greedy
        self._metrics = metrics.EngineMetrics(card.name)
        self._model: Model | None = None
        self._context: Context | None = None
        self._embedding_context: Context | None = None
        self._admission: Admission | None = None
        self._scheduler: Scheduler | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            return
        await asyncio.to_thread(self._load)
        assert self._scheduler is not None
        self._thread = threading.Thread(target=self._scheduler.run, name=f"sealbox-engine-{self.card.name}", daemon=True)
        self._thread.start()
        metrics.track_engine(self.card.name, self)

    def _load(self) -> None:
        model = Model(self.model_path, n_gpu_layers=self.n_gpu_layers, extra_buffers=self.extra_buffers)
        self.card = replace(self.card, bos_token=model.bos_text, eos_token=model.eos_text)
        context: Context | None = None
        embedding_context: Context | None = None
        try:
            context = Context(
                model,
                ContextSettings(
                    n_ctx=self.kv_cells,
                    n_seq_max=self.n_seq_max,
                    n_batch=self.n_batch,
                    n_threads=self.n_threads,
                    flash_attention=self.flash_attention,
                    unified=self.unified,
                    type_k=self.type_k,
                    type_v=self.type_v,
                ),
            )
            if context.n_ctx_seq < self.n_ctx_per_seq:
                raise ModelLoadError(
                    f"{self.model_path}: llama.cpp gave a sequence {context.n_ctx_seq} cells, "
                    f"{self.n_ctx_per_seq} were asked for"
                )
            if self.embeddings:
                embedding_context = Context(
                    model,
                    ContextSettings(
                        n_ctx=self.n_ctx_per_seq,
                        n_seq_max=1,
                        n_batch=self.n_ctx_per_seq,
                        n_threads=self.n_threads,
                        embeddings=True,
                    ),
                )
        except BaseException:
            for built in (embedding_context, context):
                if built is not None:
                    built.close()
            model.close()
            raise
        admission = Admission(slots=context.n_seq_max, cells=context.n_ctx, queue_size=self.queue_size)
        self._model, self._context, self._embedding_context, self._admission = (
            model,
            context,
            embedding_context,
            admission,
        )
        self._scheduler = Scheduler(
            model=model,
            context=context,
            admission=admission,
            n_ctx_per_seq=self.n_ctx_per_seq,
            prefill_chunk=self.prefill_chunk,
            reproducible_greedy=self.reproducible_greedy,
            metrics=self._metrics,
            embedding_context=embedding_context,
        )

    async def stop(self) -> None:
        if self._thread is None or self._scheduler is None:
            return
        self._scheduler.stop()
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        for context in (self._embedding_context, self._context):
            if context is not None:
                context.close()
        if self._model is not None:
            self._model.close()
        self._model = self._context = self._embedding_context = None

    # -- the seam -----------------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return self._running_model().tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        """Raises InvalidRequest for a token id outside the vocabulary."""
        model = self._running_model()
        model.check_tokens(tokens, "the input")
        return b"".join(model.piece(token) for token in tokens).decode("utf-8", "replace")

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Admit `request` now or queue it, and return its event stream.

        Raises (at once, before any event):
            ContextLengthExceeded: prompt + max_tokens exceeds one sequence's context (or the whole KV cache).
            Overloaded: the admission queue is full; `retry_after_s` says when to come back.
            InvalidRequest: an empty prompt or a grammar that does not parse.
            EngineUnavailable: the engine is not running.
        """
        model = self._running_model()
        admission, scheduler = self._admission, self._scheduler
        assert admission is not None and scheduler is not None
        n_prompt = len(request.prompt_tokens)
        if n_prompt == 0:
            self._metrics.rejected("invalid")
            raise InvalidRequest("the prompt is empty")
        if request.max_tokens < 0:
            self._metrics.rejected("invalid")
            raise InvalidRequest(f"max_tokens must not be negative (got {request.max_tokens})")
        needed = n_prompt + request.max_tokens
        if needed > self.n_ctx_per_seq:
            self._metrics.rejected("context_length")
            raise ContextLengthExceeded(
                f"the prompt ({n_prompt} tokens) plus max_tokens ({request.max_tokens}) needs {needed} tokens; "
                f"this model's context holds {self.n_ctx_per_seq}",
                needed=needed,
                limit=self.n_ctx_per_seq,
            )
        try:
            model.check_tokens(request.prompt_tokens, "the prompt")
        except InvalidRequest:
            self._metrics.rejected("invalid")
            raise
        try:
            self._check_choices(request, model)
        except InvalidRequest:
            self._metrics.rejected("invalid")
            raise
        loop = asyncio.get_running_loop()
        if request.max_tokens == 0:
            return _finished_at_once(n_prompt, request.n)
        events: asyncio.Queue[GenerationEvent | Failed] = asyncio.Queue()
        tasks: list[GenerationTask] = []
        try:
            for index in range(request.n):
                sampling = request.sampling
                if index and sampling.seed is not None:
                    sampling = replace(sampling, seed=(sampling.seed + index) & 0xFFFFFFFF)
                sampler = SamplerChain(model, sampling, request.prompt_tokens, logprobs=request.logprobs)
                tasks.append(GenerationTask(request=request, sampler=sampler, loop=loop, events=events, cells=needed,
                                            index=index, leader=tasks[0] if tasks else None))  # fmt: skip
            admitted = admission.submit_all(tasks)
        except (InvalidRequest, Overloaded, ContextLengthExceeded) as exc:
            for task in tasks:
                task.sampler.free()
            self._metrics.rejected(_REJECTIONS.get(type(exc), "invalid"))
            raise
        if any(admitted):
            scheduler.wake()
        return EventStream(tasks, self._cancel)

    def _check_choices(self, request: GenerationRequest, model: Model) -> None:
        """Refuse what the sampler would otherwise take as given: an n below 1, a biased token outside the
        vocabulary (llama.cpp would read past its logits), a negative count of alternatives."""
        if request.n < 1:
            raise InvalidRequest(f"n must be at least 1 (got {request.n})")
        if request.logprobs is not None and request.logprobs < 0:
            raise InvalidRequest(f"the number of top logprobs must not be negative (got {request.logprobs})")
        model.check_tokens([token for token, _ in request.sampling.logit_bias], "logit_bias")

    def _cancel(self, task: GenerationTask) -> None:
        if task.done:
            return
        task.cancelled = True
        admission, scheduler = self._admission, self._scheduler
        if admission is not None and admission.withdraw(task):
            task.done = True
            task.sampler.free()
            if task.index == 0:  # a request of n choices ends once
                self._metrics.finished("cancelled")
        elif scheduler is not None:
            scheduler.wake()

    async def embed(self, texts: list[str]) -> Embeddings:
        model = self._running_model()
        scheduler = self._scheduler
        assert scheduler is not None
        if not self.embeddings:
            raise InvalidRequest(f"model {self.card.name} is not served for embeddings")
        prompts = []
        for i, text in enumerate(texts):
            tokens = model.tokenize(text, add_bos=True, special=False)
            if not tokens:
                raise InvalidRequest(f"input {i} is empty")
            if len(tokens) > self.n_ctx_per_seq:
                raise ContextLengthExceeded(
                    f"input {i} has {len(tokens)} tokens; this model's context holds {self.n_ctx_per_seq}",
                    needed=len(tokens),
                    limit=self.n_ctx_per_seq,
                )
            prompts.append(tokens)
        result: Future[list[list[float]]] = Future()
        scheduler.submit_embeddings(EmbeddingJob(prompts, result))
        vectors = await asyncio.wrap_future(result)
        return Embeddings(vectors, prompt_tokens=sum(len(tokens) for tokens in prompts))

    def stats(self) -> EngineStats:
        admission, scheduler = self._admission, self._scheduler
        if admission is None or scheduler is None:
            return EngineStats(running=0, queued=0, kv_cells_used=0, kv_cells_total=0, sequences_total=self.n_seq_max)
        return EngineStats(
            running=admission.admitted,
            queued=admission.waiting,
            kv_cells_used=scheduler.cells_in_use(),
            kv_cells_total=admission.cells,
            sequences_total=admission.slots,
        )

    @property
    def prompt_tokens_decoded(self) -> int:
        """Prompt tokens computed since start; prefix reuse keeps it below the prompt tokens submitted."""
        return self._scheduler.prompt_tokens_decoded if self._scheduler is not None else 0

    @property
    def prompt_tokens_reused(self) -> int:
        """Prompt tokens found already in the cache since start (not computed again)."""
        return self._scheduler.prompt_tokens_reused if self._scheduler is not None else 0

    def _running_model(self) -> Model:
        if self._model is None or self._thread is None:
            raise EngineUnavailable(f"the engine for {self.card.name} is not running")
        scheduler = self._scheduler
        if scheduler is not None and scheduler.failure is not None:
            raise EngineUnavailable(f"the engine for {self.card.name} failed: {scheduler.failure}")
        return self._model


_REJECTIONS: dict[type[Exception], str] = {Overloaded: "overloaded", ContextLengthExceeded: "context_length"}


async def _finished_at_once(n_prompt: int, n: int) -> AsyncIterator[GenerationEvent]:
    for index in range(n):
        yield Finished("length", prompt_tokens=n_prompt, completion_tokens=0, index=index)
