"""The appliance's self-check: one report a compliance officer can read, and `serve --strict`'s gate.

Each check is a small function from the installed `Appliance` to a `Finding`; `run_doctor` runs them all and never
lets one crash the report (a crashing check is a failure). Nothing here sends a packet: the network is read from
the kernel's tables, the guard is probed with `sys.audit`, the firewall with `nft list`.

The manifest signature is checked by a verifier the `bundler` side registers (`set_manifest_verifier`), because
the signature format and the trust store belong to the bundle code and `runtime` never imports `bundler`; a
process without one reports the signature as unknown rather than guessing at the format.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from functools import cached_property
from pathlib import Path

from sealbox.runtime.audit.errors import AuditFormatError
from sealbox.runtime.audit.verify import verify_directory
from sealbox.runtime.egress.allowlist import Allowlist, IPNetwork
from sealbox.runtime.egress.guard import GuardStatus, active_guard, guard_status_path
from sealbox.runtime.egress.offline_env import offline_environment_gaps
from sealbox.runtime.egress.routes import NetworkTablesError, Route, read_network
from sealbox.runtime.egress.walls import read_walls
from sealbox.runtime.engine.accelerator import (
    AcceleratorError,
    Driver,
    EngineBuild,
    Gpu,
    NoDriver,
    cuda_device_nodes,
    decide,
    probe_driver,
)
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.memory_plan import MemoryPlanError, host_memory_bytes, plan_for_policy, split_for_plan
from sealbox.runtime.mesh.checkup import MeshCheck, check_installed_keys, check_peers
from sealbox.runtime.policy import Policy, PolicyError, default_policy_text, is_loopback_host
from sealbox.runtime.regular_file import sha256_regular
from sealbox.runtime.release import (
    ReleaseFileError,
    check_release_file,
    current_directory,
    is_model_directory_file,
    read_record,
    release_files,
    signed_payload,
)
from sealbox.runtime.sizes import format_size

SYSTEMD_DIR = Path("/etc/systemd/system")
UNIT_NAME = "sealbox.service"
EXPOSURE_LIMIT = 2.0
_TRUE = {"yes", "true", "on", "1"}
# The sandbox the install issue asks the unit for, as a test of each directive's last value; a rendered unit
# without one of these (or with it switched off) has a hole.
REQUIRED_UNIT_DIRECTIVES: dict[str, Callable[[str], bool]] = {
    "IPAddressDeny": lambda v: "any" in v.split(),
    "RestrictAddressFamilies": lambda v: bool(v) and not v.startswith("~") and "AF_PACKET" not in v.split(),
    # No resolver: the release's empty resolv.conf bound over the system's (issue 13).
    "BindReadOnlyPaths": lambda v: any(item.endswith(":/etc/resolv.conf") for item in v.split()),
    "NoNewPrivileges": lambda v: v.lower() in _TRUE,
    "ProtectSystem": lambda v: v == "strict",
    "PrivateTmp": lambda v: v.lower() in _TRUE,
    "ProtectHome": lambda v: v.lower() in _TRUE | {"read-only", "tmpfs"},
    "CapabilityBoundingSet": lambda v: v == "",
    "SystemCallFilter": lambda v: bool(v),
    "SystemCallArchitectures": lambda v: v == "native",
    "DevicePolicy": lambda v: v in ("closed", "strict"),
}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_EXPOSURE = re.compile(r"Overall exposure level for \S+: ([0-9.]+) (\S+)")
_NFT_TABLE = re.compile(r"^\s*table\s+(\w+)\s+([\w-]+)", re.MULTILINE)
_COMMAND_TIMEOUT_S = 20


class CheckStatus(str, Enum):
    PASS = "pass"
    WARN = "warn"  # works, but the lockdown is weaker than it could be; --strict lets it through
    FAIL = "fail"  # --strict (and `serve --strict`) refuse
    UNKNOWN = "unknown"  # could not be determined here; the finding says why


@dataclass(frozen=True)
class Finding:
    status: CheckStatus
    summary: str
    details: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckResult:
    name: str
    title: str
    status: CheckStatus
    summary: str
    details: tuple[str, ...] = ()


@dataclass(frozen=True)
class DoctorReport:
    root: str
    created_at: str
    checks: tuple[CheckResult, ...]

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(check for check in self.checks if check.status is CheckStatus.FAIL)

    @property
    def ok(self) -> bool:
        return not self.failures

    def check(self, name: str) -> CheckResult:
        """The result of one check by name. Raises KeyError for a name the doctor does not run."""
        for result in self.checks:
            if result.name == name:
                return result
        raise KeyError(name)

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "root": self.root,
            "created_at": self.created_at,
            "failures": [check.name for check in self.failures],
            "checks": [{**asdict(check), "status": check.status.value} for check in self.checks],
        }


class DoctorFailedError(Exception):
    """`run_doctor(strict=True)` found failures; the message names each."""

    def __init__(self, report: DoctorReport) -> None:
        lines = "; ".join(f"{check.title}: {check.summary}" for check in report.failures)
        super().__init__(f"sealbox doctor found {len(report.failures)} failure(s): {lines}")
        self.report = report


ManifestVerifier = Callable[[Path, Path], Finding]
"""verifier(release_dir, trust_dir) -> Finding: the signed manifest of the release against the host's trust store."""

