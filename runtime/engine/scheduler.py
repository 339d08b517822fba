"""The inference loop: one thread owns the llama.cpp context and decodes every running request in one batch per step.

A step has two phases, as in llama.cpp's server: first one token for every generating sequence, then prompt chunks of
newly admitted requests in the room left (chunked prefill, capped while streams run so that a long prompt delays
them by one chunk, not by the whole prompt). One `llama_decode`, then each sequence samples at its own batch index.

With split streams (one KV stream per sequence), llama.cpp computes in one pass only sequences whose ids are
consecutive and appear in the batch in increasing order; any gap starts another pass over all the weights. So the
batch is written in sequence-id order, and a new request is placed where it keeps the running sequences contiguous
(a cached prefix elsewhere is copied in rather than chosen at the price of a gap). A unified pool has no such rule.

A request of n choices evaluates its prompt once: choices 1 .. n-1 wait on sequences of their own until choice 0's
prompt is in the cache, then copy its cells and sample from the same logits, each with its own sampler.

Reproducible requests (seeded ones, and greedy ones where the policy says "seeded-and-greedy") answer the same
whatever ran before or beside them. Sequences never mix within a step's arithmetic, but how a prompt is cut into
chunks does: llama.cpp computes a chunk of k query rows with kernels (flash attention's tiles, matrix products)
whose summation order depends on k, so the same prompt evaluated in one chunk, or in two because its first half was
cached, gives logits that differ in the last bits and, sooner or later, a different token. So a reproducible prompt is always cut at the same places, multiples of the prefill chunk
counted from position 0, whatever else runs; and it reuses cached cells only up to a chunk boundary, and only cells
that were themselves computed in such chunks (`Slot.canonical`). The cost: up to a chunk of tokens computed again
that a free request would reuse, an earlier answer's tokens always computed again in a follow-up, and prompts
evaluated a chunk per step even on an idle engine, each chunk in a step of its own (the streams running pause for
it, as they do for any prompt chunk). A step of a reproducible request's single token is padded with a second one
on an idle sequence, its logits asked for too (dropped after the decode): llama.cpp multiplies a lone row, and
computes a lone output row, with other kernels than two or more, so a request's tokens would otherwise come out
differently alone than beside others. Those kernels are faster (a two-row step of Gemma 3 270M takes about 1.8× a
one-row step here), so a request that asked for no reproducibility is decoded alone unpadded.

Request handlers never touch the context: they submit through `Admission`, read events from their own asyncio queue
(filled here with one `call_soon_threadsafe` per loop per step) and cancel by setting a flag the next step reads.
The next decode waits (briefly) until the loops have taken the step's events (`_await_handover`): on a host without
a spare core, a loop writing tokens during a decode stalls llama.cpp's threads at their barriers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import Future
from dataclasses import dataclass

from sealbox.runtime.engine.admission import Admission
from sealbox.runtime.engine.base import EngineError, EngineUnavailable, Finished, GenerationEvent, TextDelta
from sealbox.runtime.engine.llama_backend import BatchBuffer, Context, KVCacheFullError, Model
from sealbox.runtime.engine.slots import Slot, SlotState
from sealbox.runtime.engine.task import Failed, GenerationTask
from sealbox.runtime.metrics import EngineMetrics

log = logging.getLogger("sealbox.engine")

HANDOVER_WAIT_S = 0.02
"""The longest a step waits for the event loops to take the last step's events (see `Scheduler._await_handover`)."""


@dataclass(frozen=True)
class EmbeddingJob:
    prompts: list[list[int]]
    result: Future[list[list[float]]]


