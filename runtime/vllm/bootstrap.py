"""The first lines the vLLM child runs: offline variables, sealbox's egress guard, a tie to its parent, then vLLM.

`python -I -c BOOTSTRAP` lands here before vLLM (or torch, or Ray) is imported, so nothing they load can open a
socket the policy does not allow. The guard's allowlist arrives in `SEALBOX_VLLM_EGRESS` (rendered by
`launch.engine_egress`); a refusal is written to stderr, which the supervisor shares with sealbox (the journal
under systemd). With `SEALBOX_PARENT_PID` set (the supervisor sets it), the kernel sends the child SIGTERM when
sealbox dies, however it dies: a supervised engine never outlives its front. `ray` does the same for `ray start`
on a Ray worker node.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import runpy
import signal
import sys

from sealbox.runtime.egress.guard import install_egress_guard
from sealbox.runtime.egress.offline_env import apply_offline_environment
from sealbox.runtime.policy import EgressPolicy

API_SERVER = "vllm.entrypoints.openai.api_server"
RAY_CLI = "ray.scripts.scripts"
"""The module of Ray's `ray` console script (`ray.scripts.scripts:main`)."""
EGRESS_VARIABLE = "SEALBOX_VLLM_EGRESS"
PARENT_VARIABLE = "SEALBOX_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def _report_block(destination: str, operation: str) -> None:
    print(f"sealbox egress guard ({sys.argv[0]} {os.getpid()}): blocked {operation} to {destination}", file=sys.stderr,
          flush=True)  # fmt: skip


def tie_to_parent(parent: int) -> None:
    """SIGTERM when `parent` exits; if it already has (the child was re-parented before this ran), exit now."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        sys.exit(f"sealbox's vLLM child: its parent {parent} is gone before it started")


def _wall(program: str) -> None:
    sys.argv[0] = program
    apply_offline_environment()
    install_egress_guard(EgressPolicy.model_validate_json(os.environ[EGRESS_VARIABLE]), on_block=_report_block)
    if parent := os.environ.get(PARENT_VARIABLE):
        tie_to_parent(int(parent))


def main() -> None:
    _wall("vllm")
    runpy.run_module(API_SERVER, run_name="__main__", alter_sys=True)


def ray() -> None:
    """`ray start ...` (a Ray worker node's unit) with the same guard in the CLI's interpreter. The raylet and the
    object store it starts are native programs, out of a Python guard's reach: the unit's IPAddressAllow and the
    nftables rules are their walls; they and Ray's Python workers inherit the offline variables."""
    _wall("ray")
    sys.exit(importlib.import_module(RAY_CLI).main())
