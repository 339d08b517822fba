"""`bundle create`: resolve inputs, pack their bytes once into content-addressed blobs, sign the manifest last.

Crash safety comes from the order of writes, not from cleanup: blobs go in first (each complete before it is named),
the signed `manifest.json` is renamed into place last, and a directory without it never verifies. The work directory
`.sealbox-create/` (part files in flight, resume records, generated SBOM) is removed only after the manifest is in place;
if that removal is interrupted, the leftover is an extra file, which verify refuses too, and a re-run finishes the job.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer

from sealbox.bundler.blobs import DEFAULT_MAX_PART_SIZE, BlobWriter, WrittenBlob
from sealbox.bundler.errors import InputError
from sealbox.bundler.manifest import BLOB_DIR, MANIFEST_FILE, Base, BlobEntry, Manifest, Target, manifest_digest
from sealbox.bundler.progress import Progress, SilentProgress
from sealbox.bundler.signing import envelope_bytes, new_envelope, sign
from sealbox.bundler.sources import Artifact
from sealbox.bundler.sources.cuda_engine import ENGINE_PROJECT, CudaEngineSpec, EngineWheel
from sealbox.bundler.sources.local import local_file, local_model, local_policy, model_facts
from sealbox.bundler.sources.hf_snapshot import is_snapshot_reference
from sealbox.bundler.sources.vllm_stack import VllmSpec
from sealbox.runtime.durable_file import write_atomically

WORK_DIR = ".sealbox-create"
HF_SCHEME = "hf://"
OLLAMA_SCHEME = "ollama://"
DEFAULT_EXPIRY = timedelta(days=90)
SBOM_PATH = "sbom.cdx.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DURATION = re.compile(r"(\d+)([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_ROLE_ORDER = {"policy": 0, "model": 1, "wheel": 2, "file": 3, "eval": 4, "sbom": 5}


def parse_expiry(text: str, now: datetime) -> datetime:
    """`90d`, `12h`, `2w` from `now`, or an absolute UTC date (`2030-01-31`) or time (`2030-01-31T12:00:00Z`).

    Raises ValueError."""
    if match := _DURATION.fullmatch(text.strip()):
        return now + timedelta(seconds=int(match.group(1)) * _DURATION_UNITS[match.group(2)])
    for pattern in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d"):
        try:
            return datetime.strptime(text.strip(), pattern).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    raise ValueError(f"{text!r} is not a duration like 90d, 12h, 2w or a UTC date like 2030-01-31")


@dataclass(frozen=True, kw_only=True)
class CreateRequest:
    """Everything `bundle create` was asked for. Paths are local; `models` may also hold `hf://` references."""

    name: str
    version: int
    out: Path
    signers: Sequence[Signer]
    models: Sequence[str] = ()
    policies: Sequence[Path] = ()
    files: Sequence[Path] = ()
    requirements: Sequence[Path] = ()
    wheels: Sequence[str] = ()
    wheelhouses: Sequence[Path] = ()
    target: Target = field(default_factory=Target.host)
    include_sealbox: bool | None = None
    """Pack the sealbox wheel itself; None means: when any wheel input is given (the bundle carries an environment)."""
    expires: datetime | None = None
    """Default: `now` + 90 days."""
    max_part_size: int = DEFAULT_MAX_PART_SIZE
    hf_cache: Path | None = None
    eval_suite: Path | None = None
    """An evaluation suite (TOML or JSON) carried as `eval/suite.json`; `install` runs it before going live."""
    record_expected: bool = False
    """Record each case's exact greedy output by serving the bundled models on this host first."""
    ollama_store: Path | None = None
    """Default: `$OLLAMA_MODELS`, else Ollama's default locations."""
    base: Base | None = None
    sbom: bool = True
    now: datetime | None = None
    cuda: CudaEngineSpec | None = None
    """Carry the CUDA engine built for this (and the CUDA runtime wheels it needs) instead of the CPU build."""
    cuda_engine: EngineWheel | None = None
    """Set by `create_bundle` itself: the engine wheel built, cached or supplied for `cuda`."""
    vllm: VllmSpec | None = None
    """Carry vLLM at this version and its CUDA stack, resolved for the target (sealbox without llama.cpp)."""

    @property
    def wants_wheels(self) -> bool:
        return bool(self.requirements or self.wheels or self.wheelhouses or self.cuda or self.vllm)


