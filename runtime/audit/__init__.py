"""The tamper-evident audit log: hash-chained JSON-lines segments, signed checkpoints, export, verify, report.

Writers use `AuditLog` (see `runtime.audit.log` for the interface, the events and the durability bound);
auditors use `verify_directory` / `verify_export` and `export_log`; `build_report` summarises a window.
Layout of `<root>/audit/`: `segment-<first seq>-<date>.jsonl` (the chain), `checkpoints.jsonl` (signed heads, from
a genesis checkpoint written before the first record; each one a C2SP tlog-checkpoint note body), `audit-key`
(Ed25519, 0600) and `audit-key.pub`, `*.torn` (torn tails set aside), `.lock` (writers' flock).
What holds without trusting the host's files: every record but a bounded live tail is covered by a signed checkpoint;
an export carries a signed statement of its extent; an anchor kept off the host (`runtime.audit.anchor`) shows
rollback or wipe.
"""

from __future__ import annotations

from sealbox.runtime.audit.errors import AuditError, AuditFieldError, AuditFormatError, AuditKeyError, AuditUnavailableError
from sealbox.runtime.audit.export import export_log
from sealbox.runtime.audit.log import AuditLog
from sealbox.runtime.audit.report import build_report
from sealbox.runtime.audit.verify import VerificationReport, verify_directory, verify_export, verify_path

__all__ = [
    "AuditError",
    "AuditFieldError",
    "AuditFormatError",
    "AuditKeyError",
    "AuditLog",
    "AuditUnavailableError",
    "VerificationReport",
    "build_report",
    "export_log",
    "verify_directory",
    "verify_export",
    "verify_path",
]
