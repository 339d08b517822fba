"""The offline environment: forced variables, libraries imported too early, and remote references refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sealbox.runtime.egress.offline_env import (
    OFFLINE_VARIABLES,
    RemoteReferenceError,
    apply_offline_environment,
    offline_environment_gaps,
    require_local_reference,
)


def test_every_offline_variable_is_forced_even_over_an_operators_value():
    environ = {"HF_HUB_OFFLINE": "0", "PATH": "/usr/bin"}
    applied = apply_offline_environment(environ)
    assert {name: environ[name] for name in OFFLINE_VARIABLES} == {n: v for n, (v, _why) in OFFLINE_VARIABLES.items()}
    assert applied.changed["HF_HUB_OFFLINE"] == "0"
    assert applied.changed["DO_NOT_TRACK"] is None
    assert environ["PATH"] == "/usr/bin"
    assert offline_environment_gaps(environ) == {}


def test_telemetry_endpoints_are_removed_and_applying_twice_changes_nothing():
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert offline_environment_gaps(environ)["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://127.0.0.1:4318"
    first = apply_offline_environment(environ)
    assert first.removed == ("OTEL_EXPORTER_OTLP_ENDPOINT",)
    second = apply_offline_environment(environ)
    assert second.changed == {} and second.removed == ()


def test_a_gap_names_the_variable_and_its_value():
    environ: dict[str, str] = {}
    apply_offline_environment(environ)
    environ["HF_HUB_OFFLINE"] = "0"
    assert offline_environment_gaps(environ) == {"HF_HUB_OFFLINE": "0"}


def run_python(code: str) -> dict[str, object]:
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_applied_before_import_huggingface_hub_starts_offline():
    result = run_python(
        "import json\n"
        "from sealbox.runtime.egress.offline_env import apply_offline_environment\n"
        "applied = apply_offline_environment()\n"
        "import huggingface_hub\n"
        "print(json.dumps({'offline': huggingface_hub.is_offline_mode(), 'early': applied.imported_too_early}))\n"
    )
    assert result == {"offline": True, "early": []}


def test_applied_after_import_the_cached_switches_are_set_and_the_late_module_is_named():
    result = run_python(
        "import json\n"
        "import huggingface_hub\n"
        "from huggingface_hub import constants\n"
        "before = huggingface_hub.is_offline_mode()\n"
        "from sealbox.runtime.egress.offline_env import apply_offline_environment\n"
        "applied = apply_offline_environment()\n"
        "print(json.dumps({'before': before, 'offline': huggingface_hub.is_offline_mode(),\n"
        "    'telemetry_off': constants.HF_HUB_DISABLE_TELEMETRY, 'early': applied.imported_too_early}))\n"
    )
    assert result == {"before": False, "offline": True, "telemetry_off": True, "early": ["huggingface_hub.constants"]}


@pytest.mark.parametrize("reference", ["hf://TheOrg/tiny-GGUF/tiny.Q8_0.gguf@0123abc", "HF://org/repo/file.gguf", "https://127.0.0.1/model.gguf", "s3://bucket/model.gguf"])
def test_remote_references_are_refused_at_runtime(reference: str):
    with pytest.raises(RemoteReferenceError, match="only local files") as refused:
        require_local_reference(reference)
    assert reference in str(refused.value)


def test_an_hf_reference_is_told_where_it_belongs():
    with pytest.raises(RemoteReferenceError, match="sealbox bundle create"):
        require_local_reference("hf://org/repo/file.gguf")


def test_local_paths_pass_unchanged():
    assert require_local_reference("/var/lib/sealbox/current/models/tiny.gguf") == Path("/var/lib/sealbox/current/models/tiny.gguf")
    assert require_local_reference("models/hf:tiny.gguf") == Path("models/hf:tiny.gguf")
