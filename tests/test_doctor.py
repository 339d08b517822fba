"""`sealbox doctor` against an installed release: intact, tampered, and in network namespaces.

The installed release is made by a real `bundle install` of a signed bundle (release dir with release.json, the signed
manifest, a model linked from the content-addressed store, rendered service files, `current` symlink), with a real
GGUF written by the `gguf` package and the publisher's Ed25519 key in the trust store.
Whole reports run the real command in a subprocess (audit hooks are permanent; the pytest process never installs
the guard); single checks run in-process through `run_doctor`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import require_lockdown

from sealbox.bundler.install import InstallRequest, install_bundle
from install_support import Publisher, make_keys, model_item, trust
from sealbox.runtime.doctor import CheckStatus, DoctorFailedError, Finding, run_doctor, set_manifest_verifier
from sealbox.runtime.egress.routes import read_network
from sealbox.runtime.hostroot import HostRoot

UNIT = """\
[Unit]
Description=sealbox OpenAI-compatible server (test fixture standing in for the rendered unit)

[Service]
User=sealbox
ExecStart=/var/lib/sealbox/current/venv/bin/sealbox serve --strict
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
DevicePolicy=closed
CapabilityBoundingSet=
IPAddressDeny=any
IPAddressAllow=localhost
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
BindReadOnlyPaths=/var/lib/sealbox/current/service/resolv.conf:/etc/resolv.conf
SystemCallFilter=@system-service
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""
NFT = 'table inet sealbox {\n  chain output {\n    type filter hook output priority 0; policy accept;\n    meta skuid "sealbox" oif != "lo" drop\n  }\n}\n'


@dataclass(frozen=True)
class Installed:
    root: Path
    release: Path
    model: Path  # the release's link
    blob: Path  # the store file it points at
    digest: str

    @property
    def host(self) -> HostRoot:
        return HostRoot(self.root)


def write_tiny_gguf(path: Path) -> None:
    """A 2-block llama with a 16-token vocabulary and seeded weights: the shape the memory planner reads."""
    rng = np.random.default_rng(7)
    embd, ffn, vocab = 8, 16, 16
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(embd)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([1] * vocab)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    tensor("token_embd.weight", vocab, embd)
    for block in range(2):
        for part, shape in (("attn_q", (embd, embd)), ("attn_k", (embd // 2, embd)), ("attn_v", (embd // 2, embd)),
                            ("attn_output", (embd, embd)), ("ffn_gate", (ffn, embd)), ("ffn_up", (ffn, embd)),
                            ("ffn_down", (embd, ffn)), ("attn_norm", (embd,)), ("ffn_norm", (embd,))):
            tensor(f"blk.{block}.{part}.weight", *shape)
    tensor("output_norm.weight", embd)
    tensor("output.weight", vocab, embd)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bundle with the tiny model, signed by `publisher`: (bundle directory, the publisher's public key)."""
    folder = tmp_path_factory.mktemp("publisher")
    keys = make_keys(folder / "keys", "publisher")
    model = folder / "tiny.gguf"
    write_tiny_gguf(model)
    bundle = Publisher(keys).publish(folder / "bundle", [model_item(model)], name="tiny", version=1, signers=("publisher",))
    return bundle, keys / "publisher.pub"


@pytest.fixture
def installed(tmp_path: Path, signed_bundle: tuple[Path, Path]) -> Installed:
    """The release as `bundle install` makes it: verified, signed manifest kept, model linked from the store."""
    bundle, public_key = signed_bundle
    host = trust(tmp_path / "root", public_key)
    release = install_bundle(InstallRequest(bundle=bundle, root=host)).release.directory
    model = release / "models" / "tiny.gguf"
    blob = model.resolve()
    return Installed(host.path, release, model, blob, hashlib.sha256(blob.read_bytes()).hexdigest())


def flip_one_byte(path: Path, offset: int = -1) -> None:
    os.chmod(path, 0o644)  # `bundle install` leaves store blobs read-only
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def doctor_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("sealbox")), "doctor", *args]  # the installed console script


def run_cli(args: list[str], *, netns_setup: str | None = None) -> subprocess.CompletedProcess[str]:
    command = doctor_command(*args)
    if netns_setup is not None:
        require_lockdown("unshare", "ip", netns=True)
        command = ["unshare", "-rn", "sh", "-ec", f'ip link set lo up && {netns_setup} && exec "$@"', "sh", *command]
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, check=False)


