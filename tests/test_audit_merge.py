"""`sealbox audit merge`: several hosts' exports in one report, each part verified against its own host's key."""

from __future__ import annotations

from pathlib import Path

import pytest

from server_support import sealbox

from sealbox.runtime.audit.checkpoint import PUBLIC_KEY_NAME
from sealbox.runtime.audit.log import AuditLog
from sealbox.runtime.policy import AuditPolicy


def _host(tmp_path: Path, name: str, records: int) -> tuple[Path, Path]:
    """A host's audit log with `records` requests, exported with the real CLI; returns (export, public key copy)."""
    root = tmp_path / name
    log = AuditLog.open(root / "audit", AuditPolicy())
    for i in range(records):
        log.append("api.request", request_id=f"{name}-{i}", principal="gateway", engine_host=name, status=200)
    log.close()
    export = tmp_path / f"{name}.jsonl"
    sealbox("audit", "export", "--out", str(export), root=root)
    key = tmp_path / f"{name}.pub"
    key.write_bytes((root / "audit" / PUBLIC_KEY_NAME).read_bytes())  # "obtained independently" by the auditor
    return export, key


@pytest.fixture
def hosts(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    return {name: _host(tmp_path, name, n) for name, n in (("gateway", 3), ("e1", 2), ("e2", 4))}


def _merge(hosts: dict[str, tuple[Path, Path]], out: Path, keys: dict[str, Path] | None = None) -> object:
    keys = keys or {name: key for name, (_, key) in hosts.items()}
    args = [f"{name}={export}" for name, (export, _) in hosts.items()]
    args += [f"--pubkey={name}={key}" for name, key in keys.items()]
    return sealbox("audit", "merge", *args, "--out", str(out), check=False)


def _verify(hosts: dict[str, tuple[Path, Path]], report: Path) -> object:
    keys = [f"--pubkey={name}={key}" for name, (_, key) in hosts.items()]
    return sealbox("audit", "verify-merged", str(report), *keys, check=False)


def test_three_hosts_exports_merge_into_one_report_that_verifies_part_by_part(
    hosts: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    report = tmp_path / "report.jsonl"
    merged = _merge(hosts, report)
    assert merged.returncode == 0, merged.stderr  # type: ignore[attr-defined]
    checked = _verify(hosts, report)
    assert checked.returncode == 0, checked.stdout + checked.stderr  # type: ignore[attr-defined]
    assert [line.split(":")[0] for line in checked.stdout.splitlines()] == ["gateway", "e1", "e2"]  # type: ignore[attr-defined]


def test_merge_refuses_a_part_that_does_not_verify_against_its_hosts_key(
    hosts: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    keys = {name: key for name, (_, key) in hosts.items()}
    keys["e1"] = keys["e2"]  # e1's export presented with another host's key
    report = tmp_path / "report.jsonl"
    merged = _merge(hosts, report, keys)
    assert merged.returncode == 1 and "e1" in merged.stderr  # type: ignore[attr-defined]
    assert not report.exists()


def test_a_merged_report_with_one_flipped_byte_fails_verification(hosts: dict[str, tuple[Path, Path]],
                                                                tmp_path: Path) -> None:  # fmt: skip
    report = tmp_path / "report.jsonl"
    assert _merge(hosts, report).returncode == 0  # type: ignore[attr-defined]
    data = bytearray(report.read_bytes())
    at = data.index(b'"e2-1"') + 2  # inside host e2's part
    data[at] ^= 0x01
    report.write_bytes(bytes(data))
    checked = _verify(hosts, report)
    assert checked.returncode == 1  # type: ignore[attr-defined]
    assert "e2: FAILED" in checked.stdout and "e1: ok" in checked.stdout  # type: ignore[attr-defined]