_manifest_verifier: ManifestVerifier | None = None


def set_manifest_verifier(verifier: ManifestVerifier | None) -> None:
    """Register the signature check (the `sealbox` command does this from `bundler`); None removes it."""
    global _manifest_verifier
    _manifest_verifier = verifier


@dataclass
class Appliance:
    """The installed appliance as the checks see it. Reads lazily, and keeps what went wrong instead of raising."""

    root: HostRoot
    systemd_dir: Path = SYSTEMD_DIR
    problems: dict[str, str] = field(default_factory=dict)

    @cached_property
    def release_dir(self) -> Path | None:
        try:
            return current_directory(self.root)
        except ReleaseFileError as exc:
            self.problems["release"] = str(exc)
            return None

    @cached_property
    def release_record(self) -> dict[str, object]:
        """release.json, or {} (with the reason in `problems`)."""
        if self.release_dir is None:
            return {}
        try:
            return read_record(self.release_dir).to_dict()
        except ReleaseFileError as exc:
            self.problems["release.json"] = str(exc)
            return {}

    @cached_property
    def manifest_digests(self) -> frozenset[str] | None:
        """Every sha256 the release's signed manifest names (the payload of its DSSE envelope)."""
        if self.release_dir is None:
            return None
        try:
            payload = signed_payload(self.release_dir)
        except ReleaseFileError as exc:
            self.problems["manifest.json"] = str(exc)
            return None
        return frozenset(_sha256_values(payload))

    @cached_property
    def policy(self) -> Policy:
        """The release's policy.toml, else the shipped default (a broken release policy is a problem, not a crash)."""
        if self.release_dir is not None and (path := self.release_dir / "policy.toml").exists():
            try:
                return Policy.load(path)
            except PolicyError as exc:
                self.problems["policy"] = str(exc)
        return Policy.default()

    @cached_property
    def server_status(self) -> GuardStatus | None:
        """The running server's guard report, when one is running (its pid is alive)."""
        path = guard_status_path(self.root)
        try:
            status = GuardStatus.read(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self.problems["server"] = f"{path}: {exc}"
            return None
        if not status.is_live():
            self.problems["server"] = f"{path} names pid {status.pid}, which is not running (stale)"
            return None
        return status


Check = Callable[[Appliance], Finding]


def check_release(appliance: Appliance) -> Finding:
    if appliance.release_dir is None:
        return Finding(CheckStatus.FAIL, appliance.problems["release"])
    record = appliance.release_record
    if "release.json" in appliance.problems:
        return Finding(CheckStatus.FAIL, appliance.problems["release.json"])
    label = f"{record.get('name', '?')} version {record.get('version', '?')}"
    details = [f"directory: {appliance.release_dir}"]
    appliance.policy  # noqa: B018 - loading it records a broken policy
    if "policy" in appliance.problems:
        return Finding(CheckStatus.FAIL, f"{label}: its policy does not load", (appliance.problems["policy"], *details))
    return Finding(CheckStatus.PASS, label, tuple(details))


def check_manifest_signature(appliance: Appliance) -> Finding:
    if appliance.release_dir is None:
        return Finding(CheckStatus.FAIL, "no active release to verify")
    if _manifest_verifier is None:
        return Finding(
            CheckStatus.UNKNOWN,
            "no manifest verifier in this process",
            ("the `sealbox` command registers it; `sealbox bundle verify` checks a bundle directly",),
        )
    return _manifest_verifier(appliance.release_dir, appliance.root.trust)


def check_models(appliance: Appliance) -> Finding:
    if appliance.release_dir is None:
        return Finding(CheckStatus.FAIL, "no active release")
    models = appliance.release_record.get("models")
    if (not isinstance(models, list) or not models) and _model_directory_files(appliance):
        return Finding(CheckStatus.PASS, f"a vLLM model directory of {_model_directory_files(appliance)} file(s), "
                       "checked byte for byte with the release's files")  # fmt: skip
    if not isinstance(models, list) or not models:
        reason = appliance.problems.get("release.json", "release.json lists no models")
        return Finding(CheckStatus.FAIL, reason)
    signed = appliance.manifest_digests
    details: list[str] = []
    bad = 0
    for entry in models:
        line, ok = _check_model(appliance.release_dir, entry, signed)
        details.append(line)
        bad += not ok
    if signed is None:
        details.append(appliance.problems["manifest.json"])
        bad += 1
    if bad:
        return Finding(CheckStatus.FAIL, f"{bad} problem(s) in {len(models)} model(s)", tuple(details))
    return Finding(CheckStatus.PASS, f"{len(models)} model(s) match the signed manifest", tuple(details))


def _model_directory_files(appliance: Appliance) -> int:
    """How many files of a model directory (safetensors, for vLLM) the release's signed manifest names."""
    if appliance.release_dir is None:
        return 0
    try:
        blobs = signed_payload(appliance.release_dir)["blobs"]
    except ReleaseFileError:
        return 0
    return sum(1 for blob in blobs if isinstance(blob, dict) and is_model_directory_file(blob.get("meta")))


def check_release_files(appliance: Appliance) -> Finding:
    """Every other file of the release (policy, plain files, SBOM, wheels), every byte, against the signed digests;
    the models are the `models` check's (so a tampered model is reported once)."""
    if appliance.release_dir is None:
        return Finding(CheckStatus.FAIL, "no active release")
    try:
        signed = release_files(appliance.root, appliance.release_dir, default_policy=default_policy_text().encode())
    except ReleaseFileError as exc:
        return Finding(CheckStatus.FAIL, str(exc))
    # GGUF models are the `models` check's; a model directory's files (vLLM) are checked here, each a plain file.
    files = [file for file in signed if file.role != "model" or file.path.count("/") == 2]
    problems = [problem for file in files if (problem := check_release_file(file)) is not None]
    if problems:
        return Finding(CheckStatus.FAIL, f"{len(problems)} of {len(files)} file(s) are not the signed bytes", tuple(problems))
    roles = ", ".join(sorted({file.role for file in files}))
    return Finding(CheckStatus.PASS, f"{len(files)} file(s) ({roles}) match the signed manifest")


def check_trust_store(appliance: Appliance) -> Finding:
    trust = appliance.root.trust
    if not trust.is_dir():
        return Finding(CheckStatus.FAIL, f"no trust store: {trust} does not exist")
    keys = sorted(p.name for p in trust.iterdir() if p.is_file() and not p.name.startswith("."))
    if not keys:
        return Finding(CheckStatus.FAIL, f"trust store {trust} is empty: no publisher key is trusted")
    return Finding(CheckStatus.PASS, f"{len(keys)} file(s) in {trust}", tuple(keys))


def check_audit_chain(appliance: Appliance) -> Finding:
    audit_dir = appliance.root.audit
    if not audit_dir.is_dir():
        return Finding(CheckStatus.WARN, f"no audit log yet: {audit_dir} does not exist")
    try:
        verification = verify_directory(audit_dir)
    except AuditFormatError as exc:
        return Finding(CheckStatus.FAIL, str(exc))
    details = (*verification.warnings, *(str(problem) for problem in verification.problems[:10]))
    status = CheckStatus.PASS if verification.ok else CheckStatus.FAIL
    return Finding(status, verification.summary(), details)


def check_egress_guard(appliance: Appliance) -> Finding:
    guard = active_guard()
    if guard is None:
        return Finding(CheckStatus.FAIL, "not installed in this process")
    expected = Allowlist.from_policy(appliance.policy.egress)
    details = (
        f"installed {guard.installed_at.isoformat(timespec='seconds')}",
        f"allowlist: {guard.allowlist.describe()}",
        f"refusals so far: {guard.refused}",
    )
    if not guard.self_test():
        return Finding(CheckStatus.FAIL, "installed, but a probe DNS name was not refused", details)
    if guard.allowlist != expected:
        return Finding(CheckStatus.FAIL, f"allowlist differs from the policy's ({expected.describe()})", details)
    return Finding(CheckStatus.PASS, "active: refuses a probe DNS name (nothing looked up)", details)


def check_server_guard(appliance: Appliance) -> Finding:
    status = appliance.server_status
    if status is None:
        reason = appliance.problems.get("server", f"no running server has written {guard_status_path(appliance.root)}")
        return Finding(CheckStatus.UNKNOWN, reason)
    details = (f"pid {status.pid}", f"installed {status.installed_at}", f"allowlist: {status.allowlist}")
    if status.pid == os.getpid():
        return Finding(CheckStatus.PASS, "this process (see the check above)", details)
    if not status.self_test:
        return Finding(CheckStatus.FAIL, f"server pid {status.pid} reports its guard failed its self-test", details)
    return Finding(CheckStatus.PASS, f"server pid {status.pid} reports its guard active", details)


def check_network(appliance: Appliance) -> Finding:
    status = appliance.server_status
    proc_net, whose = (Path(f"/proc/{status.pid}/net"), f"server pid {status.pid}") if status else (Path("/proc/net"), "this process")
    try:
        view = read_network(proc_net)
    except NetworkTablesError as exc:
        return Finding(CheckStatus.UNKNOWN, str(exc))
    clients = [ipaddress.ip_network(c, strict=False) for c in appliance.policy.service.client_networks]
    details = [f"namespace of {whose}; interfaces: {', '.join(view.interfaces)}"]
    unexpected = [r for r in view.egress_routes if not _inside_any(r, clients)]
    details += [f"route: {r.describe()}" + ("" if r in unexpected else " (client network)") for r in view.egress_routes]
    details += [f"address: {a.address} dev {a.device}" for a in view.outside_addresses]
    if view.loopback_only:
        return Finding(CheckStatus.PASS, "no egress route: loopback only", tuple(details))
    if not unexpected:
        return Finding(CheckStatus.PASS, "routes only to the policy's client networks", tuple(details))
    return Finding(
        CheckStatus.WARN,
        f"{len(unexpected)} egress route(s) beyond loopback and client networks: the guard and the outer wall must hold",
        tuple(details),
    )


def check_systemd_unit(appliance: Appliance) -> Finding:
    if appliance.release_dir is None:
        return Finding(CheckStatus.UNKNOWN, "no active release to compare with")
    rendered = appliance.release_dir / "service" / UNIT_NAME
    if not rendered.is_file():
        return Finding(CheckStatus.WARN, f"the release has no rendered unit ({rendered})")
    text = rendered.read_text(encoding="utf-8")
    values = _unit_values(text)
    missing = [
        name if name not in values else f"{name}={values[name]}"
        for name, holds in REQUIRED_UNIT_DIRECTIVES.items()
        if name not in values or not holds(values[name])
    ]
    details = [f"rendered: {rendered}"]
    details += _exposure(rendered)
    installed = appliance.systemd_dir / UNIT_NAME
    if missing:
        return Finding(CheckStatus.FAIL, f"the rendered unit lacks or weakens {', '.join(missing)}", tuple(details))
    if not installed.exists():
        return Finding(CheckStatus.WARN, f"not installed in {appliance.systemd_dir} (see docs/lockdown.md)", tuple(details))
    if installed.read_bytes() != text.encode("utf-8"):
        return Finding(CheckStatus.FAIL, f"{installed} differs from the release's unit", tuple(details))
    enabled = (appliance.systemd_dir / "multi-user.target.wants" / UNIT_NAME).exists()
    details.append("enabled at boot" if enabled else "installed but not enabled at boot")
    return Finding(CheckStatus.PASS, f"{installed} is the release's unit", tuple(details))


def check_nftables(appliance: Appliance) -> Finding:
    if appliance.release_dir is None:
        return Finding(CheckStatus.UNKNOWN, "no active release to compare with")
    rule_files = sorted((appliance.release_dir / "service").glob("*.nft"))
    tables = [match.groups() for path in rule_files for match in _NFT_TABLE.finditer(path.read_text(encoding="utf-8"))]
    if not tables:
        return Finding(CheckStatus.WARN, "the release has no rendered nftables rules (service/*.nft)")
    nft = shutil.which("nft")
    if nft is None:
        return Finding(CheckStatus.UNKNOWN, "nft is not installed here, so the loaded ruleset cannot be read")
    loaded: list[str] = []
    for family, name in tables:
        result = _run([nft, "list", "table", family, name])
        if result is None or (result.returncode != 0 and "Operation not permitted" in result.stderr):
            why = "timed out" if result is None else result.stderr.strip()
            return Finding(CheckStatus.UNKNOWN, f"nft list is not permitted here: {why}")
        if result.returncode != 0:
            return Finding(CheckStatus.WARN, f"table {family} {name} is not loaded (see docs/lockdown.md)")
        loaded.append(f"table {family} {name} loaded")
    return Finding(CheckStatus.PASS, "the release's egress rules are loaded", tuple(loaded))


def check_lockdown_walls(appliance: Appliance) -> Finding:
    """What the in-process guard cannot see, the wall that closes each, and whether it holds for the server."""
    status = appliance.server_status
    pid, whose = (status.pid, f"server pid {status.pid}") if status else (os.getpid(), "this process (no server running)")
    walls = read_walls(pid)
    details = (f"examined: {whose}", *(wall.line() for wall in walls))
    missing = [wall.wall for wall in walls if wall.in_force is False]
    if missing:
        return Finding(CheckStatus.WARN, f"the guard's blind spots are open where these walls are missing: {'; '.join(missing)}", details)
    if any(wall.in_force is None for wall in walls):
        return Finding(CheckStatus.UNKNOWN, "some walls could not be read here (see the lines)", details)
    return Finding(CheckStatus.PASS, "every wall behind the guard is in force", details)


def check_offline_environment(appliance: Appliance) -> Finding:
    gaps = offline_environment_gaps()
    if gaps:
        return Finding(CheckStatus.FAIL, "offline variables not in force", tuple(f"{k}={v!r}" for k, v in gaps.items()))
    return Finding(CheckStatus.PASS, "offline and no-telemetry variables in force")


def check_gpu(appliance: Appliance) -> Finding:
    """The decision `serve` makes before loading the engine: the release's engine build against the driver's answer."""
    try:
        venv = appliance.release_dir / "venv" if appliance.release_dir is not None else None
        build = EngineBuild.in_venv(venv) if venv is not None and venv.is_dir() else EngineBuild.installed()
    except AcceleratorError as exc:
        return Finding(CheckStatus.FAIL, str(exc))
    return gpu_finding(build, probe_driver(), appliance.policy.service.gpu_devices)


def gpu_finding(build: EngineBuild, driver: Driver | NoDriver, allowed: tuple[str, ...]) -> Finding:
    """`check_gpu`'s verdict from its facts (pure, so the tests can feed a host's answers)."""
    decision = decide(build, driver)
    gpus = driver.gpus if isinstance(driver, Driver) else ()
    details = tuple(_gpu_line(gpu) for gpu in gpus) + decision.notes
    if decision.problem is not None:
        return Finding(CheckStatus.FAIL, f"{build.describe()}: `sealbox serve` refuses: {decision.problem}", details)
    if decision.device == "cuda":
        denied = [node for node in cuda_device_nodes(len(gpus)) if node not in allowed]
        if denied:
            return Finding(CheckStatus.WARN, f"{build.describe()}: the policy's [service] gpu_devices leave out "
                           f"{', '.join(denied)}: under the systemd unit those GPUs are not used", details)  # fmt: skip
        return Finding(CheckStatus.PASS, f"{build.describe()}: serving on {len(decision.gpus)} GPU(s)", details)
    reason = driver.reason if isinstance(driver, NoDriver) else f"{len(gpus)} GPU(s) unused"
    return Finding(CheckStatus.WARN, f"{build.describe()}: serving on CPU ({reason})", details)


def check_memory_plan(appliance: Appliance) -> Finding:
    if appliance.release_dir is None:
        return Finding(CheckStatus.UNKNOWN, "no active release to plan for")
    models = [m for m in appliance.release_record.get("models") or [] if isinstance(m, dict) and isinstance(m.get("path"), str)]
    if not models:
        return Finding(CheckStatus.UNKNOWN, "the release lists no model to plan for")
    limits = appliance.policy.limits
    gpus = _usable_gpu_bytes(appliance)
    host, gpu = host_memory_bytes(), (sum(gpus) if gpus else None)
    lines: list[str] = []
    worst = CheckStatus.PASS
    for model in models:
        name = model.get("name", model["path"])
        try:
            memory = plan_for_policy(appliance.release_dir / model["path"], limits, memory_bytes=host,
                                     gpu_memory_bytes=gpu, detect_gpu=False)  # fmt: skip
            shape = memory.shape
            memory.engine_sizing()
        except ImportError as exc:
            return Finding(CheckStatus.UNKNOWN, f"memory planner incomplete here: {exc}")
        except MemoryPlanError as exc:
            lines.append(f"{name}: {exc}")
            worst = CheckStatus.FAIL
            continue
        where = f"{memory.gpu_layers} of {shape.layers + 1} layers (blocks + output) on the GPU" if gpu is not None else "no GPU: all layers on the CPU"
        lines.append(
            f"{name}: {where}; {min(memory.sequences_that_fit, memory.users)} of {memory.users} sequences of {memory.context} tokens "
            f"fit at once in {format_size(memory.kv_budget_bytes)} of KV budget"
        )
        if gpus:
            split = split_for_plan(memory, gpus)
            lines.extend(f"{name}: {line}" for line in split.lines() + ([split.note] if split.note else []))
        if not memory.fits and worst is CheckStatus.PASS:
            worst = CheckStatus.WARN  # admission makes the rest wait; never an OOM
    summary = {
        CheckStatus.PASS: "every model fits with the policy's sequences and context",
        CheckStatus.WARN: "fewer sequences fit at full context than the policy allows: requests will queue",
        CheckStatus.FAIL: "a model cannot be served in this memory",
    }[worst]
    return Finding(worst, summary, tuple(lines))


def _usable_gpu_bytes(appliance: Appliance) -> list[int]:
    """Memory of each GPU the release's engine will use (empty: it serves on the CPU or is refused)."""
    try:
        venv = appliance.release_dir / "venv" if appliance.release_dir is not None else None
        build = EngineBuild.in_venv(venv) if venv is not None and venv.is_dir() else EngineBuild.installed()
    except AcceleratorError:
        return []
    decision = decide(build, probe_driver())
    return [gpu.available_bytes for gpu in decision.gpus] if decision.device == "cuda" else []


def check_listen(appliance: Appliance) -> Finding:
    """The policy's listen address against its transport: beyond loopback, clear text exposes keys and prompts."""
    server = appliance.policy.server
    address = f"{server.host}:{server.port}"
    loopback = is_loopback_host(server.host)
    if server.tls_cert:
        missing = [path for path in (server.tls_cert, server.tls_key) if not Path(path).is_file()]
        if missing:
            return Finding(CheckStatus.FAIL, f"TLS on {address}, but {', '.join(missing)} is not a file")
        return Finding(CheckStatus.PASS, f"TLS on {address}")
    if loopback:
        return Finding(CheckStatus.PASS, f"plain HTTP on loopback ({address}): nothing outside this host reaches it")
    if server.allow_plain_http:
        return Finding(CheckStatus.WARN, f"plain HTTP on {address}, beyond loopback (allow_plain_http = true): "
                       "API keys and prompts cross the network in clear text; set tls_cert and tls_key")  # fmt: skip
    return Finding(CheckStatus.FAIL, f"{address} is beyond loopback without TLS: `sealbox serve` refuses to start")


def check_evaluation(appliance: Appliance) -> Finding:
    """The release's evaluation gate result (stored at install), and the last on-demand `sealbox eval` of it."""
    from sealbox.runtime.evaluation import LAST_RUN_FILE, evaluation_text, read_result

    if appliance.release_dir is None:
        return Finding(CheckStatus.UNKNOWN, "no active release")
    at_install = read_result(appliance.release_dir)
    details = [f"at install: {evaluation_text(at_install)}"]
    last = read_result(appliance.root.run, LAST_RUN_FILE)
    if last is not None and last.get("release") == appliance.release_dir.name:
        details.append(f"last `sealbox eval` ({last.get('started_at', '?')}): {evaluation_text(last)}")
        if last.get("status") == "failed":  # the same release answered worse than it did: the host drifted
            return Finding(CheckStatus.FAIL, f"the last evaluation failed: {evaluation_text(last)}", tuple(details))
    status = (at_install or {}).get("status")
    if status == "passed":
        return Finding(CheckStatus.PASS, f"the release passed its evaluation suite: {evaluation_text(at_install)}",
                       tuple(details))  # fmt: skip
    if status == "failed":
        return Finding(CheckStatus.FAIL, f"the live release failed its evaluation suite: {evaluation_text(at_install)}",
                       tuple(details))  # fmt: skip
    reason = "its evaluation was skipped at install (--skip-eval)" if status == "skipped" else "it carries no evaluation suite"
    return Finding(CheckStatus.WARN, f"the release went live without a passing evaluation: {reason}", tuple(details))


def check_mesh_keys(appliance: Appliance) -> Finding:
    """This host's mesh certificate and key (runtime/mesh/checkup.py): kinds, modes, owner, CA, expiry, address."""
    return _mesh_finding(check_installed_keys(appliance.policy))


def check_mesh_peers(appliance: Appliance) -> Finding:
    """Gateway: every engine answers over mutual TLS. Engine: a connection without a client certificate is refused."""
    return _mesh_finding(check_peers(appliance.policy))


def _mesh_finding(check: MeshCheck) -> Finding:
    return Finding(CheckStatus(check.status), check.summary, check.details)


CHECKS: tuple[tuple[str, str, Check], ...] = (
    ("release", "Active release", check_release),
    ("manifest-signature", "Manifest signature", check_manifest_signature),
    ("models", "Model files", check_models),
    ("release-files", "Release files", check_release_files),
    ("evaluation", "Evaluation gate", check_evaluation),
    ("trust-store", "Trust store", check_trust_store),
    ("audit-chain", "Audit chain", check_audit_chain),
    ("egress-guard", "Egress guard (this process)", check_egress_guard),
    ("egress-guard-server", "Egress guard (server)", check_server_guard),
    ("network", "Network namespace", check_network),
    ("listen", "Listen address and TLS", check_listen),
    ("systemd-unit", "systemd sandbox", check_systemd_unit),
    ("nftables", "nftables egress rules", check_nftables),
    ("lockdown-walls", "Walls behind the guard", check_lockdown_walls),
    ("offline-environment", "Offline environment", check_offline_environment),
    ("gpu", "GPU", check_gpu),
    ("memory-plan", "Layers on GPU", check_memory_plan),
    ("mesh-keys", "Mesh certificate and key", check_mesh_keys),
    ("mesh-peers", "Mesh peers (mutual TLS)", check_mesh_peers),
)


def run_doctor(root: HostRoot, *, strict: bool = False, systemd_dir: Path = SYSTEMD_DIR) -> DoctorReport:
    """Run every check against `root` and report. Changes nothing on disk, and sends packets only to the peers the
    policy's `[mesh]` names (the mesh-peers check).

    Raises:
        DoctorFailedError: `strict` and at least one check failed (`serve --strict` refuses to start on it).
    """
    appliance = Appliance(root, systemd_dir=systemd_dir)
    results = []
    for name, title, check in CHECKS:
        try:
            finding = check(appliance)
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            finding = Finding(CheckStatus.FAIL, f"the check itself failed: {exc!r}")
        results.append(CheckResult(name, title, finding.status, finding.summary, finding.details))
    report = DoctorReport(str(root.path), datetime.now(timezone.utc).isoformat(timespec="seconds"), tuple(results))
    if strict and not report.ok:
        raise DoctorFailedError(report)
    return report


def _check_model(release_dir: Path, entry: object, signed: frozenset[str] | None) -> tuple[str, bool]:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("sha256"), str):
        return f"release.json entry {entry!r}: needs \"path\" and \"sha256\"", False
    name, expected = entry.get("name", entry["path"]), entry["sha256"].lower()
    path = release_dir / entry["path"]
    try:
        actual, _ = sha256_regular(path.resolve())
    except OSError as exc:
        return f"{name}: {path}: cannot read: {exc.strerror}", False
    if actual != expected:
        return f"{name}: {path}: sha256 {actual}, expected {expected} (modified since install)", False
    if signed is not None and expected not in signed:
        return f"{name}: sha256 {expected} is not in the signed manifest (release.json altered)", False
    origin = "".join(f" · {key} {entry[key]}" for key in ("license", "origin") if isinstance(entry.get(key), str))
    return f"{name}: {path} sha256 {expected[:16]}… ok{origin}", True