def report_of(done: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert done.stdout, done.stderr
    report = json.loads(done.stdout)
    report["by_name"] = {check["name"]: check for check in report["checks"]}
    return report


# --- the whole report, through the command -------------------------------------------------------------------


def test_doctor_passes_an_intact_release_and_strict_exits_zero(installed: Installed):
    done = run_cli(["--root", str(installed.root), "--strict", "--json"])
    assert done.returncode == 0, done.stdout + done.stderr
    report = report_of(done)
    assert report["ok"] is True and report["failures"] == []
    checks = report["by_name"]
    for name in ("release", "models", "trust-store", "egress-guard", "offline-environment"):
        assert checks[name]["status"] == "pass", checks[name]
    assert checks["release"]["summary"] == "tiny version 1"
    assert checks["egress-guard"]["summary"].startswith("active")
    assert checks["models"]["summary"] == "1 model(s) match the signed manifest"


def test_doctor_reports_a_tampered_model_file_and_strict_exits_one(installed: Installed):
    flip_one_byte(installed.blob, offset=100)
    done = run_cli(["--root", str(installed.root), "--strict", "--json"])
    assert done.returncode == 1
    report = report_of(done)
    assert report["ok"] is False and report["failures"] == ["models"]
    models = report["by_name"]["models"]
    assert models["status"] == "fail"
    (line,) = models["details"]
    assert str(installed.model) in line and f"expected {installed.digest}" in line and "modified since install" in line


def test_without_strict_the_doctor_reports_failures_but_exits_zero(installed: Installed):
    flip_one_byte(installed.blob)
    done = run_cli(["--root", str(installed.root)])
    assert done.returncode == 0, done.stderr
    (row,) = [line for line in done.stdout.splitlines() if "Model files" in line]
    assert "FAIL" in row and "1 problem(s) in 1 model(s)" in row
    assert done.stdout.rstrip().splitlines()[-1].startswith("1 failure(s)")


def test_doctor_in_a_loopback_only_namespace_reports_no_egress_route(installed: Installed):
    report = report_of(run_cli(["--root", str(installed.root), "--json"], netns_setup="true"))
    network = report["by_name"]["network"]
    assert network["status"] == "pass"
    assert network["summary"] == "no egress route: loopback only"
    assert network["details"] == ["namespace of this process; interfaces: lo"]


def test_doctor_in_a_namespace_with_a_default_route_reports_it(installed: Installed):
    setup = "ip link add v0 type veth peer name v1 && ip link set v0 up && ip route add default dev v0"
    network = report_of(run_cli(["--root", str(installed.root), "--json"], netns_setup=setup))["by_name"]["network"]
    assert network["status"] == "warn"
    assert "route: default (0.0.0.0/0) dev v0" in network["details"]


def test_doctor_on_the_test_host_reports_the_routes_it_finds(installed: Installed):
    network = report_of(run_cli(["--root", str(installed.root), "--json"]))["by_name"]["network"]
    host = read_network()
    listed = [line.removeprefix("route: ") for line in network["details"] if line.startswith("route: ")]
    assert listed == [route.describe() for route in host.egress_routes]
    assert network["status"] == ("pass" if host.loopback_only else "warn")


SERVER = """\
import sys
from sealbox.runtime.egress.guard import guard_status_path, install_egress_guard
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.policy import Policy
guard = install_egress_guard(Policy.default().egress)
guard.status().write(guard_status_path(HostRoot(__import__("pathlib").Path(sys.argv[1]))))
print("ready", flush=True)
sys.stdin.read()
"""


def test_doctor_reads_the_running_servers_guard_and_namespace_not_its_own(installed: Installed):
    require_lockdown("unshare", "ip", netns=True)
    server = subprocess.Popen(
        ["unshare", "-rn", "sh", "-ec", 'ip link set lo up && exec "$@"', "sh", sys.executable, "-c", SERVER, str(installed.root)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline() == "ready\n"
        checks = report_of(run_cli(["--root", str(installed.root), "--json"]))["by_name"]
    finally:
        server.communicate(input="", timeout=30)
    assert checks["egress-guard-server"]["status"] == "pass"
    assert checks["egress-guard-server"]["summary"] == f"server pid {server.pid} reports its guard active"
    assert checks["network"]["summary"] == "no egress route: loopback only"
    assert checks["network"]["details"][0] == f"namespace of server pid {server.pid}; interfaces: lo"


# --- serve --strict's gate -----------------------------------------------------------------------------------

SERVE_STARTUP = """\
import sys
from pathlib import Path
from sealbox.runtime.doctor import Appliance, DoctorFailedError, run_doctor
from sealbox.runtime.egress.guard import install_egress_guard
from sealbox.runtime.egress.offline_env import apply_offline_environment
from sealbox.runtime.hostroot import HostRoot
apply_offline_environment()
root = HostRoot(Path(sys.argv[1]))
install_egress_guard(Appliance(root).policy.egress)
try:
    run_doctor(root, strict=True, systemd_dir=Path(sys.argv[2]))
except DoctorFailedError as exc:
    sys.exit(f"refusing to serve: {exc}")
print("serving")
"""


def test_the_strict_gate_lets_an_intact_release_start_and_refuses_a_tampered_one(installed: Installed, tmp_path: Path):
    command = [sys.executable, "-c", SERVE_STARTUP, str(installed.root), str(tmp_path / "systemd")]
    intact = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert (intact.returncode, intact.stdout) == (0, "serving\n"), intact.stderr
    flip_one_byte(installed.blob)
    tampered = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert tampered.returncode == 1 and tampered.stdout == ""
    assert "refusing to serve: sealbox doctor found 1 failure(s): Model files:" in tampered.stderr


# --- single checks, in-process -------------------------------------------------------------------------------


def run_checks(installed: Installed, tmp_path: Path) -> dict[str, object]:
    report = run_doctor(installed.host, systemd_dir=tmp_path / "systemd")
    return {check.name: check for check in report.checks}


def test_run_doctor_strict_raises_naming_each_failure(installed: Installed, tmp_path: Path):
    flip_one_byte(installed.blob)
    with pytest.raises(DoctorFailedError) as failed:
        run_doctor(installed.host, strict=True, systemd_dir=tmp_path / "systemd")
    # pytest itself runs without the guard and the offline variables: those two fail here too.
    assert {check.name for check in failed.value.report.failures} == {"models", "egress-guard", "offline-environment"}
    assert "Model files: 1 problem(s) in 1 model(s)" in str(failed.value)


def test_a_missing_current_link_fails_the_release_checks(installed: Installed, tmp_path: Path):
    (installed.root / "current").unlink()
    checks = run_checks(installed, tmp_path)
    assert checks["release"].status is CheckStatus.FAIL
    assert checks["release"].summary == f"no active release: {installed.root / 'current'} does not exist"
    assert checks["models"].status is CheckStatus.FAIL


def test_a_current_link_outside_releases_fails(installed: Installed, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(installed.release, elsewhere, symlinks=True)
    (installed.root / "current").unlink()
    (installed.root / "current").symlink_to(elsewhere)
    assert "outside" in run_checks(installed, tmp_path)["release"].summary


def test_a_model_swapped_together_with_release_json_is_caught_by_the_signed_manifest(installed: Installed, tmp_path: Path):
    flip_one_byte(installed.blob)
    forged = hashlib.sha256(installed.blob.read_bytes()).hexdigest()
    record = json.loads((installed.release / "release.json").read_text())
    record["models"][0]["sha256"] = forged
    (installed.release / "release.json").write_text(json.dumps(record))
    models = run_checks(installed, tmp_path)["models"]
    assert models.status is CheckStatus.FAIL
    assert models.details == (f"tiny: sha256 {forged} is not in the signed manifest (release.json altered)",)


def test_a_missing_model_file_is_named(installed: Installed, tmp_path: Path):
    installed.blob.unlink()
    models = run_checks(installed, tmp_path)["models"]
    assert models.status is CheckStatus.FAIL
    assert models.details[0].startswith(f"tiny: {installed.model}: cannot read")


def test_an_empty_or_missing_trust_store_fails(installed: Installed, tmp_path: Path):
    for entry in (installed.root / "trust").iterdir():
        entry.unlink()
    assert "is empty" in run_checks(installed, tmp_path)["trust-store"].summary
    (installed.root / "trust").rmdir()
    trust = run_checks(installed, tmp_path)["trust-store"]
    assert trust.status is CheckStatus.FAIL and "does not exist" in trust.summary


def test_the_systemd_unit_passes_only_when_the_installed_copy_is_the_releases(installed: Installed, tmp_path: Path):
    systemd = tmp_path / "systemd"
    assert run_checks(installed, tmp_path)["systemd-unit"].status is CheckStatus.WARN  # not installed
    systemd.mkdir()
    shutil.copy(installed.release / "service" / "sealbox.service", systemd / "sealbox.service")
    unit = run_checks(installed, tmp_path)["systemd-unit"]
    assert unit.status is CheckStatus.PASS
    assert "installed but not enabled at boot" in unit.details
    (systemd / "sealbox.service").write_text(UNIT.replace("IPAddressDeny=any\n", ""))
    unit = run_checks(installed, tmp_path)["systemd-unit"]
    assert unit.status is CheckStatus.FAIL and "differs from the release's unit" in unit.summary


def test_a_rendered_unit_without_the_sandbox_directives_fails_naming_them(installed: Installed, tmp_path: Path):
    weakened = (
        UNIT.replace("IPAddressDeny=any\n", "")
        .replace("NoNewPrivileges=yes\n", "# NoNewPrivileges=yes\n")
        .replace("ProtectSystem=strict\n", "ProtectSystem=strict\nProtectSystem=full\n")  # the last one counts
    )
    (installed.release / "service" / "sealbox.service").write_text(weakened)
    unit = run_checks(installed, tmp_path)["systemd-unit"]
    assert unit.status is CheckStatus.FAIL
    assert unit.summary == "the rendered unit lacks or weakens IPAddressDeny, NoNewPrivileges, ProtectSystem=full"


def test_the_unit_gets_an_exposure_score_where_systemd_analyze_exists(installed: Installed, tmp_path: Path):
    require_lockdown("systemd-analyze")
    details = run_checks(installed, tmp_path)["systemd-unit"].details
    assert any(line.startswith("systemd-analyze exposure ") for line in details), details


def test_nftables_without_nft_is_unknown_with_the_reason(installed: Installed, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools-here"))  # a host without nft, even where CI installed it
    nft = run_checks(installed, tmp_path)["nftables"]
    assert nft.status is CheckStatus.UNKNOWN and "nft is not installed" in nft.summary


def test_nftables_rules_missing_from_the_release_warn(installed: Installed, tmp_path: Path):
    for rules in (installed.release / "service").glob("*.nft"):
        rules.unlink()
    nft = run_checks(installed, tmp_path)["nftables"]
    assert nft.status is CheckStatus.WARN and "no rendered nftables rules" in nft.summary


def test_the_manifest_signature_is_unknown_without_a_verifier_and_the_verifiers_finding_otherwise(installed: Installed, tmp_path: Path):
    assert run_checks(installed, tmp_path)["manifest-signature"].status is CheckStatus.UNKNOWN
    seen: list[tuple[Path, Path]] = []

    def verifier(release: Path, trust: Path) -> Finding:
        seen.append((release, trust))
        return Finding(CheckStatus.FAIL, "signed by 0 of 1 trusted keys")

    set_manifest_verifier(verifier)
    try:
        signature = run_checks(installed, tmp_path)["manifest-signature"]
    finally:
        set_manifest_verifier(None)
    assert (signature.status, signature.summary) == (CheckStatus.FAIL, "signed by 0 of 1 trusted keys")
    assert seen == [(installed.release.resolve(), installed.root / "trust")]


def write_server_status(installed: Installed, pid: int, started: int) -> None:
    status = installed.root / "run" / "egress-guard.json"
    status.parent.mkdir(exist_ok=True)
    status.write_text(json.dumps({"pid": pid, "started": started, "installed_at": "2026-01-01T00:00:00+00:00",
                                  "allowlist": "127.0.0.0/8", "networks": ["127.0.0.0/8"], "ports": [], "self_test": True}))


def test_a_server_status_from_a_finished_process_is_stale(installed: Installed, tmp_path: Path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    write_server_status(installed, int(finished.stdout), started=1)
    server = run_checks(installed, tmp_path)["egress-guard-server"]
    assert server.status is CheckStatus.UNKNOWN and f"pid {int(finished.stdout)}, which is not running (stale)" in server.summary


def test_a_server_status_whose_pid_was_reused_by_another_process_is_stale(installed: Installed, tmp_path: Path):
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        write_server_status(installed, live.pid, started=1)  # the pid is alive, but it is not the writer
        server = run_checks(installed, tmp_path)["egress-guard-server"]
    finally:
        live.communicate(b"", timeout=30)
    assert server.status is CheckStatus.UNKNOWN and "(stale)" in server.summary


def test_a_broken_release_policy_fails_the_release_check(installed: Installed, tmp_path: Path):
    (installed.release / "policy.toml").write_text(textwrap.dedent("[egress]\nallow = ['not-a-network']\n"))
    release = run_checks(installed, tmp_path)["release"]
    assert release.status is CheckStatus.FAIL
    assert release.summary == "tiny version 1: its policy does not load"
    assert "egress.allow" in release.details[0]


def test_the_memory_plan_says_how_many_layers_and_sequences_fit(installed: Installed, tmp_path: Path):
    pytest.importorskip("sealbox.runtime.models.gguf_facts", reason="the GGUF facts reader (runtime/models/gguf_facts.py) has not landed")
    from sealbox.runtime.memory_plan import gpu_free_bytes

    memory = run_checks(installed, tmp_path)["memory-plan"]
    assert memory.status is CheckStatus.PASS, memory
    where = "no GPU: all layers on the CPU" if gpu_free_bytes() is None else "layers (blocks + output) on the GPU"
    (line,) = memory.details
    assert line.startswith("tiny: ") and where in line
    # The default policy's max_sequences = 0: AUTO_SEQUENCES (64) at the model's 128-token context, which fit.
    assert "64 of 64 sequences of 128 tokens fit at once" in line


def write_audit_log(installed: Installed, count: int) -> tuple[Path, int]:
    """Append `count` records after those the install wrote; returns the directory and the total."""
    from sealbox.runtime.audit.log import AuditLog
    from sealbox.runtime.policy import AuditPolicy

    log = AuditLog.open(installed.root / "audit", AuditPolicy())
    try:
        for number in range(count):
            seq = log.append("bundle.install", name="tiny", probe=number + 1)
    finally:
        log.close()
    return installed.root / "audit", seq


def test_an_intact_audit_chain_passes(installed: Installed, tmp_path: Path):
    _, total = write_audit_log(installed, 3)
    audit = run_checks(installed, tmp_path)["audit-chain"]
    assert audit.status is CheckStatus.PASS, audit
    assert audit.summary.startswith(f"{total}/{total} records valid")


def test_an_edited_audit_record_fails_the_chain_naming_its_sequence_number(installed: Installed, tmp_path: Path):
    from sealbox.runtime.audit.segment import list_segments

    directory, total = write_audit_log(installed, 3)
    segment = list_segments(directory)[0].path
    segment.write_bytes(segment.read_bytes().replace(b'"probe":2', b'"probe":9'))
    audit = run_checks(installed, tmp_path)["audit-chain"]
    assert audit.status is CheckStatus.FAIL
    assert f"first broken seq {total - 1}" in audit.summary
