"""One audit record: its canonical bytes and its hash, the link that makes the log tamper-evident.

A record is a JSON object with the members `seq` (1, 2, …, no gaps), `time` (UTC, microseconds, `Z`), `event`,
`fields` (an object), `prev` (the previous record's `hash`; 64 zeros before record 1), `content_logged` (present,
`true`, only while the policy logs prompt/completion text) and `hash`.

`hash` is the SHA-256, in lower-case hex, of the canonical JSON of the record without `hash`: keys sorted, no
whitespace, UTF-8 (Python's `json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)`). On disk each
record is one line: exactly those canonical bytes with `,"hash":"<hex>"` inserted before the final `}`. So a checker
hashes the line's bytes up to the hash member (plus `}`) without re-serialising, and any byte changed anywhere breaks it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sealbox.runtime.audit.errors import AuditFieldError

GENESIS = "0" * 64
"""`prev` of record 1: there is no record before it."""

EVENTS = frozenset(
    {
        "api.request",
        "auth.failure",
        "api.rate_limited",
        "server.start",
        "server.stop",
        "bundle.install",
        "bundle.activate",
        "bundle.rollback",
        "bundle.refused",
        "trust.add",
        "trust.remove",
        "egress.blocked",
        "audit.torn_tail",
        "audit.retention",
        "audit.export",
        "audit.outage",
    }
)
"""The events sealbox writes. Other dotted lower-case names are accepted, so a new event needs no change here."""

CONTENT_FIELD = "content"
"""The one field that may carry prompt or completion text; dropped unless the policy logs content."""

_EVENT_NAME = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")
HASH_MEMBER = b',"hash":"'
# A line ends with `,"hash":"` + 64 hex + `"}`: the hash sits at a fixed distance from the end.
_TAIL = len(HASH_MEMBER) + 64 + 2
_HEX = frozenset(b"0123456789abcdef")
_REQUIRED = ("event", "fields", "prev", "seq", "time")
_ALLOWED = frozenset((*_REQUIRED, "hash", "content_logged"))
_encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical(value: Any) -> bytes:
    """The canonical JSON bytes of a value: what every hash and signature in the audit log is computed over."""
    return _encoder.encode(value).encode("utf-8")


def format_time(moment: datetime) -> str:
    """UTC, fixed width (`2025-01-31T23:59:59.123456Z`), so times sort as strings."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def check_event_name(event: str) -> bytes:
    """The event as canonical JSON; raises AuditFieldError for a name that is not dotted lower case."""
    if not isinstance(event, str) or not _EVENT_NAME.fullmatch(event):
        raise AuditFieldError(f"audit event name {event!r} is not dotted lower case (e.g. 'api.request')")
    return canonical(event)


def encode_fields(fields: dict[str, Any]) -> bytes:
    """The fields as canonical JSON; raises AuditFieldError naming what JSON cannot carry (NaN, bytes, objects)."""
    try:
        return canonical(fields)
    except (TypeError, ValueError, UnicodeEncodeError) as exc:
        raise AuditFieldError(f"audit fields cannot be recorded as JSON: {exc}") from exc


def encode_record(
    *, seq: int, time: str, event_json: bytes, fields_json: bytes, prev: str, content_logged: bool
) -> tuple[bytes, str]:
    """The record's line (with its newline) and its hash, built directly in canonical key order."""
    body = b"".join(
        (
            b'{"content_logged":true,"event":' if content_logged else b'{"event":',
            event_json,
            b',"fields":',
            fields_json,
            b',"prev":"',
            prev.encode("ascii"),
            b'","seq":',
            str(seq).encode("ascii"),
            b',"time":"',
            time.encode("ascii"),
            b'"}',
        )
    )
    digest = hashlib.sha256(body).hexdigest()
    return b"".join((body[:-1], HASH_MEMBER, digest.encode("ascii"), b'"}\n')), digest


class RecordError(ValueError):
    """A line that is not an intact record; the message says what is wrong, `seq` what it claims to be (if known)."""

    def __init__(self, message: str, *, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    time: str
    event: str
    fields: dict[str, Any]
    prev: str
    hash: str
    content_logged: bool = False


def stated_hash(line: bytes) -> str | None:
    """The hash a line claims for itself, or None when the line does not end in a well-formed hash member."""
    line = line.rstrip(b"\n")
    if len(line) < _TAIL + 2 or line[-_TAIL:-66] != HASH_MEMBER or line[-2:] != b'"}':
        return None
    digest = line[-66:-2]
    if not _HEX.issuperset(digest):
        return None
    return digest.decode("ascii")


def parse_record(line: bytes) -> Record:
    """Parse one line and check its own hash; raises RecordError saying why it is not an intact record.

    Checks only the record itself. Whether it links to its neighbours is the verifier's business.
    """
    line = line.rstrip(b"\n")
    claimed = stated_hash(line)
    if claimed is None:
        raise RecordError("not a record line: it does not end with a hash member")
    body = line[:-_TAIL] + b"}"
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RecordError("not a JSON object")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise RecordError(f"missing member(s): {', '.join(missing)}")
    extra = sorted(set(data) - _ALLOWED)
    if extra:
        raise RecordError(f"unexpected member(s): {', '.join(extra)}")
    event, fields, prev, seq, time = (data[key] for key in _REQUIRED)
    if type(seq) is not int or seq < 1:
        raise RecordError(f"seq {seq!r} is not a positive integer")
    if not (isinstance(event, str) and isinstance(time, str) and isinstance(prev, str) and isinstance(fields, dict)):
        raise RecordError("event, time and prev must be strings and fields an object", seq=seq)
    content_logged = data.get("content_logged", False)
    if content_logged is not False and content_logged is not True:
        raise RecordError("content_logged must be true when present", seq=seq)
    if hashlib.sha256(body).hexdigest() != claimed:
        raise RecordError("its hash does not match its content: the record was changed after it was written", seq=seq)
    return Record(seq, time, event, fields, prev, claimed, bool(content_logged))
