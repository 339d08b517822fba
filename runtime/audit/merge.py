"""Several hosts' audit exports in one report for the auditor, each part still verifiable on its own.

Logs stay per host: a gateway's records name the engine host that served each request, and each engine host keeps
its own chain and key. `merge` first verifies every part against its host's public key (pinned by the auditor),
then writes one JSONL file: a manifest line (`format: sealbox-audit-merge`: per part the host, the key id, the
line count, the sha256 of its bytes and its seq range) followed by every part's bytes exactly as exported, so each
part's hashes and checkpoint signatures still hold. `verify_merged` splits the file back by the manifest's line
counts, checks each part's digest and verifies it like a single export.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sealbox.runtime.audit.errors import AuditFormatError
from sealbox.runtime.durable_file import write_atomically
from sealbox.runtime.audit.verify import VerificationReport, verify_export

MERGE_FORMAT = "sealbox-audit-merge"


class MergeError(Exception):
    """A part does not verify, or the merged report is not what its manifest says; the message names the part."""


@dataclass(frozen=True)
class Part:
    host: str
    export: Path
    pubkey: Path


@dataclass
class MergedReport:
    source: str
    parts: dict[str, VerificationReport] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(report.ok for report in self.parts.values())

    def __bool__(self) -> bool:
        return self.ok


def _verified(host: str, path: Path, pubkey: Path) -> VerificationReport:
    try:
        report = verify_export(path, pubkey=pubkey)
    except AuditFormatError as exc:
        raise MergeError(f"{host}: {exc}") from exc
    return report


def merge_exports(parts: list[Part], out: Path) -> dict[str, object]:
    """Verify each part against its host's key, then write the merged report atomically; returns the manifest.

    Raises:
        MergeError: two parts share a host name, or a part does not verify (nothing is written then).
        OSError: `out` cannot be written.
    """
    hosts = [part.host for part in parts]
    if len(set(hosts)) != len(hosts) or not parts:
        raise MergeError(f"give each host once, at least one: {hosts}")
    entries, bodies = [], []
    for part in parts:
        report = _verified(part.host, part.export, part.pubkey)
        if not report.ok:
            raise MergeError(f"{part.host}: {part.export} does not verify: {report.first_problem}")
        data = part.export.read_bytes()
        if not data.endswith(b"\n"):
            data += b"\n"
        entries.append({"host": part.host, "key_id": report.key_id, "lines": data.count(b"\n"),
                        "sha256": hashlib.sha256(data).hexdigest(), "records": report.records,
                        "first_seq": report.first_seq, "last_seq": report.last_seq})  # fmt: skip
        bodies.append(data)
    manifest = {"format": MERGE_FORMAT, "parts": entries}
    head = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    write_atomically(out, [head, *bodies], mode=0o600)
    return manifest


def verify_merged(path: Path, pubkeys: dict[str, Path]) -> MergedReport:
    """Verify every part of a merged report against the key the auditor pins for its host.

    Raises:
        MergeError: the file is not a merged report, or a part's host has no pinned key.
    """
    lines = path.read_bytes().split(b"\n")
    try:
        manifest = json.loads(lines[0])
        entries = manifest["parts"] if manifest.get("format") == MERGE_FORMAT else None
    except (ValueError, KeyError, TypeError, AttributeError):
        entries = None
    if not isinstance(entries, list):
        raise MergeError(f"{path}: not a sealbox merged audit report (no '{MERGE_FORMAT}' manifest)")
    report = MergedReport(source=str(path))
    position = 1
    with tempfile.TemporaryDirectory(prefix="sealbox-merge-") as scratch:
        for entry in entries:
            host, count = str(entry.get("host")), entry.get("lines")
            if host not in pubkeys:
                raise MergeError(f"{path}: no public key given for host {host!r}")
            if type(count) is not int or count < 1 or position + count > len(lines):
                report.problems.append(f"{host}: the manifest's line count does not fit the file")
                break
            data = b"\n".join(lines[position:position + count]) + b"\n"
            position += count
            if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                report.problems.append(f"{host}: its part's bytes differ from the manifest's sha256")
            part_path = Path(scratch) / f"{len(report.parts)}.jsonl"
            part_path.write_bytes(data)
            report.parts[host] = _verified(host, part_path, pubkeys[host])
    if position != len(lines) - 1 or lines[-1] != b"":
        report.problems.append("the file holds bytes after the last part the manifest names")
    return report
