"""Host-side events (installs, activations, rollbacks, refusals, trust changes) into the appliance's audit log.

One function, so the install and trust code name *what* happened and this module alone knows *how* it is recorded.
The log is opened per event with `retention=False`: these commands add a record, they do not hold the policy that
decides what the log deletes (the server does). The audit policy used is the one of the release in force.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.exit_codes import ExitCode

if TYPE_CHECKING:  # the policy (pydantic) loads only when an event is recorded: `bundle verify` never pays for it
    from sealbox.runtime.policy import Policy


class AuditTrailError(Exception):
    """The event could not be recorded: callers fail closed (an unrecorded install must not go live)."""

    exit_code = ExitCode.AUDIT_TRAIL


def record(root: HostRoot, event: str, policy: Policy | None = None, **fields: Any) -> int:
    """Append `event` with `fields` to `<root>/audit/`; returns its sequence number once durable.

    Raises:
        AuditTrailError: the log cannot be opened or written.
    """
    from sealbox.runtime.audit.errors import AuditError
    from sealbox.runtime.audit.log import AuditLog
    from sealbox.runtime.policy import Policy

    in_force = policy or Policy.default()
    try:
        log = AuditLog.open(root.audit, in_force.audit, retention=False)
        try:
            return log.append(event, **fields)
        finally:
            log.close()
    except (AuditError, OSError) as exc:
        raise AuditTrailError(f"audit log {root.audit}: cannot record {event}: {exc}") from exc
