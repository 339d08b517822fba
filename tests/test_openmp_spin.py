"""llama.cpp's OpenMP threads spin briefly where they may share the host, and as long as libgomp's default for a
server's one engine; an operator's own setting always wins, and nothing changes once llama.cpp is loaded."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import os, sys
import sealbox.runtime.engine as engine
print(os.environ.get("GOMP_SPINCOUNT"))
if sys.argv[1] == "loaded":
    import llama_cpp
print(engine.dedicate_openmp_threads())
print(os.environ.get("GOMP_SPINCOUNT"))
"""


def spin_counts(*, loaded: bool = False, **env: str) -> list[str]:
    clean = {key: value for key, value in os.environ.items() if key not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    result = subprocess.run([sys.executable, "-c", SCRIPT, "loaded" if loaded else "fresh"], env=clean | env,
                            capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    return result.stdout.split()


def test_the_engine_package_sets_the_shared_host_spin_count_and_a_lone_engine_spins_longer() -> None:
    assert spin_counts() == ["1000", "300000", "300000"]


def test_an_operators_spin_count_is_kept() -> None:
    assert spin_counts(GOMP_SPINCOUNT="5") == ["5", "None", "5"]


def test_an_operators_wait_policy_is_kept() -> None:
    assert spin_counts(OMP_WAIT_POLICY="passive") == ["None", "None", "None"]


def test_nothing_changes_once_llama_cpp_is_loaded() -> None:
    assert spin_counts(loaded=True) == ["1000", "None", "1000"]
