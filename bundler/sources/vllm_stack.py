"""vLLM and its wheels for the target (`bundle create --vllm VERSION`): a Linux CUDA host, the target's Python.

vLLM's stack is several GiB of CUDA wheels (torch, the nvidia-* runtime, xformers, ray). Before any of it is
downloaded, pip resolves the stack for the target (`pip install --dry-run --report`, markers evaluated for the
target): a wheel missing for the target's Python or platform is named in seconds, not after an hour of download,
and `--dry-run` prints that resolution and stops. The download then goes through the same `pip download` as every
other wheel. The vLLM wheel is marked in the manifest, and the target records the engine it carries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from sealbox.bundler.errors import InputError
from sealbox.bundler.manifest import Target
from sealbox.bundler.sources import Artifact
from sealbox.bundler.sources.resolution import VLLM_PROJECT, Resolved, resolve
from sealbox.bundler.sources.wheels import marker_environment

SUPPORTED_MACHINES = ("x86_64", "aarch64")


@dataclass(frozen=True)
class VllmSpec:
    requirement: str
    """`vllm==<version>`: pinned, since the manifest records which engine the target runs."""
    version: str

    @classmethod
    def parse(cls, text: str) -> VllmSpec:
        """`0.9.0` or `vllm==0.9.0`.

        Raises:
            InputError: not an exact pin of vLLM.
        """
        candidate = text.strip() if text.strip().lower().startswith(VLLM_PROJECT) else f"{VLLM_PROJECT}=={text.strip()}"
        try:
            requirement = Requirement(candidate)
        except InvalidRequirement as exc:
            raise InputError(f"--vllm {text!r}: give one exact vLLM version (e.g. 0.9.0): {exc}") from exc
        pins = [spec for spec in requirement.specifier if spec.operator == "=="]
        if canonicalize_name(requirement.name) != VLLM_PROJECT or len(pins) != 1 or len(requirement.specifier) != 1:
            raise InputError(f"--vllm {text!r}: give one exact vLLM version (e.g. 0.9.0); the manifest records it")
        return cls(requirement=f"{VLLM_PROJECT}=={pins[0].version}", version=pins[0].version)

    def record(self, resolved: Sequence[Resolved]) -> dict[str, object]:
        """The manifest's `target.accelerator`: what the target runs, and the stack's resolved versions."""
        versions = {canonicalize_name(item.name): item.version for item in resolved}
        return {"accelerator": "cuda", "engine": self.requirement,
                "stack": {name: versions[name] for name in sorted(versions)}}  # fmt: skip


def check_target(target: Target) -> None:
    """vLLM publishes CUDA wheels for Linux only.

    Raises:
        InputError: the target is not Linux on a machine vLLM builds for.
    """
    environment = marker_environment(target)
    machine = environment.get("platform_machine", "?")
    if environment.get("sys_platform") != "linux" or machine not in SUPPORTED_MACHINES:
        raise InputError(f"--vllm: vLLM runs on Linux {'/'.join(SUPPORTED_MACHINES)} with CUDA; the target is "
                         f"{environment.get('sys_platform', '?')} {machine} (give --platform manylinux_2_28_x86_64)")  # fmt: skip


def resolve_stack(spec: VllmSpec, target: Target, wheelhouses: Sequence[Path]) -> list[Resolved]:
    """What the target would install for `spec`, from pip's configured index and the wheelhouses; nothing downloaded.

    Raises:
        InputError: the target is not Linux, or pip cannot resolve the stack for it (its words end the message).
    """
    check_target(target)
    resolved = resolve([spec.requirement], target, find_links=wheelhouses)
    if not any(canonicalize_name(item.name) == VLLM_PROJECT for item in resolved):
        raise InputError(f"pip resolved {spec.requirement} without a vLLM wheel; check the wheelhouses and the index")
    return resolved


def mark_engine(artifact: Artifact, spec: VllmSpec) -> Artifact:
    """The vLLM wheel carries `engine = vllm` into the manifest and the SBOM."""
    if canonicalize_name(str(artifact.meta.get("name", ""))) != VLLM_PROJECT:
        return artifact
    return replace(artifact, meta={**artifact.meta, "engine": "vllm"})
