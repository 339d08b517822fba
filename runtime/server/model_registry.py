"""The models one server serves: found in the active release (or given with `--model`), proven, sized, started.

A model is served only after three checks, each of which can fail without taking the others down: its bytes hash
to the sha256 the release names (the audit log records that digest for every request, so it must be true), a child
process loads it (llama.cpp aborts the whole process on some malformed files), and the memory plan finds room for
at least one sequence. A model that fails is listed in `/ready` with the reason; the rest are served.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from sealbox.runtime.engine.base import Engine, ModelCard
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.memory_plan import MemoryPlanError, plan_for_policy
from sealbox.runtime.models.gguf_facts import ModelFileError, chat_template, read_facts
from sealbox.runtime.models.probe import probe_model
from sealbox.runtime.policy import LimitsPolicy, Policy

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
        if not root.current.exists():
            raise ReleaseError(f"no active release: {root.current} does not exist (install a bundle, or pass --model)")
        directory = root.current.resolve()
        record = directory / "release.json"
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
            models = tuple(
                ModelSource(str(m["name"]), directory / str(m["path"]), str(m["sha256"]),
                            _optional_text(m.get("license")), _optional_text(m.get("origin")))  # fmt: skip
                for m in data["models"]
            )
            return cls(directory, str(data["name"]), int(data["version"]), models, directory / str(data["policy"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ReleaseError(f"{record}: not a readable release record: {exc}") from exc


def _optional_text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass
class ServedModel:
    source: ModelSource
    sha256: str = ""
    engine: Engine | None = None
    problem: str | None = None
    embeddings: bool = False
    context: int = 0
    sequences: int = 0
    gpu_layers: int = 0

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.problem is None


@dataclass
class ModelRegistry:
    models: dict[str, ServedModel] = field(default_factory=dict)

    def get(self, name: str) -> ServedModel | None:
        return self.models.get(name)

    @property
    def ready(self) -> list[ServedModel]:
        return [model for model in self.models.values() if model.ready]

    @property
    def failed(self) -> list[ServedModel]:
        return [model for model in self.models.values() if not model.ready]

    async def start(self, sources: list[ModelSource], policy: Policy, *, threads: int | None = None) -> None:
        """Check and start every model; a failure is kept as the model's `problem`, never raised."""
        for source in sources:
            served = ServedModel(source)
            self.models[source.name] = served
            try:
                served.engine = await _start_engine(served, policy.limits, threads=threads)
            except _Refused as exc:
                served.problem = str(exc)
                log.error("model %s is not served: %s", source.name, exc)
            except Exception as exc:  # a file the checks let through and something else refused: still one model only
                served.problem = f"{source.path}: cannot be served: {exc}"
                log.exception("model %s is not served", source.name)

    async def stop(self) -> None:
        for model in self.models.values():
            if model.engine is not None:
                await model.engine.stop()


class _Refused(Exception):
    pass


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


async def _start_engine(served: ServedModel, limits: LimitsPolicy, *, threads: int | None) -> Engine:
    import asyncio

    from sealbox.runtime.engine.llama_batch import LlamaBatchEngine
    from sealbox.runtime.engine.llama_backend import ModelLoadError

    source = served.source
    try:
        served.sha256 = await asyncio.to_thread(file_sha256, source.path)
    except OSError as exc:
        raise _Refused(f"{source.path}: cannot read: {exc.strerror}") from exc
    if source.sha256 is not None and served.sha256 != source.sha256:
        raise _Refused(
            f"{source.path}: sha256 {served.sha256} does not match the release's {source.sha256} (the file was changed)"
        )
    probe = await asyncio.to_thread(probe_model, source.path)
    if not probe.ok:
        raise _Refused(probe.reason)
    if not probe.extra_buffers:
        log.warning("%s", probe.reason)
    try:
        facts = probe.facts or read_facts(source.path)
        template = chat_template(source.path)
        sizing = plan_for_policy(source.path, limits).engine_sizing()
    except (ModelFileError, MemoryPlanError) as exc:
        raise _Refused(str(exc)) from exc
    served.embeddings = facts.pooling_type is not None
    served.context, served.sequences, served.gpu_layers = sizing.n_ctx_per_seq, sizing.n_seq_max, sizing.n_gpu_layers
    card = ModelCard(
        name=source.name,
        sha256=served.sha256,
        n_ctx=sizing.n_ctx_per_seq,
        embeddings=served.embeddings,
        chat_template=template,
    )
    engine = LlamaBatchEngine(
        source.path,
        card,
        n_seq_max=sizing.n_seq_max,
        n_ctx_per_seq=sizing.n_ctx_per_seq,
        kv_cells=sizing.kv_cells,
        queue_size=limits.queue_size,
        n_gpu_layers=sizing.n_gpu_layers,
        n_threads=threads,
        embeddings=served.embeddings,
        flash_attention=sizing.n_gpu_layers > 0,
        extra_buffers=probe.extra_buffers,
        type_k=sizing.type_k,
        type_v=sizing.type_v,
    )
    try:
        await engine.start()
    except ModelLoadError as exc:
        raise _Refused(str(exc)) from exc
    log.info(
        "serving %s (%s): %d sequences × %d tokens, %d KV cells (K %s, V %s), %d GPU layers",
        source.name, served.sha256[:12], sizing.n_seq_max, sizing.n_ctx_per_seq, sizing.kv_cells, sizing.type_k,
        sizing.type_v, sizing.n_gpu_layers,
    )  # fmt: skip
    return engine
