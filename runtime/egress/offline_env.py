"""The offline environment: every library that would phone home is told not to, before it is imported.

Several libraries read these variables once, at import (huggingface_hub keeps them as module constants), so the
server applies them first thing. Where a library was imported earlier anyway, its cached switches are set too and
the report names it, so the doctor can show that the order was wrong. The egress guard refuses the traffic either
way; this keeps libraries from trying, and from failing in odd places when they do.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

# variable -> value, and why (the library and what it would otherwise do).
OFFLINE_VARIABLES: dict[str, tuple[str, str]] = {
    "HF_HUB_OFFLINE": ("1", "huggingface_hub: every Hub request raises instead of going out"),
    "HF_HUB_DISABLE_TELEMETRY": ("1", "huggingface_hub: no usage pings"),
    "HF_HUB_DISABLE_UPDATE_CHECK": ("1", "huggingface_hub CLI: no version check"),
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": ("1", "huggingface_hub: a stored token is never attached to a request"),
    "TRANSFORMERS_OFFLINE": ("1", "transformers: local files only"),
    "HF_DATASETS_OFFLINE": ("1", "datasets: local files only"),
    "DO_NOT_TRACK": ("1", "the cross-tool opt-out (huggingface_hub and others honour it)"),
    "DISABLE_TELEMETRY": ("1", "the older cross-tool opt-out"),
    "OTEL_SDK_DISABLED": ("true", "OpenTelemetry SDK (FastAPI's optional telemetry): no exporters start"),
    "OTEL_TRACES_EXPORTER": ("none", "OpenTelemetry: no trace exporter"),
    "OTEL_METRICS_EXPORTER": ("none", "OpenTelemetry: no metrics exporter"),
    "OTEL_LOGS_EXPORTER": ("none", "OpenTelemetry: no log exporter"),
    "FASTAPI_OTEL_AUTO_CONFIGURE": ("false", "FastAPI: no OTLP exporters from the environment"),
    "VLLM_NO_USAGE_STATS": ("1", "vLLM (the planned multi-GPU engine): no usage reports"),
    "VLLM_DO_NOT_TRACK": ("1", "vLLM: the same, by its other name"),
    "RAY_USAGE_STATS_ENABLED": ("0", "Ray (vLLM's multi-node runtime): no usage reports"),
    "SCARF_NO_ANALYTICS": ("true", "packages that embed Scarf install analytics"),
    "PIP_NO_INDEX": ("1", "pip, if anything runs it: no package index"),
    "RES_OPTIONS": ("attempts:0", "glibc's stub resolver (and every child's): zero tries, so no DNS query is sent, even "
                    "by a lookup the guard cannot see first (the C socket methods, ctypes, a subprocess)"),
}

# Removed: they name where telemetry would go.
REMOVED_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
)

# Modules that copy the variables into constants at import: module -> {attribute: value to force}.
_IMPORT_TIME_SWITCHES: dict[str, dict[str, object]] = {
    "huggingface_hub.constants": {
        "HF_HUB_OFFLINE": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": True,
    },
}

_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class RemoteReferenceError(ValueError):
    """A model or file reference that names a remote location (hf://, https://, …); the appliance only opens local files."""


@dataclass(frozen=True)
class OfflineEnvironment:
    """What `apply_offline_environment` did: variables changed (name -> previous value or None) and removed,
    and the modules that had already read the old values at import (their cached switches were set too)."""

    changed: dict[str, str | None]
    removed: tuple[str, ...]
    imported_too_early: tuple[str, ...]


def apply_offline_environment(environ: MutableMapping[str, str] | None = None) -> OfflineEnvironment:
    """Force the offline variables (an operator's `HF_HUB_OFFLINE=0` is overridden: the appliance is offline)."""
    target = os.environ if environ is None else environ
    changed: dict[str, str | None] = {}
    for name, (value, _why) in OFFLINE_VARIABLES.items():
        if target.get(name) != value:
            changed[name] = target.get(name)
            target[name] = value
    removed = tuple(name for name in REMOVED_VARIABLES if target.pop(name, None) is not None)
    early: list[str] = []
    if environ is None:
        for module_name, switches in _IMPORT_TIME_SWITCHES.items():
            module = sys.modules.get(module_name)
            if module is None:
                continue
            if any(getattr(module, attr, value) != value for attr, value in switches.items()):
                early.append(module_name)
            for attr, value in switches.items():
                setattr(module, attr, value)
    return OfflineEnvironment(changed=changed, removed=removed, imported_too_early=tuple(early))


def offline_environment_gaps(environ: MutableMapping[str, str] | None = None) -> dict[str, str | None]:
    """Variables that do not hold their offline value (name -> current value); empty when the process is offline."""
    source = os.environ if environ is None else environ
    gaps = {name: source.get(name) for name, (value, _why) in OFFLINE_VARIABLES.items() if source.get(name) != value}
    gaps.update({name: source[name] for name in REMOVED_VARIABLES if name in source})
    return gaps


def require_local_reference(reference: str) -> Path:
    """The local path a model reference names.

    Raises:
        RemoteReferenceError: the reference is `hf://…` or any other `scheme://` location.
    """
    if _REMOTE.match(reference):
        scheme = reference.split("://", 1)[0].lower()
        hint = " (hf:// references are resolved by `sealbox bundle create` on the connected host)" if scheme == "hf" else ""
        raise RemoteReferenceError(f"{reference}: the appliance opens only local files, not {scheme}:// references{hint}")
    return Path(reference)