@dataclass(frozen=True)
class CreateResult:
    directory: Path
    manifest: Manifest
    manifest_sha256: str
    signed_by: tuple[str, ...]
    blobs_written: int
    blobs_reused: int
    bytes_written: int
    bytes_reused: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "name": self.manifest.name,
            "version": self.manifest.version,
            "manifest_sha256": self.manifest_sha256,
            "signed_by": list(self.signed_by),
            "blobs": [
                {"role": e.role, "path": e.path, "size": e.size, "sha256": e.sha256, "parts": len(e.parts)}
                for e in self.manifest.blobs
            ],
            "blobs_written": self.blobs_written,
            "blobs_reused": self.blobs_reused,
            "bytes_written": self.bytes_written,
            "bytes_reused": self.bytes_reused,
            "seconds": round(self.seconds, 3),
        }


def check_out_dir(out: Path) -> None:
    """`--out` must be new, empty, or an interrupted create of ours; never a finished bundle or someone's files.

    Raises InputError."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise InputError(f"{out}: --out exists and is not a directory")
    if (out / MANIFEST_FILE).exists():
        raise InputError(f"{out}: already holds a bundle (manifest.json); choose a new --out")
    stray = sorted(item.name for item in out.iterdir() if item.name not in (WORK_DIR, "blobs"))
    if stray:
        raise InputError(f"{out}: not empty and not an interrupted create (holds {', '.join(stray[:3])})")


def _check_request(request: CreateRequest) -> None:
    if not _NAME.fullmatch(request.name):
        raise InputError(f"--name {request.name!r} must be 1-64 of A-Z a-z 0-9 . _ - and start with a letter or digit")
    if request.version < 1:
        raise InputError(f"--version {request.version} must be a positive integer (it only grows per bundle name)")
    if not request.signers:
        raise InputError("at least one --sign-key is required: an unsigned bundle can never be installed")
    if request.max_part_size < 1:
        raise InputError("--max-part-size must be at least 1 byte")
    if request.eval_suite is not None and any(is_snapshot_reference(ref) for ref in request.models):
        raise InputError("--eval-suite gates a release by serving its GGUF models with llama.cpp; a vLLM model "
                         "(hf://owner/repo@commit, safetensors) is not served that way, so it cannot be gated yet")  # fmt: skip
    if request.record_expected and request.eval_suite is None:
        raise InputError("--record-expected records the outputs of an --eval-suite; give one")
    if not (request.models or request.policies or request.files or request.wants_wheels or request.include_sealbox):
        raise InputError("nothing to bundle: give --model, --policy, --file, --requirements, --wheel or --wheelhouse")


def _check_unique_paths(artifacts: Sequence[Artifact]) -> None:
    seen: dict[str, Artifact] = {}
    for artifact in artifacts:
        if artifact.path in seen:
            raise InputError(
                f"{artifact.file} and {seen[artifact.path].file} would both be {artifact.path} in the bundle; rename one"
            )
        seen[artifact.path] = artifact


def _resolve_hf(ref: str, request: CreateRequest) -> list[Artifact]:
    """One GGUF file (`hf://owner/repo/file.gguf`), or a safetensors model directory (`hf://owner/repo@commit`)."""
    from sealbox.bundler.sources.hf_snapshot import is_snapshot_reference, resolve_hf_snapshot
    from sealbox.bundler.sources.huggingface import resolve_hf_model

    cache = request.hf_cache
    if cache is None:
        from huggingface_hub import constants

        cache = Path(constants.HF_HUB_CACHE)
    if is_snapshot_reference(ref):
        return resolve_hf_snapshot(ref, cache_dir=cache)
    artifact = resolve_hf_model(ref, cache_dir=cache)
    # The hf source records where the bytes came from; the header facts are read here, for every model alike.
    return [replace(artifact, meta={**model_facts(artifact.file), **artifact.meta})]


def _resolve_ollama(ref: str, request: CreateRequest) -> Artifact:
    from sealbox.bundler.sources.ollama import resolve_ollama_model

    artifact = resolve_ollama_model(ref, store=request.ollama_store)
    return replace(artifact, meta={**model_facts(artifact.file), **artifact.meta})


def _suite(request: CreateRequest, artifacts: list[Artifact], work: Path) -> Artifact:
    from sealbox.bundler.evaluation_gate import suite_artifact
    from sealbox.runtime.policy import default_policy_text

    assert request.eval_suite is not None
    models = {Path(a.path).stem: a.file for a in artifacts if a.role == "model"}
    policies = [a.file for a in artifacts if a.role == "policy"]
    policy_text = policies[0].read_text(encoding="utf-8") if policies else default_policy_text()
    return suite_artifact(request.eval_suite, models=models, policy_text=policy_text,
                          record_expected=request.record_expected, work=work / "eval")  # fmt: skip


def resolve_local(request: CreateRequest) -> list[Artifact]:
    """Every local input, checked (GGUF header, policy schema, readable file); writes nothing.

    Raises InputError."""
    artifacts = [local_policy(path) for path in request.policies]
    artifacts += [local_model(Path(ref)) for ref in request.models if not ref.startswith((HF_SCHEME, OLLAMA_SCHEME))]
    artifacts += [local_file(path) for path in request.files]
    _check_unique_paths(artifacts)
    return artifacts


def _with_cuda_engine(request: CreateRequest, work: Path, progress: Progress) -> CreateRequest:
    """With `--accelerator cuda`: the engine wheel (cached, supplied or built now), and the target recording it."""
    if request.cuda is None:
        return request
    from sealbox.bundler.sources.cuda_engine import CudaEngineRecipe

    recipe = CudaEngineRecipe(request.cuda, work=work / "cuda-engine", wheelhouses=request.wheelhouses)
    engine = recipe.wheel(progress)
    _check_engine_platform(engine.path, request.target)
    return replace(request, cuda_engine=engine, target=replace(request.target, accelerator=request.cuda.record()))


def _collect_wheels(request: CreateRequest, work: Path) -> list[Artifact]:
    include = request.include_sealbox if request.include_sealbox is not None else request.wants_wheels
    if not (request.wants_wheels or include):
        return []
    from sealbox.bundler.sources.wheels import collect_wheels

    wheels, prebuilt = list(request.wheels), []
    if request.vllm is not None:
        return _collect_vllm(request, request.vllm, work, include)
    engine, spec = request.cuda_engine, request.cuda
    if engine is not None and spec is not None:
        prebuilt.append((engine.path, engine.provenance))
        wheels += [f"{ENGINE_PROJECT}=={spec.engine_version}", *spec.runtime_requirements()]
    artifacts = collect_wheels(
        requirements=list(request.requirements),
        wheels=wheels,
        wheelhouses=list(request.wheelhouses),
        target=request.target,
        work_dir=work / "wheels",
        include_sealbox=include,
        prebuilt=prebuilt,
    )
    if engine is None or spec is None:
        return artifacts
    return [_mark_cuda_engine(artifact, engine.path, spec) for artifact in artifacts]


def _collect_vllm(request: CreateRequest, spec: VllmSpec, work: Path, include_sealbox: bool) -> list[Artifact]:
    from sealbox.bundler.sources.vllm_stack import mark_engine
    from sealbox.bundler.sources.wheels import collect_wheels

    artifacts = collect_wheels(requirements=list(request.requirements), wheels=[*request.wheels, spec.requirement],
                               wheelhouses=list(request.wheelhouses), target=request.target,
                               work_dir=work / "wheels", include_sealbox=include_sealbox, sealbox_extras=())  # fmt: skip
    return [mark_engine(artifact, spec) for artifact in artifacts]


def _with_vllm(request: CreateRequest, progress: Progress) -> CreateRequest:
    """With `--vllm`: the stack resolved for the target before anything is downloaded, and recorded in the target."""
    if request.vllm is None:
        return request
    from sealbox.bundler.sources.vllm_stack import resolve_stack

    if request.cuda is not None:
        raise InputError("--vllm brings its own CUDA stack; it does not combine with --accelerator cuda")
    progress.step(f"resolving {request.vllm.requirement} for the target (pip --dry-run)")
    resolved = resolve_stack(request.vllm, request.target, request.wheelhouses)
    return replace(request, target=replace(request.target, accelerator=request.vllm.record(resolved)))


def _check_engine_platform(engine: Path, target: Target) -> None:
    """The CUDA engine is built for this host's machine (a linux_<arch> wheel): refuse it for a target of another."""
    from packaging.utils import parse_wheel_filename

    from sealbox.bundler.sources.wheels import marker_environment

    environment = marker_environment(target)
    machine = environment.get("platform_machine")
    platforms = sorted({tag.platform for tag in parse_wheel_filename(engine.name)[3]})
    if environment.get("sys_platform") != "linux" or not machine or not all(p.endswith(f"_{machine}") for p in platforms):
        raise InputError(f"{engine.name} is built for {', '.join(platforms)}; the target is "
                         f"{environment.get('sys_platform', '?')} {machine or '?'}: build the CUDA engine on a host "
                         "like the target and pass it with --wheelhouse")  # fmt: skip


