"""The models one server serves: found in the active release (or given with `--model`), proven, sized, started.

A model is served only after three checks, each of which can fail without taking the others down: its bytes hash
to the sha256 the release names (the audit log records that digest for every request, so it must be true), a child
process loads it (llama.cpp aborts the whole process on some malformed files), and the memory plan finds room for
at least one sequence. A model that fails is listed in `/ready` with the reason; the rest are served.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from sealbox.runtime.engine import Engine, EngineLoadError, EngineOptions, ModelCard, open_engine
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.memory_plan import MemoryPlanError, gpu_free_bytes, plan_for_policy
from sealbox.runtime.models.builtin_templates import template_for
from sealbox.runtime.models.calibration import CalibrationError, KernelChoice, candidates_for
from sealbox.runtime.models.calibration import choose as choose_kernels
from sealbox.runtime.models.gguf_facts import ModelFile, ModelFileError, read_model_file
from sealbox.runtime.models.probe import probe_model
from sealbox.runtime.policy import LimitsPolicy, Policy
from sealbox.runtime.release import ReleaseFileError, current_directory, read_record
from sealbox.runtime.server.chat_template import ChatTemplate, ChatTemplateError

log = logging.getLogger("sealbox.models")

HASH_CHUNK = 8 << 20


class ReleaseError(Exception):
    """There is no active release to serve, or its `release.json` cannot be read."""


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: Path
    sha256: str | None
    """The digest the release promises; None for a `--model` file (its digest is taken at start)."""
    license: str | None = None
    """The license the signed manifest states for the model (release.json), shown by `/v1/models` and the doctor."""
    origin: str | None = None
    """Where its bytes came from: `hf://…@commit`, `ollama://…@sha256:…`, or the publisher's local path."""


@dataclass(frozen=True)
class ActiveRelease:
    directory: Path
    name: str
    version: int
    models: tuple[ModelSource, ...]
    policy_path: Path

    @property
    def label(self) -> str:
        return f"{self.name}-{self.version}"

    @classmethod
    def load(cls, root: HostRoot) -> ActiveRelease:
        """The release `<root>/current` points at, as its `release.json` describes it.

        Raises:
            ReleaseError: no active release, or an unreadable release record.
        """
        try:
            directory = current_directory(root)
            record = read_record(directory)
        except ReleaseFileError as exc:
            raise ReleaseError(f"{exc} (install a bundle, or pass --model)") from exc
        models = tuple(ModelSource(m.name, directory / m.path, m.sha256, m.license, m.origin) for m in record.models)
        return cls(directory, record.name, record.version, models, directory / record.policy)


@dataclass(frozen=True)
class ServedModel:
    """A model that passed its checks and whose engine is running: what a request is served by."""

    source: ModelSource
    sha256: str
    engine: Engine
    embeddings: bool
    context: int
    sequences: int
    gpu_layers: int
    template: ChatTemplate | None = None
    """The chat template, compiled once when the model starts; None with `template_problem` when it does not compile."""
    template_problem: str | None = None
    ready: ClassVar[bool] = True
    problem: ClassVar[None] = None

    @property
    def name(self) -> str:
        return self.source.name


@dataclass(frozen=True)
class FailedModel:
    """A model that is not served, and why (listed in `/ready`; a request for it is a 503 naming the problem)."""

    source: ModelSource
    problem: str
    sha256: str = ""
    """The file's digest, when it was taken before the model failed (the audit record names it)."""
    ready: ClassVar[bool] = False
    embeddings: ClassVar[bool] = False
    context: ClassVar[int] = 0
    sequences: ClassVar[int] = 0
    gpu_layers: ClassVar[int] = 0

    @property
    def name(self) -> str:
        return self.source.name


@dataclass
class ModelRegistry:
    models: dict[str, ServedModel | FailedModel] = field(default_factory=dict)

    def get(self, name: str) -> ServedModel | FailedModel | None:
        return self.models.get(name)

    @property
    def ready(self) -> list[ServedModel]:
        return [model for model in self.models.values() if isinstance(model, ServedModel)]

    @property
    def failed(self) -> list[FailedModel]:
        return [model for model in self.models.values() if isinstance(model, FailedModel)]

    async def start(self, sources: list[ModelSource], policy: Policy, *, threads: int | None = None,
                    calibration_dir: Path | None = None) -> None:  # fmt: skip
        """Check and start every model; a failure is kept as the model's `problem`, never raised."""
        for source in sources:
            digest = _Digest()
            try:
                self.models[source.name] = await _start(source, policy.limits, digest, threads=threads,
                                                        calibration_dir=calibration_dir)  # fmt: skip
            except _Refused as exc:
                self.models[source.name] = FailedModel(source, str(exc), digest.value)
                log.error("model %s is not served: %s", source.name, exc)
            except Exception as exc:  # a file the checks let through and something else refused: still one model only
                self.models[source.name] = FailedModel(source, f"{source.path}: cannot be served: {exc}", digest.value)
                log.exception("model %s is not served", source.name)

    async def stop(self) -> None:
        for model in self.ready:
            await model.engine.stop()


@dataclass
class _Digest:
    """The file's sha256 once taken: kept for the failed model's record when a later check refuses it."""

    value: str = ""


class _Refused(Exception):
    pass


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


