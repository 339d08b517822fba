"""Egress lockdown inside the process: the guard, its allowlist, the offline environment, the kernel's view of the network.

`sealbox serve` starts with `apply_offline_environment()` then `install_egress_guard(policy.egress)`, before it
imports anything else; the systemd unit and nftables rules (docs/lockdown.md) hold the same line from outside.
"""

from __future__ import annotations

from sealbox.runtime.egress.allowlist import Allowlist, EgressPolicyWithPorts
from sealbox.runtime.egress.guard import (
    EgressBlockedError,
    EgressGuard,
    EgressGuardError,
    GuardStatus,
    active_guard,
    audit_log_reporter,
    guard_status_path,
    install_egress_guard,
)
from sealbox.runtime.egress.offline_env import (
    OfflineEnvironment,
    RemoteReferenceError,
    apply_offline_environment,
    offline_environment_gaps,
    require_local_reference,
)
from sealbox.runtime.egress.routes import NetworkTablesError, NetworkView, read_network

__all__ = [
    "Allowlist",
    "EgressBlockedError",
    "EgressGuard",
    "EgressGuardError",
    "EgressPolicyWithPorts",
    "GuardStatus",
    "NetworkTablesError",
    "NetworkView",
    "OfflineEnvironment",
    "RemoteReferenceError",
    "active_guard",
    "apply_offline_environment",
    "audit_log_reporter",
    "guard_status_path",
    "install_egress_guard",
    "offline_environment_gaps",
    "read_network",
    "require_local_reference",
]