def _mark_cuda_engine(artifact: Artifact, engine: Path, spec: CudaEngineSpec) -> Artifact:
    """The engine wheel pip chose must be the CUDA build (a CPU wheel of the same version in a wheelhouse could win);
    it carries the build's facts into the manifest and the SBOM."""
    if artifact.meta.get("name", "").lower().replace("_", "-") != ENGINE_PROJECT:
        return artifact
    if artifact.file.read_bytes() != engine.read_bytes():
        raise InputError(f"pip chose {artifact.file.name} from {artifact.provenance}, not the CUDA engine {engine}; "
                         "remove other llama-cpp-python wheels from the wheelhouses")  # fmt: skip
    return replace(artifact, meta={**artifact.meta, **spec.record()})


def _entry(artifact: Artifact, blob: WrittenBlob) -> BlobEntry:
    return BlobEntry(
        role=artifact.role,
        path=artifact.path,
        size=blob.size,
        sha256=blob.sha256,
        parts=blob.parts,
        meta=dict(artifact.meta),
        provenance=artifact.provenance,
    )


def _remove_stale_blobs(out: Path, manifest: Manifest) -> None:
    """Blobs from an interrupted run with other inputs would be extra files: drop what this manifest does not list."""
    expected = set(manifest.expected_files())
    for item in (out / BLOB_DIR).iterdir():
        if f"{BLOB_DIR}/{item.name}" not in expected:
            item.unlink()


