"""The record of processing (GDPR Art. 30) for a window: who used which model, for what purpose, on which day.

Counts come from `api.request` records (requests, prompt and completion tokens) by purpose, principal, model
(name and sha256) and UTC day; every other event is counted by name, so refusals, auth failures, 429s, bundle and
trust changes and egress blocks show beside the traffic. The chain is verified in the same pass over the files,
so a report never presents figures from a log that does not hold.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sealbox.runtime.audit.record import format_time
from sealbox.runtime.audit.segment import list_segments
from sealbox.runtime.audit.verify import VerificationReport, verify_directory

UNSPECIFIED = "(none)"


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, fields: dict[str, Any]) -> None:
        self.requests += 1
        self.prompt_tokens += _count(fields.get("prompt_tokens"))
        self.completion_tokens += _count(fields.get("completion_tokens"))


def _count(value: object) -> int:
    return value if type(value) is int and value > 0 else 0


@dataclass
class ProcessingReport:
    source: str
    since: str | None
    until: str | None
    records: int = 0
    first_time: str | None = None
    last_time: str | None = None
    total: Usage = field(default_factory=Usage)
    by_purpose: dict[str, Usage] = field(default_factory=lambda: defaultdict(Usage))
    by_principal: dict[str, Usage] = field(default_factory=lambda: defaultdict(Usage))
    by_model: dict[str, Usage] = field(default_factory=lambda: defaultdict(Usage))
    by_day: dict[str, Usage] = field(default_factory=lambda: defaultdict(Usage))
    by_status: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    content_logged: int = 0
    integrity: VerificationReport | None = None

    def add(self, record: dict[str, Any]) -> None:
        self.records += 1
        moment = record.get("time", "")
        self.first_time = self.first_time or moment
        self.last_time = moment
        event = record.get("event", "")
        self.events[event] += 1
        if record.get("content_logged"):
            self.content_logged += 1
        fields = record.get("fields")
        if event != "api.request" or not isinstance(fields, dict):
            return
        self.total.add(fields)
        self.by_purpose[_label(fields.get("purpose"))].add(fields)
        self.by_principal[_label(fields.get("principal"))].add(fields)
        model = _label(fields.get("model"))
        digest = fields.get("model_sha256")
        self.by_model[f"{model} ({digest})" if isinstance(digest, str) and digest else model].add(fields)
        self.by_day[moment[:10]].add(fields)
        self.by_status[_label(fields.get("status"))] += 1

    def to_dict(self) -> dict[str, Any]:
        def table(rows: dict[str, Usage]) -> dict[str, dict[str, int]]:
            return {key: vars(usage) for key, usage in sorted(rows.items())}

        return {
            "source": self.source,
            "window": {"since": self.since, "until": self.until},
            "records": self.records,
            "first_time": self.first_time,
            "last_time": self.last_time,
            "requests": vars(self.total),
            "by_purpose": table(self.by_purpose),
            "by_principal": table(self.by_principal),
            "by_model": table(self.by_model),
            "by_day": table(self.by_day),
            "by_status": dict(sorted(self.by_status.items())),
            "events": dict(sorted(self.events.items())),
            "content_logged_records": self.content_logged,
            "integrity": self.integrity.to_dict() if self.integrity else None,
        }


def _label(value: object) -> str:
    if value is None or value == "":
        return UNSPECIFIED
    return value if isinstance(value, str) else json.dumps(value)


def build_report(
    directory: Path, *, since: datetime | None = None, until: datetime | None = None, pubkey: Path | None = None
) -> ProcessingReport:
    """Summarise the records with `since <= time < until` in a host's audit directory, and verify the whole chain.

    Raises:
        AuditFormatError: the directory is not an audit log, or its public key cannot be read.
    """
    start = format_time(since) if since else ""
    stop = format_time(until) if until else None
    report = ProcessingReport(str(directory), start or None, stop)
    report.integrity = verify_directory(directory, pubkey=pubkey)
    for segment in list_segments(directory):
        for line in segment.path.read_bytes().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the integrity section names it
            if not isinstance(record, dict):
                continue
            moment = record.get("time", "")
            if not isinstance(moment, str) or moment < start or (stop is not None and moment >= stop):
                continue
            report.add(record)
    return report