async def _start(source: ModelSource, limits: LimitsPolicy, digest: _Digest, *, threads: int | None,
                 calibration_dir: Path | None = None) -> ServedModel:  # fmt: skip
    """Prove, size and start one model. The GGUF header is read once, here; the probe, the memory plan and the chat
    template take what it says."""
    try:
        digest.value = await asyncio.to_thread(file_sha256, source.path)
    except OSError as exc:
        raise _Refused(f"{source.path}: cannot read: {exc.strerror}") from exc
    if source.sha256 is not None and digest.value != source.sha256:
        raise _Refused(
            f"{source.path}: sha256 {digest.value} does not match the release's {source.sha256} (the file was changed)"
        )
    try:
        model_file = await asyncio.to_thread(read_model_file, source.path)
    except ModelFileError as exc:
        raise _Refused(str(exc)) from exc
    probe = await asyncio.to_thread(probe_model, source.path, facts=model_file.facts)
    if not probe.ok:
        raise _Refused(probe.reason)
    if not probe.extra_buffers:
        log.warning("%s", probe.reason)
    try:
        gpu_bytes = await asyncio.to_thread(gpu_free_bytes)
        plan = plan_for_policy(source.path, limits, model_file=model_file, gpu_memory_bytes=gpu_bytes, detect_gpu=False)
        if plan.gpu_layers == 0:  # on the CPU, the KV cache type and attention kernel are measured (the probe is CPU-only)
            kernels = await asyncio.to_thread(_kernels, source, limits, digest.value, model_file, probe.extra_buffers,
                                              threads, calibration_dir)  # fmt: skip
            plan = plan_for_policy(source.path, limits, model_file=model_file, gpu_memory_bytes=gpu_bytes,
                                   detect_gpu=False, kernels=kernels)  # fmt: skip
        sizing = plan.engine_sizing()
    except (ModelFileError, MemoryPlanError) as exc:
        raise _Refused(str(exc)) from exc
    embeddings = model_file.facts.pooling_type is not None
    card = ModelCard(
        name=source.name,
        sha256=digest.value,
        n_ctx=sizing.n_ctx_per_seq,
        embeddings=embeddings,
        # A GGUF without a template gets its architecture's: only its own turn format makes the model stop.
        chat_template=model_file.chat_template or template_for(model_file.header.metadata).source,
    )
    engine = open_engine(
        source.path,
        card,
        EngineOptions(
            n_seq_max=sizing.n_seq_max,
            n_ctx_per_seq=sizing.n_ctx_per_seq,
            kv_cells=sizing.kv_cells,
            queue_size=limits.queue_size,
            n_gpu_layers=sizing.n_gpu_layers,
            n_threads=threads,
            embeddings=embeddings,
            flash_attention=sizing.flash_attention,
            extra_buffers=probe.extra_buffers,
            type_k=sizing.type_k,
            type_v=sizing.type_v,
            reproducible_greedy=limits.reproducible == "seeded-and-greedy",
        ),
    )
    try:
        await engine.start()
    except EngineLoadError as exc:
        raise _Refused(str(exc)) from exc
    log.info(
        "serving %s (%s): %d sequences × %d tokens, %d KV cells (K %s, V %s), %d GPU layers, flash attention %s; "
        "reproducible: %s requests",
        source.name, digest.value[:12], sizing.n_seq_max, sizing.n_ctx_per_seq, sizing.kv_cells, sizing.type_k,
        sizing.type_v, sizing.n_gpu_layers, "on" if sizing.flash_attention else "off", limits.reproducible,
    )  # fmt: skip
    template, template_problem = await asyncio.to_thread(_compile_template, source.name, engine.card)
    return ServedModel(source, digest.value, engine, embeddings=embeddings, context=sizing.n_ctx_per_seq,
                       sequences=sizing.n_seq_max, gpu_layers=sizing.n_gpu_layers, template=template,
                       template_problem=template_problem)  # fmt: skip


def _kernels(source: ModelSource, limits: LimitsPolicy, sha256: str, model_file: ModelFile, extra_buffers: bool,
             threads: int | None, calibration_dir: Path | None) -> KernelChoice | None:
    """The KV cache type and attention the calibration finds fastest among those the policy leaves open; None (the
    policy's fixed defaults) when it cannot measure them: a slower model is better than none."""
    candidates = candidates_for(kv_cache=limits.kv_cache, flash_attention=limits.flash_attention,
                                head_dim=model_file.facts.head_dim)  # fmt: skip
    try:
        return choose_kernels(source.path, sha256=sha256, candidates=candidates, threads=threads or os.cpu_count() or 1,
                              extra_buffers=extra_buffers, cache_dir=calibration_dir)  # fmt: skip
    except CalibrationError as exc:
        log.warning("model %s: %s; using the policy's fixed KV cache settings", source.name, exc)
        return None


def _compile_template(name: str, card: ModelCard) -> tuple[ChatTemplate | None, str | None]:
    """The model's chat template, compiled once (its BOS/EOS texts are known once the engine has loaded the
    vocabulary); one that does not compile is kept as the problem `/ready` reports, the model still served."""
    try:
        return ChatTemplate(card.chat_template, bos_token=card.bos_token, eos_token=card.eos_token), None
    except ChatTemplateError as exc:
        log.error("model %s: %s", name, exc)
        return None, str(exc)