def _sha256_values(data: object) -> Iterator[str]:
    if isinstance(data, dict):
        for key, value in data.items():
            if key in ("sha256", "digest") and isinstance(value, str) and _SHA256.match(value.lower().removeprefix("sha256:")):
                yield value.lower().removeprefix("sha256:")
            else:
                yield from _sha256_values(value)
    elif isinstance(data, list):
        for item in data:
            yield from _sha256_values(item)


def _unit_values(text: str) -> dict[str, str]:
    """The last value of each directive (systemd's rule for these), comments and section headers skipped."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if "=" in stripped and not stripped.startswith(("#", ";", "[")):
            name, value = stripped.split("=", 1)
            values[name.strip()] = value.strip()
    return values


def _exposure(unit: Path) -> list[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return ["systemd-analyze not installed: exposure score not computed"]
    result = _run([analyze, "security", "--offline=yes", str(unit)])
    match = _EXPOSURE.search(result.stdout) if result is not None else None
    if match is None:
        return ["systemd-analyze gave no exposure score"]
    score = float(match.group(1))
    verdict = "within" if score <= EXPOSURE_LIMIT else "ABOVE"
    return [f"systemd-analyze exposure {score} {match.group(2)} ({verdict} the {EXPOSURE_LIMIT} limit)"]


def _run(command: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return None


def _inside_any(route: Route, networks: list[IPNetwork]) -> bool:
    destination = ipaddress.ip_network(route.destination, strict=False)
    return any(destination.version == net.version and destination.subnet_of(net) for net in networks)  # type: ignore[arg-type]


def _gpu_line(gpu: Gpu) -> str:
    free = f"{format_size(gpu.free_bytes)} free of " if gpu.free_bytes is not None else ""
    return f"GPU {gpu.index}: {gpu.name}, sm_{gpu.sm}, {free}{format_size(gpu.total_bytes)}"
