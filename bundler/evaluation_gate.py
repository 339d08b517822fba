"""The evaluation gate of `bundle install`: a release whose suite fails never becomes `current`.

The bundle carries its suite as a blob of role `eval` (`eval/suite.json`, written by `bundle create --eval-suite`). The
installer calls `gate_release` with the staged release (built whole in staging, not yet placed): the suite runs against a
private `sealbox serve` child of that release (its own interpreter, models and policy; loopback, a free port, a
throw-away API key), the result is written beside the release (`evaluation.json`) and into the appliance's audit log
(`bundle.eval`), and a failing suite raises: the installer then stops before placing the release, so the live release
keeps serving and the new one stays in staging, with its result, for the operator to read (`bundle list`).

`--skip-eval` is a decision, not a default: it is asked (refused without an answer), and recorded (`bundle.eval.skipped`).
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealbox.bundler.audit_trail import record
from sealbox.bundler.errors import BundleError, InputError
from sealbox.bundler.manifest import BlobEntry, Manifest
from sealbox.bundler.sources import Artifact
from sealbox.runtime.evaluation import RESULT_FILE, EvalClient, EvalRequestError, Suite, SuiteError, read_result, run_suite
from sealbox.runtime.evaluation import record_expected as record_outputs
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.staging_server import StagingServer, StagingServerError, release_python
from sealbox.runtime.durable_file import write_atomically
from sealbox.runtime.exit_codes import ExitCode

SUITE_ROLE = "eval"
SUITE_PATH = "eval/suite.json"
STAGED_GLOB = "install-*"


class EvaluationFailedError(BundleError):
    """The bundle's evaluation suite did not pass against the staged release (or could not run): not activated."""

    exit_code = ExitCode.EVALUATION_FAILED


class EvaluationSkipDeclinedError(EvaluationFailedError):
    """`--skip-eval` was given but not confirmed."""


@dataclass(frozen=True)
class GateOutcome:
    status: str
    """`passed`, `skipped`, or `none` (the bundle carries no suite). A failure raises instead."""
    summary: str

    def to_dict(self) -> dict[str, str]:
        return {"status": self.status, "summary": self.summary}


def suite_entry(manifest: Manifest) -> BlobEntry | None:
    """Raises EvaluationFailedError when a bundle carries more than one suite (which one gates would be ambiguous)."""
    entries = manifest.entries(SUITE_ROLE)  # type: ignore[arg-type]
    if len(entries) > 1:
        raise EvaluationFailedError(f"the bundle carries {len(entries)} evaluation suites; one gates a release")
    return entries[0] if entries else None


def _write_result(release_dir: Path, data: dict[str, Any]) -> None:
    # Replaced, never written through: whatever is at that name (a link into the store) is not followed.
    write_atomically(release_dir / RESULT_FILE, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"),
                     mode=0o644)


def already_passed(release_dir: Path, manifest_sha256: str) -> bool:
    """A placed release whose stored result passed for this very manifest (an install resumed after a crash)."""
    stored = read_result(release_dir)
    return bool(stored and stored.get("manifest_sha256") == manifest_sha256 and stored.get("status") in ("passed", "skipped", "none"))