class Scheduler:
    def __init__(
        self,
        *,
        model: Model,
        context: Context,
        admission: Admission,
        n_ctx_per_seq: int,
        prefill_chunk: int,
        metrics: EngineMetrics,
        embedding_context: Context | None = None,
        reproducible_greedy: bool = False,
    ) -> None:
        self.model = model
        self.context = context
        self.admission = admission
        self.n_ctx_per_seq = n_ctx_per_seq
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics
        self.embedding_context = embedding_context
        self.reproducible_greedy = reproducible_greedy
        self.slots = [Slot(i) for i in range(context.n_seq_max)]
        # Between split streams a prefix copy moves a whole stream (reads and writes every cell of it), where
        # computing a prompt token reads every weight: copy when it saves more tokens than the copy costs.
        stream_bytes = context.n_ctx_seq * context.kv_bytes_per_cell
        self.stream_copy_min_tokens = max(1, math.ceil(2 * stream_bytes / max(1, model.size_bytes)))
        """Prompt tokens a copy between split streams must save to be worth it (at least 1)."""
        self.canonical_chunk = max(1, min(prefill_chunk, context.n_batch))
        """The chunk a reproducible prompt is cut into, counted from position 0 (see the module docstring)."""
        self.batch = BatchBuffer(context.n_batch)
        self.step_count = 0
        self.prompt_tokens_decoded = 0
        """Prompt tokens actually computed (prefix reuse keeps this below the prompt tokens submitted)."""
        self.prompt_tokens_reused = 0
        self.failure: BaseException | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._embedding_jobs: deque[EmbeddingJob] = deque()
        self._outbox: list[tuple[GenerationTask, GenerationEvent | Failed]] = []
        self._handed: list[threading.Event] = []

    # -- called from other threads ------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def submit_embeddings(self, job: EmbeddingJob) -> None:
        self._embedding_jobs.append(job)
        self._wake.set()

    def cells_in_use(self) -> int:
        return sum(len(slot.cached) for slot in self.slots if slot.task is not None)

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                self.place_admitted()
                self.run_embeddings()
                if any(slot.task is not None for slot in self.slots):
                    self.step()
                else:
                    self.flush()
                    if not self._embedding_jobs:
                        self._wake.wait()
        except BaseException as exc:  # the loop must not die silently: fail every request it holds
            log.exception("the scheduler failed")
            self.failure = exc
        finally:
            self._shut_down()

    def step(self) -> None:
        self.step_count += 1
        self.batch.clear()
        self.drop_cancelled()
        self.build_batch()
        if self.batch.n_tokens:
            padding = self._pad_lone_token()
            self._await_handover()
            decoded = self.decode()
            if padding is not None:
                self.context.forget(padding.id, len(padding.cached))
            if decoded:
                self.sample_outputs()
        self.flush()

    def _pad_lone_token(self) -> Slot | None:
        """Add a throwaway token on an idle sequence to a batch of one (see the module docstring); the slot used.

        A neighbour of the lone sequence, in sequence-id order, so that split streams still compute in one pass. Its
        cell is always free: a running request holds at most prompt + max_tokens - 1 cells of its reservation (its
        last token is never decoded), and reservations plus idle caches stay within the cache."""
        batch = self.batch
        if batch.n_tokens != 1:
            return None
        seq, token, pos, output = int(batch.seq[0]), int(batch.token[0]), int(batch.pos[0]), bool(batch.logits[0])
        if not self._reproducible(self.slots[seq]):
            return None  # only a reproducible request pays for the padding (a two-row step costs nearly twice one)
        for neighbour in (seq + 1, seq - 1):
            if not 0 <= neighbour < len(self.slots):
                continue
            pad = self.slots[neighbour]
            if pad.task is not None or len(pad.cached) >= self.context.n_ctx_seq:
                continue
            if neighbour < seq:
                batch.clear()
                batch.add(token, len(pad.cached), pad.id, True)
                index = batch.add(token, pos, seq, output)
                if self.slots[seq].output_index >= 0:
                    self.slots[seq].output_index = index
            else:
                batch.add(token, len(pad.cached), pad.id, True)
            return pad
        return None

    # -- placing admitted requests ---------------------------------------------------------------------------------

    def place_admitted(self) -> None:
        ready = self.admission.take_ready()
        if not ready:
            return
        for task in ready:
            if task.cancelled:
                self._end_unplaced(task)
                continue
            self._place(task)
        self._evict_idle_caches()

    def _place(self, task: GenerationTask) -> None:
        """Put a task on an idle slot, reusing the longest cached prefix of its prompt that is worth reusing."""
        prompt = task.prompt_tokens
        limit = len(prompt) - 1  # the last prompt token is always decoded: its logits give the first token
        reproducible = self._reproducible_task(task)
        chunk = self.canonical_chunk

        def usable(slot: Slot) -> int:
            n = min(slot.common_prefix(prompt), limit)
            n = min(n, slot.canonical) // chunk * chunk if reproducible else n
            return self._still_held(slot, n, reproducible=reproducible)

        idle = [slot for slot in self.slots if slot.task is None]
        if self.context.unified:
            # Any sequences batch together: the idle slot already holding the longest prefix, else the least recent.
            target = min(idle, key=lambda slot: (-slot.common_prefix(prompt), slot.last_used))
        else:
            # Keep the busy slots contiguous (a gap costs a pass per step); then the longest prefix, then the lowest id.
            target = min(idle, key=lambda slot: (self._gaps_added(slot), -slot.common_prefix(prompt), slot.id))
        leader = self._prefilling_slot(task.leader) if task.leader is not None else None
        if leader is not None:
            # A further choice of a prompt still being evaluated: wait for it, then copy its cells (`_fork`).
            self.context.forget(target.id)
            target.cached.clear()
            target.assign(task, 0, self.step_count)
            target.follows = leader
            self.metrics.prompt_tokens.inc(len(prompt))
            return
        reuse = usable(target)
        source, source_n = None, reuse
        for slot in self.slots:
            if slot is not target:
                n = usable(slot)
                if n > source_n:
                    source, source_n = slot, n
        if source is not None and (self.context.unified or source_n - reuse >= self.stream_copy_min_tokens):
            # Another sequence (running or idle) holds a longer prefix: copy it in.
            reuse = source_n
            self.context.share(source.id, target.id, reuse)
            target.cached[:] = prompt[:reuse]
            target.canonical = min(source.canonical, reuse)
        else:
            self.context.forget(target.id, reuse)
        target.assign(task, reuse, self.step_count)
        self.prompt_tokens_reused += reuse
        self.metrics.prompt_tokens.inc(len(prompt))
        if reuse:
            self.metrics.prompt_tokens_reused.inc(reuse)

    def _still_held(self, slot: Slot, n: int, *, reproducible: bool) -> int:
        """`n` if the first `n` cached positions of `slot` can be continued from, else 0.

        A sliding-window layer keeps only a sequence's last window of cells. Continuing at position n needs the
        window before n: gone if the sequence ran further past n and its oldest cells were dropped. A reproducible
        request needs more: that nothing was ever dropped, since a wrapped window lays cells out in another order
        than evaluating the prompt afresh does, and flash attention sums them in that order."""
        if not n or not self.context.n_swa:
            return n
        first = self.context.first_position(slot.id)
        if first <= 0:
            return n
        if reproducible:
            return 0
        return n if first <= n - self.context.n_swa else 0

    def _prefilling_slot(self, task: GenerationTask) -> Slot | None:
        """The slot evaluating `task`'s prompt, or None once it has (or if it never got one)."""
        for slot in self.slots:
            if slot.task is task and slot.state is SlotState.PREFILL and slot.follows is None:
                return slot
        return None

    def _gaps_added(self, slot: Slot) -> int:
        """How many more runs of consecutive busy slots there are once `slot` is busy: 1, 0, or -1 (a gap closed)."""
        slots = self.slots
        left = slot.id > 0 and slots[slot.id - 1].task is not None
        right = slot.id + 1 < len(slots) and slots[slot.id + 1].task is not None
        return 1 - left - right

    def _evict_idle_caches(self) -> None:
        """Keep reservations + idle caches within the cache size, dropping the least recently used idle caches.

        Admission reserves prompt + max_tokens for every running request, so with this invariant a decode never
        finds the cache full.
        """
        idle = sorted((slot for slot in self.slots if slot.task is None and slot.cached), key=lambda s: s.last_used)
        excess = self.admission.reserved_cells + sum(len(slot.cached) for slot in idle) - self.context.n_ctx
        for slot in idle:
            if excess <= 0:
                break
            excess -= len(slot.cached)
            self.context.forget(slot.id)
            slot.cached.clear()

    # -- building the batch -------------------------------------------------------------------------------------------

    def drop_cancelled(self) -> None:
        for slot in self.slots:
            task = slot.task
            if task is not None and task.cancelled:
                self.context.forget(slot.id)
                slot.cached.clear()
                self._finish(slot, "cancelled")

    def build_batch(self) -> None:
        """One token for every generating sequence, and prompt chunks in the room left, written in sequence-id order.

        The prompt budget goes to the earliest admitted first; the order in the batch is by sequence id regardless,
        so that llama.cpp can compute consecutive sequences in one pass (see the module docstring).
        """
        slots = self.slots
        for slot in slots:
            leader = slot.follows
            if leader is not None and (leader.task is None or leader.task is not slot.task.leader  # type: ignore[union-attr]
                                       or leader.state is not SlotState.PREFILL):  # fmt: skip
                slot.follows = None  # its leader is gone before evaluating the prompt: evaluate it here
        generating = sum(slot.pending >= 0 for slot in slots)
        chunks, alone = self._prompt_chunk_sizes(self.batch.room - generating, streams_running=generating > 0)
        batch = self.batch
        for slot in slots:
            token = slot.pending
            if token >= 0 and not alone:
                cached = slot.cached
                slot.output_index = batch.add(token, len(cached), slot.id, True)
                cached.append(token)
                slot.pending = -1
                continue
            n = chunks.get(slot.id, 0)
            if n:
                start = len(slot.cached)
                chunk = slot.prompt[start : start + n]
                last = start + n == len(slot.prompt)
                index = batch.add_run(chunk, start, slot.id, output_last=last)
                if last:
                    slot.output_index = index
                slot.cached.extend(chunk)
                end = start + n
                if slot.canonical == start and end % self.canonical_chunk == 0 and self._reproducible(slot):
                    slot.canonical = end
                self.prompt_tokens_decoded += n

    def _prompt_chunk_sizes(self, room: int, *, streams_running: bool) -> tuple[dict[int, int], bool]:
        """Prompt tokens each prefilling slot adds this step: the earliest admitted first, within `room` (and within
        the prefill chunk while streams run, to bound how long this step makes them wait); and whether the step is a
        reproducible request's canonical chunk alone.

        A reproducible chunk is decoded alone because llama.cpp splits a batch over split streams into micro-batches
        of as many tokens per sequence as the shortest run has: beside another sequence's tokens the chunk would be
        cut again, wherever the other's run ends."""
        prefilling = [slot for slot in self.slots
                      if slot.state is SlotState.PREFILL and slot.output_index < 0 and slot.follows is None]  # fmt: skip
        if not prefilling:
            return {}, False
        prefilling.sort(key=lambda slot: slot.task.admitted_at)  # type: ignore[union-attr]
        budget = min(room, self.prefill_chunk) if streams_running else room
        chunk = self.canonical_chunk
        sizes: dict[int, int] = {}
        for slot in prefilling:
            start = len(slot.cached)
            if self._reproducible(slot):
                if sizes:
                    continue  # its chunk goes alone, in a step of its own
                return {slot.id: min(len(slot.prompt) - start, chunk - start % chunk)}, True
            if budget <= 0:
                continue  # no room left for free chunks; a reproducible one further on may still go alone
            n = min(len(slot.prompt) - start, budget)
            sizes[slot.id] = n
            budget -= n
        return sizes, False

    def _reproducible(self, slot: Slot) -> bool:
        return slot.task is not None and self._reproducible_task(slot.task)

    def _reproducible_task(self, task: GenerationTask) -> bool:
        return task.request.sampling.reproducible(greedy_too=self.reproducible_greedy)

    # -- decoding and sampling ----------------------------------------------------------------------------------------

    def decode(self) -> bool:
        try:
            self.context.decode(self.batch)
            return True
        except KVCacheFullError:
            # Cannot happen while the reservation invariant holds; recover by dropping every idle cache once.
            log.warning("KV cache full with %d cells reserved; dropping idle caches", self.admission.reserved_cells)
            for slot in self.slots:
                if slot.task is None and slot.cached:
                    self.context.forget(slot.id)
                    slot.cached.clear()
            try:
                self.context.decode(self.batch)
                return True
            except EngineError as exc:
                self._fail_batch(exc)
        except EngineError as exc:
            self._fail_batch(exc)
        return False

    def sample_outputs(self) -> None:
        now = time.monotonic()
        model = self.model
        context = self.context
        metrics = self.metrics
        outbox = self._outbox
        sampled = 0
        self._fork()
        for slot in self.slots:
            index = slot.output_index
            if index < 0:
                continue
            slot.output_index = -1
            task = slot.task
            assert task is not None
            slot.state = SlotState.GENERATING
            token = task.sampler.sample(context, index)
            logprob = task.sampler.logprob(context, index, token) if task.sampler.wants_logprobs else None
            sampled += 1
            if slot.generated == 0:
                slot.first_token_at = now
                metrics.time_to_first_token.observe(now - task.submitted_at)
            else:
                metrics.inter_token.observe(now - slot.last_token_at)
            slot.last_token_at = now
            slot.generated += 1
            if model.is_eog(token):
                self._finish(slot, "stop")
                continue
            text = slot.text.feed(model.piece(token))
            if text or logprob is not None:
                outbox.append((task, TextDelta(text, task.index, (logprob,) if logprob is not None else ())))
            if slot.text.stopped:
                self._finish(slot, "stop")
            elif slot.generated >= task.request.max_tokens or len(slot.cached) >= self.n_ctx_per_seq:
                self._finish(slot, "length")
            else:
                slot.pending = token
        if sampled:
            metrics.generated_tokens.inc(sampled)

    def _fork(self) -> None:
        """Give every choice waiting on a prompt that this step finished evaluating a copy of its cells, and the
        same logits to sample from."""
        for slot in self.slots:
            leader = slot.follows
            if leader is None or leader.output_index < 0:
                continue
            n = len(leader.cached)
            self.context.share(leader.id, slot.id, n)
            slot.cached[:] = leader.cached
            slot.canonical = leader.canonical
            slot.follows = None
            slot.output_index = leader.output_index
            self.prompt_tokens_reused += n
            self.metrics.prompt_tokens_reused.inc(n)

    # -- finishing ------------------------------------------------------------------------------------------------------

    def _finish(self, slot: Slot, reason: str) -> None:
        task = slot.release(self.step_count)
        if reason != "cancelled":
            tail = slot.text.finish()
            if tail:
                self._outbox.append((task, TextDelta(tail, task.index)))
        finished = Finished(reason, prompt_tokens=len(task.prompt_tokens), completion_tokens=slot.generated,  # type: ignore[arg-type]
                            index=task.index)  # fmt: skip
        self._outbox.append((task, finished))
        self._end(task, reason)

    def _end(self, task: GenerationTask, status: str) -> None:
        task.done = True
        task.sampler.free()
        self.admission.release(task)
        if task.index == 0:  # a request of n choices ends once, as its first choice ends
            self.metrics.finished(status)

    def _end_unplaced(self, task: GenerationTask) -> None:
        self._outbox.append(
            (task, Finished("cancelled", prompt_tokens=len(task.prompt_tokens), completion_tokens=0, index=task.index))
        )
        self._end(task, "cancelled")

    def _fail_batch(self, error: EngineError) -> None:
        """A decode failed: the sequences in the batch may be half-written, so drop them and fail their requests."""
        log.error("decode failed: %s", error)
        in_batch = set(int(seq) for seq in self.batch.seq[: self.batch.n_tokens])
        for slot in self.slots:
            if slot.id in in_batch:
                self.context.forget(slot.id)
                slot.cached.clear()
                if slot.task is not None:
                    task = slot.release(self.step_count)
                    self._outbox.append((task, Failed(error)))
                    self._end(task, "error")

    def flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop, not one per token."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationTask, GenerationEvent | Failed]]]
        by_loop = defaultdict(list)
        for item in self._outbox:
            by_loop[item[0].loop].append(item)
        self._outbox = []
        for loop, items in by_loop.items():
            handed = threading.Event()
            try:
                loop.call_soon_threadsafe(_deliver, items, handed)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                for task, _ in items:
                    task.cancelled = True
                continue
            if loop.is_running():  # a loop stopped for good must not hold every step up
                self._handed.append(handed)

    def _await_handover(self) -> None:
        """Let the event loops write out the last step's tokens before the next decode starts (bounded).

        llama.cpp's threads meet at hundreds of barriers per decode; an event loop that runs beside them on a host with
        no spare core takes one thread's core, and its partner waits at the next barrier for as long as the loop runs.
        The same work done between decodes costs only itself."""
        deadline = time.monotonic() + HANDOVER_WAIT_S
        for handed in self._handed:
            if not handed.wait(max(0.0, deadline - time.monotonic())):
                break
        self._handed.clear()

    # -- embeddings ------------------------------------------------------------------------------------------------------

    def run_embeddings(self) -> None:
        while self._embedding_jobs:
            job = self._embedding_jobs.popleft()
            if job.result.set_running_or_notify_cancel():
                try:
                    job.result.set_result([self._embed(tokens) for tokens in job.prompts])
                except EngineError as exc:
                    job.result.set_exception(exc)

    def _embed(self, tokens: list[int]) -> list[float]:
        context = self.embedding_context
        if context is None:
            raise EngineUnavailable("this engine was started without embeddings")
        batch = BatchBuffer(max(1, len(tokens)))
        batch.add_run(tokens, 0, 0, output_last=True)
        batch.logits[: len(tokens)] = 1  # mean pooling reads every token's output
        context.clear()
        context.decode(batch)
        vector = context.sequence_embedding(0)
        norm = math.sqrt(sum(x * x for x in vector)) or 1.0
        return [x / norm for x in vector]

    # -- shutdown ---------------------------------------------------------------------------------------------------------

    def _shut_down(self) -> None:
        error = EngineUnavailable(
            "the engine stopped" if self.failure is None else f"the engine failed: {self.failure}"
        )
        for slot in self.slots:
            if slot.task is not None:
                task = slot.release(self.step_count)
                self._outbox.append((task, Failed(error)))
                self._end(task, "error")
        for task in self.admission.close():
            self._outbox.append((task, Failed(error)))  # type: ignore[arg-type]
            task.done = True  # type: ignore[attr-defined]
            task.sampler.free()  # type: ignore[attr-defined]
            if task.index == 0:  # type: ignore[attr-defined]
                self.metrics.finished("error")
        while self._embedding_jobs:
            job = self._embedding_jobs.popleft()
            if job.result.set_running_or_notify_cancel():
                job.result.set_exception(error)
        self.flush()


def _deliver(items: list[tuple[GenerationTask, GenerationEvent | Failed]], handed: threading.Event) -> None:
    for task, event in items:
        task.events.put_nowait(event)
    # The readers these events wake run in the loop's next pass; `handed` is set in the pass after that.
    loop = asyncio.get_running_loop()
    loop.call_soon(loop.call_soon, handed.set)

