"""What can go wrong with the audit log, as two roots: the disk refused (unavailable) or the input is not what it claims."""

from __future__ import annotations


class AuditError(Exception):
    """Root of every audit-log error."""


class AuditUnavailableError(AuditError):
    """The log cannot make a record durable (disk full, I/O error, closed, or failed before).

    Callers fail closed: the server stops answering rather than serve unlogged. Once raised by a log, that log
    refuses every later append until it is opened again.
    """


class AuditKeyError(AuditUnavailableError):
    """The host audit key is missing, unreadable, malformed or readable by others: no checkpoint can be signed."""


class AuditFieldError(AuditError, TypeError):
    """An event name or field the log cannot record (not JSON, a reserved name): a programming error of the caller."""


class AuditFormatError(AuditError):
    """A file given to export, verify or report is not an audit log, export or public key; the message names it."""