def gate_release(
    *,
    root: HostRoot,
    manifest: Manifest,
    manifest_sha256: str,
    release_dir: Path,
    models: dict[str, Path],
    blob: Callable[[BlobEntry], Path],
    skip: bool,
    confirm: Callable[[str], bool] | None,
) -> GateOutcome:
    """Run the bundle's suite against the release in `release_dir` before it is switched live.

    `models` maps each served name to its verified GGUF file; `blob` gives where a manifest entry's verified bytes are.

    Raises:
        EvaluationFailedError: the suite failed or could not run (recorded as `bundle.eval`, status failed).
        EvaluationSkipDeclinedError: `skip` was asked for and not confirmed.
        AuditTrailError: the outcome could not be recorded (fail closed: nothing goes live unrecorded).
    """
    from sealbox.bundler.releases import policy_in_force

    label = release_dir.name if release_dir.name != "release" else release_dir.parent.name.removeprefix("install-")
    fields = {"name": manifest.name, "version": manifest.version, "manifest_sha256": manifest_sha256, "release": label}
    entry = suite_entry(manifest)
    if entry is None:
        _write_result(release_dir, {"status": "none", "manifest_sha256": manifest_sha256})
        return GateOutcome("none", "the bundle carries no evaluation suite")
    if skip:
        question = (f"skip the evaluation suite of {manifest.name} version {manifest.version} and make it live "
                    "without evaluating it (recorded in the audit log)?")  # fmt: skip
        if confirm is None or not confirm(question):
            raise EvaluationSkipDeclinedError(
                f"--skip-eval for {manifest.name} version {manifest.version} was not confirmed (use --yes in a script)"
            )
        record(root, "bundle.eval.skipped", policy_in_force(root), **fields, suite_sha256=entry.sha256)
        _write_result(release_dir, {"status": "skipped", "manifest_sha256": manifest_sha256})
        return GateOutcome("skipped", "evaluation skipped (--skip-eval, confirmed and recorded)")
    try:
        suite = Suite.load(blob(entry))
        with tempfile.TemporaryDirectory(prefix="sealbox-eval-") as work:
            server = StagingServer(
                python=release_python(release_dir),
                models=models,
                policy_text=(release_dir / "policy.toml").read_text(encoding="utf-8"),
                work=Path(work),
                threads=suite.staging.threads,
                start_timeout_s=suite.staging.start_timeout_s,
            )
            with server:
                result = run_suite(suite, EvalClient(server.base_url, server.api_key))
    except (SuiteError, StagingServerError, OSError) as exc:
        reason = f"the evaluation suite could not run: {exc}"
        _write_result(release_dir, {"status": "failed", "manifest_sha256": manifest_sha256, "error": reason})
        record(root, "bundle.eval", policy_in_force(root), **fields, passed=False, error=reason[:2000])
        raise EvaluationFailedError(f"{manifest.name} version {manifest.version} not activated: {reason}") from exc
    status = "passed" if result.passed else "failed"
    _write_result(release_dir, {"status": status, "manifest_sha256": manifest_sha256, **result.to_dict()})
    record(root, "bundle.eval", policy_in_force(root), **fields, **result.audit_fields())
    if not result.passed:
        raise EvaluationFailedError(
            f"{manifest.name} version {manifest.version} not activated: {result.summary()}; the previous release "
            f"keeps serving, the new one stays staged ({release_dir}; result in {RESULT_FILE})"
        )
    return GateOutcome("passed", result.summary())


def suite_artifact(
    path: Path, *, models: dict[str, Path], policy_text: str, record_expected: bool, work: Path, threads: int | None = None
) -> Artifact:
    """`bundle create --eval-suite`: the suite checked (and with `record_expected`, each case's exact greedy output
    recorded by serving `models` on this host), written as `eval/suite.json`.

    Raises:
        InputError: the suite is invalid, has a case with nothing to check, or could not be recorded.
    """
    try:
        suite = Suite.load(path)
        if record_expected:
            with tempfile.TemporaryDirectory(prefix="sealbox-record-") as temp:
                server = StagingServer(python=Path(sys.executable), models=models, policy_text=policy_text,
                                       work=Path(temp), threads=threads or suite.staging.threads,
                                       start_timeout_s=suite.staging.start_timeout_s)  # fmt: skip
                with server:
                    suite = record_outputs(suite, EvalClient(server.base_url, server.api_key))
        suite.require_checks()
    except SuiteError as exc:
        raise InputError(f"--eval-suite: {exc}") from exc
    except (StagingServerError, EvalRequestError) as exc:
        raise InputError(f"--record-expected: {exc}") from exc
    work.mkdir(parents=True, exist_ok=True)
    out = work / "eval-suite.json"
    out.write_bytes(suite.to_json())
    return Artifact(role="eval", path=SUITE_PATH, file=out, provenance=str(path.absolute()),
                    meta={"cases": len(suite.cases), "min_pass": suite.min_pass, "recorded_with": suite.recorded_with})  # fmt: skip


def staged_results(root: HostRoot) -> list[tuple[str, dict[str, Any]]]:
    """(release label, stored result) of each release left in staging by a failed gate, for `bundle list`."""
    found = []
    for stage in sorted(root.staging.glob(STAGED_GLOB)) if root.staging.is_dir() else []:
        result = read_result(stage / "release")
        if result is not None:
            found.append((stage.name.removeprefix("install-"), result))
    return found