def create_bundle(
    request: CreateRequest, progress: Progress | None = None, *, in_base: Mapping[str, int] | None = None
) -> CreateResult:
    """Build and sign a bundle directory at `request.out`.

    `in_base` (digest → size of every blob of a delta's base): a file of one of those sizes is hashed first, and when
    its digest is the base's it is listed `in_base` and never written; only new blobs reach the disk.

    Raises:
        InputError: an input is refused (nothing is written when a local input is at fault).
        OSError: the disk failed; what was completed is reused by a re-run.
    """
    started = time.perf_counter()
    progress = progress or SilentProgress()
    now = (request.now or datetime.now(timezone.utc)).replace(microsecond=0)
    expires = request.expires or now + DEFAULT_EXPIRY
    if expires <= now:
        raise InputError(f"--expires {expires:%Y-%m-%dT%H:%M:%SZ} is not in the future")
    _check_request(request)
    check_out_dir(request.out)

    request = _with_vllm(request, progress)  # before any model download: a stack the target cannot run stops here
    progress.step("checking local inputs")
    artifacts = resolve_local(request)
    for ref in request.models:
        if ref.startswith(HF_SCHEME):
            progress.step(f"resolving {ref}")
            artifacts.extend(_resolve_hf(ref, request))
        elif ref.startswith(OLLAMA_SCHEME):
            progress.step(f"resolving {ref} in the Ollama store")
            artifacts.append(_resolve_ollama(ref, request))
    _check_unique_paths(artifacts)

    out = request.out
    work = out / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    request = _with_cuda_engine(request, work, progress)
    progress.step("collecting wheels for the target")
    artifacts += _collect_wheels(request, work)
    if request.eval_suite is not None:
        progress.step("recording the evaluation suite's expected outputs" if request.record_expected
                      else "checking the evaluation suite")  # fmt: skip
        artifacts.append(_suite(request, artifacts, work))
    _check_unique_paths(artifacts)

    writer = BlobWriter(out, work_dir=work, max_part_size=request.max_part_size)
    written: dict[str, WrittenBlob] = {}
    base_sizes = frozenset((in_base or {}).values())
    # Smallest first: an interruption then leaves the most blobs complete for the re-run.
    for artifact in sorted(artifacts, key=lambda a: (a.file.stat().st_size, a.path)):
        blob = None
        if artifact.file.stat().st_size in base_sizes:
            with progress.bytes(f"hashing {artifact.path} (in the base?)", artifact.file.stat().st_size) as advance:
                blob = writer.digest(artifact.file, advance)
            if blob.sha256 not in (in_base or {}):
                blob = None
        written[artifact.path] = blob if blob is not None else _write(writer, artifact, progress)
    if request.sbom:
        sbom = _sbom(artifacts, written, request, work)
        written[sbom.path] = _write(writer, sbom, progress)
        artifacts.append(sbom)

    order = sorted(artifacts, key=lambda a: (_ROLE_ORDER[a.role], a.path))
    manifest = Manifest(
        name=request.name,
        version=request.version,
        created=now,
        expires=expires,
        target=request.target,
        blobs=tuple(
            replace(_entry(artifact, written[artifact.path]), in_base=written[artifact.path].sha256 in (in_base or {}))
            for artifact in order
        ),
        base=request.base,
    )
    progress.step("signing the manifest")
    payload = manifest.canonical_bytes()
    envelope = new_envelope(payload)
    for signer in request.signers:
        sign(envelope, signer)
    _remove_stale_blobs(out, manifest)
    write_atomically(out / MANIFEST_FILE, envelope_bytes(envelope), mode=0o644, temp_dir=work)
    shutil.rmtree(work)
    fresh = [blob for blob in written.values() if not blob.reused]
    reused = [blob for blob in written.values() if blob.reused]
    return CreateResult(
        directory=out.absolute(),
        manifest=manifest,
        manifest_sha256=manifest_digest(payload),
        signed_by=tuple(sorted(envelope.signatures)),
        blobs_written=len(fresh),
        blobs_reused=len(reused),
        bytes_written=sum(blob.size for blob in fresh),
        bytes_reused=sum(blob.size for blob in reused),
        seconds=time.perf_counter() - started,
    )


