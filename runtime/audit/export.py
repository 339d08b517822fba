"""Exports: the records of a time window, with everything an auditor needs to verify them offline.

JSONL (self-contained): line 1 is a header (`format: sealbox-audit-export`), then the records exactly as they lie on
disk, byte for byte, so their hashes still hold. The header carries the window asked for, the seq range exported,
the anchor (seq and hash of the record just before the first one exported), the checkpoints that cover the range,
the host's public key and the hash rule. CSV: one row per record (the authoritative columns are seq, time, event,
fields — canonical JSON —, prev, content_logged and hash; principal, purpose, model… are spreadsheet conveniences,
prefixed with `'` where a spreadsheet would read a formula) and the same header in the companion `<file>.verify.json`.

A linear hash chain can only be checked against a checkpoint at or after its last record, so when the window ends
between two checkpoints the export runs on to the next checkpoint (`last_seq` in the header; `window_last_seq` is
where the window itself ends). `sealbox audit export` signs a checkpoint first, so the next one always exists.

Checkpoints alone cannot show where an export was meant to start or end: records dropped from the front (with the
unsigned anchor moved) or from the end (with their checkpoints) leave a chain that still verifies. So the header
carries a `statement` signed with the host key: the window, the anchor, first and last seq, the record count and the
head hash (`verify.export_statement`); the verifier holds the file to it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sealbox.runtime.audit.checkpoint import CHECKPOINTS_NAME, PUBLIC_KEY_NAME, Checkpoint, key_id, read_public_key
from sealbox.runtime.audit.errors import AuditFormatError
from sealbox.runtime.audit.record import canonical, format_time, stated_hash
from sealbox.runtime.audit.segment import list_segments
from sealbox.runtime.durable_file import write_atomically
from sealbox.runtime.audit.verify import CSV_COLUMNS, EXPORT_FORMAT, companion_path, export_statement

ExportFormat = Literal["jsonl", "csv"]
HASH_RULE = (
    "Each record line is the canonical JSON (sorted keys, no whitespace, UTF-8) of the record without 'hash', with "
    ',"hash":"<hex>" inserted before the final }; hash = SHA-256 of those canonical bytes. prev = the hash of the '
    "record before (the anchor for the first). A checkpoint signs, with Ed25519, the body of a C2SP tlog checkpoint "
    "note: 'sealbox.audit/<16 hex of key>\\n<size>\\n<base64 head>\\n<time>\\n'; head is the hash of record seq = size. "
    "The statement signs 'sealbox-audit-export-statement-v1\\n' + canonical JSON of the statement."
)
_SPREADSHEET_FORMULA = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class ExportResult:
    out: Path
    records: int
    first_seq: int | None
    last_seq: int | None
    window_last_seq: int | None
    companion: Path | None


def _time_of(line: bytes) -> str:
    at = line.rfind(b',"time":"')
    return line[at + 9 : at + 36].decode("ascii", "replace")


def _seq_of(line: bytes) -> int:
    at = line.rfind(b',"seq":')
    end = line.index(b",", at + 7)
    return int(line[at + 7 : end])


def _prev_of(line: bytes) -> str:
    at = line.rfind(b',"prev":"')
    return line[at + 9 : at + 73].decode("ascii", "replace")


def select(
    directory: Path, since: datetime | None, until: datetime | None, through_seq: int | None = None
) -> tuple[list[bytes], tuple[int, str], int | None, list[Checkpoint]]:
    """The lines from the first record at or after `since` to the first checkpoint at or after the last record before
    `until` (and none after `through_seq`); with the anchor, the window's own last seq and the checkpoints covering
    what was selected."""
    checkpoints = _read_checkpoints(directory)
    sizes = sorted({checkpoint.size for checkpoint in checkpoints})
    start = format_time(since) if since else ""
    stop = format_time(until) if until else None
    selected: list[bytes] = []
    anchor: tuple[int, str] | None = None
    window_last: int | None = None
    run_to: int | None = None  # once past the window: the checkpoint to run on to
    for segment in list_segments(directory):
        lines = segment.path.read_bytes().split(b"\n")[:-1]
        for line in lines:
            try:
                moment, seq = _time_of(line), _seq_of(line)
            except ValueError:
                moment, seq = "", -1  # not a record: exported as it is, for the verifier to name
            if through_seq is not None and seq > through_seq:
                break
            if anchor is None:
                if moment < start:
                    continue
                anchor = (seq - 1, _prev_of(line))
            if run_to is None and stop is not None and moment >= stop:
                if window_last is None:
                    return [], anchor, None, []
                run_to = next((size for size in sizes if size >= window_last), window_last)
            if run_to is not None and seq > run_to:
                return selected, anchor, window_last, _covering(checkpoints, anchor[0], selected)
            selected.append(line + b"\n")
            if run_to is None:
                window_last = seq
        else:
            continue
        break
    if anchor is None:
        return [], (0, ""), None, []
    return selected, anchor, window_last, _covering(checkpoints, anchor[0], selected)


def _covering(checkpoints: list[Checkpoint], anchor_seq: int, selected: list[bytes]) -> list[Checkpoint]:
    if not selected:
        return []
    last = _seq_of(selected[-1])
    return [checkpoint for checkpoint in checkpoints if anchor_seq <= checkpoint.size <= last]


def _read_checkpoints(directory: Path) -> list[Checkpoint]:
    try:
        data = (directory / CHECKPOINTS_NAME).read_bytes()
    except FileNotFoundError:
        return []
    found = []
    for line in data.splitlines():
        try:
            found.append(Checkpoint.from_line(line))
        except ValueError:
            continue  # the verifier of the log itself reports it; an export carries only readable checkpoints
    return found


def export_log(
    directory: Path,
    out: Path,
    *,
    sign: Callable[[dict[str, Any]], str],
    since: datetime | None = None,
    until: datetime | None = None,
    fmt: ExportFormat = "jsonl",
    through_seq: int | None = None,
) -> ExportResult:
    """Write the window `[since, until)` to `out` (and its companion for CSV), atomically and readable only by owner.

    `through_seq` caps the export at a checkpointed head, so records appended meanwhile do not trail unsigned;
    `sign` signs the export statement with the host audit key (`AuditLog.sign_statement`).

    Raises:
        AuditFormatError: `directory` holds no audit log or its public key; OSError: `out` cannot be written.
    """
    pub_path = directory / PUBLIC_KEY_NAME
    if not pub_path.exists():
        raise AuditFormatError(f"{directory}: no audit log here ({PUBLIC_KEY_NAME} is missing)")
    public = read_public_key(pub_path)
    lines, anchor, window_last, checkpoints = select(directory, since, until, through_seq)
    first_seq = anchor[0] + 1 if lines else None
    last_seq = _seq_of(lines[-1]) if lines else None
    window = {"since": format_time(since) if since else None, "until": format_time(until) if until else None}
    statement = export_statement(
        window=window, anchor=anchor, first_seq=first_seq, last_seq=last_seq, records=len(lines),
        head=stated_hash(lines[-1]) or "" if lines else anchor[1], key=key_id(public),
    )  # fmt: skip
    header: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "exported_at": format_time(datetime.now().astimezone()),
        "source": str(directory),
        "window": window,
        "records": len(lines),
        "first_seq": first_seq,
        "last_seq": last_seq,
        "window_last_seq": window_last,
        "anchor": {"seq": anchor[0], "hash": anchor[1]},
        "checkpoints": [checkpoint.to_dict() for checkpoint in checkpoints],
        "public_key": pub_path.read_text(encoding="ascii"),
        "key_id": key_id(public),
        "hash_rule": HASH_RULE,
        "statement": statement,
        "statement_sig": sign(statement),
    }
    companion = None
    if fmt == "jsonl":
        write_atomically(out, [canonical(header) + b"\n", *lines], mode=0o600)
    elif fmt == "csv":
        header["records_file"] = out.name
        companion = companion_path(out)
        write_atomically(out, [_csv_bytes(lines)], mode=0o600)
        write_atomically(companion, json.dumps(header, indent=2, ensure_ascii=False).encode() + b"\n", mode=0o600)
    else:
        raise AuditFormatError(f"unknown export format {fmt!r}: use jsonl or csv")
    return ExportResult(out, len(lines), first_seq, last_seq, window_last, companion)


def _csv_bytes(lines: list[bytes]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for line in lines:
        record = json.loads(line)
        fields = record.get("fields", {})
        at = line.index(b',"fields":')
        end = line.rfind(b',"prev":"')
        row = {
            "seq": record.get("seq"),
            "time": record.get("time"),
            "event": record.get("event"),
            "content_logged": "true" if record.get("content_logged") else "",
            "fields": line[at + 10 : end].decode("utf-8"),
            "prev": record.get("prev"),
            "hash": record.get("hash"),
        }
        for name in CSV_COLUMNS:
            if name not in row:
                value = fields.get(name, "") if isinstance(fields, dict) else ""
                row[name] = _cell(value)
        writer.writerow([row[name] for name in CSV_COLUMNS])
    return buffer.getvalue().encode("utf-8")


def _cell(value: object) -> str:
    text = value if isinstance(value, str) else ("" if value is None else json.dumps(value))
    return "'" + text if text.startswith(_SPREADSHEET_FORMULA) else text


