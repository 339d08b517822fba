"""The service files a release carries: a hardened systemd unit and an nftables egress fence, rendered from sealbox.policies/."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sealbox.bundler.service_files import ServiceContext, ServiceFileError, render_nft, render_unit, write_service_files
from sealbox.runtime.policy import Policy

ROOT = Path("/var/lib/sealbox")
RELEASE = ROOT / "releases" / "demo-3"


def context(policy_toml: str = "", *, root: Path = ROOT, executable: Path = RELEASE / "venv/bin/sealbox") -> ServiceContext:
    return ServiceContext.build(
        label="demo-3",
        root=root,
        release_dir=RELEASE,
        executable=executable,
        policy=Policy.from_toml(policy_toml),
    )


def directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def exposure(unit: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True, check=False
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
@pytest.mark.parametrize(
    "policy_toml",
    ["", '[service]\ngpu_devices = []\nclient_networks = ["10.20.0.0/16", "fd00:1::/64"]\n'],
    ids=["gpu-defaults", "cpu-with-client-networks"],
)
def test_the_unit_scores_at_most_2_0_in_systemd_analyze_security(policy_toml: str, tmp_path: Path) -> None:
    files = write_service_files(tmp_path, context(policy_toml))
    score = exposure(files.unit)
    assert score <= 2.0, f"exposure {score}"


def test_the_unit_carries_the_hardening_the_issue_names() -> None:
    unit = directives(render_unit(context('[service]\nclient_networks = ["10.20.0.0/16"]\n')))
    assert unit["IPAddressDeny"] == ["any"]
    assert unit["IPAddressAllow"] == ["localhost 10.20.0.0/16"]
    assert unit["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "CapabilityBoundingSet": "",
        "SystemCallArchitectures": "native",
        "DevicePolicy": "closed",
        "User": "sealbox",
    }.items():
        assert unit[key] == [value], key
    assert "@system-service" in unit["SystemCallFilter"]
    assert unit["DeviceAllow"] == ["/dev/nvidia0 rw", "/dev/nvidiactl rw", "/dev/nvidia-uvm rw"]
    assert unit["ExecStart"] == [f"{RELEASE}/venv/bin/sealbox serve --root {ROOT}"]
    assert unit["ReadWritePaths"] == [f"-{ROOT}/audit -{ROOT}/run"]


def test_without_gpu_devices_the_unit_gets_no_devices_at_all() -> None:
    unit = directives(render_unit(context("[service]\ngpu_devices = []\n")))
    assert unit["PrivateDevices"] == ["yes"] and unit["MemoryDenyWriteExecute"] == ["yes"]
    assert "DeviceAllow" not in unit


def test_the_nft_rules_drop_the_service_users_traffic_except_loopback() -> None:
    rules = render_nft(context('[service]\nuser = "llm"\n'), nft_path="/x.nft")
    body = [line.strip() for line in rules.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    chain = body[body.index("chain output {") + 1 : body.index("}")]
    assert chain == [
        "type filter hook output priority filter; policy accept;",
        'meta skuid != "llm" accept',
        'oifname "lo" accept',
        'counter drop comment "sealbox: egress denied"',
    ]


def test_client_networks_get_replies_and_the_egress_allowlist_its_destinations() -> None:
    policy = (
        '[service]\nclient_networks = ["10.20.0.0/16"]\n'
        '[egress]\nallow = ["127.0.0.0/8", "::1/128", "10.9.9.9/32", "fd00::/8"]\nallow_ports = [443]\n'
    )
    rules = render_nft(context(policy), nft_path="/x.nft")
    assert "ct state established,related ct direction reply accept" in rules
    assert "ip daddr 10.9.9.9/32 meta l4proto { tcp, udp } th dport { 443 } accept" in rules
    assert "ip6 daddr fd00::/8 meta l4proto { tcp, udp } th dport { 443 } accept" in rules
    assert "127.0.0.0/8" not in rules, "loopback leaves through lo, which is accepted already"
    assert directives(render_unit(context(policy)))["IPAddressAllow"] == ["localhost 10.20.0.0/16 10.9.9.9/32 fd00::/8"]


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft is not installed here")
def test_the_nft_rules_parse(tmp_path: Path) -> None:
    files = write_service_files(tmp_path, context('[service]\nclient_networks = ["10.20.0.0/16"]\n'))
    result = subprocess.run(["nft", "-c", "-f", str(files.nft)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "root",
    [Path("/srv/seal box"), Path("/srv/sealbox\nExecStartPre=/bin/sh"), Path("/srv/%h"), Path("relative/root")],
    ids=["space", "newline", "specifier", "relative"],
)
def test_a_root_that_would_inject_into_the_unit_is_refused(root: Path) -> None:
    with pytest.raises(ServiceFileError, match="cannot go into a systemd unit"):
        context(root=root)


def test_a_user_name_that_is_not_a_plain_account_is_refused() -> None:
    with pytest.raises(ServiceFileError, match="not a plain system user name"):
        context('[service]\nuser = "root\\nExecStartPre=/bin/sh"\n')