def _write(writer: BlobWriter, artifact: Artifact, progress: Progress) -> WrittenBlob:
    with progress.bytes(f"{artifact.role} {artifact.path}", artifact.file.stat().st_size) as advance:
        blob = writer.write(artifact.file, advance)
    if artifact.expected_sha256 is not None and blob.sha256 != artifact.expected_sha256:
        for name in blob.files:  # the bytes are not what the source vouched for: they do not stay in the bundle
            (writer.bundle_dir / name).unlink(missing_ok=True)
        raise InputError(
            f"{artifact.provenance}: {artifact.file} has sha256 {blob.sha256}, not the {artifact.expected_sha256} its "
            "source names it by (a corrupt store; fetch the model again)"
        )
    return blob


def _sbom(
    artifacts: list[Artifact], written: dict[str, WrittenBlob], request: CreateRequest, work: Path
) -> Artifact:
    """The CycloneDX SBOM of what was packed, given each artifact's digest so nothing is read twice."""
    from sealbox.bundler.sbom import build_sbom

    described = [
        replace(a, meta={**a.meta, "sha256": written[a.path].sha256, "size": written[a.path].size}) for a in artifacts
    ]
    path = work / SBOM_PATH
    path.write_bytes(build_sbom(described, bundle_name=request.name, version=request.version, created=request.now))
    return Artifact(
        role="sbom",
        path=SBOM_PATH,
        file=path,
        provenance="generated by sealbox bundle create",
        meta={"format": "CycloneDX", "encoding": "json"},
    )

