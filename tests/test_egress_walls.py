"""`sealbox doctor` says which walls behind the in-process guard are in force (issue 13), reading only.

Two hosts of the test's own making (network and mount namespaces): one with the walls the release renders in
place (its nftables fence loaded, its empty resolv.conf bound over /etc/resolv.conf, RES_OPTIONS set from the
start as the unit sets it), one without. The real `sealbox doctor --json` runs in each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_lockdown
from sealbox.bundler.service_files import ServiceContext, write_service_files
from sealbox.runtime.policy import Policy

REPO = Path(__file__).resolve().parents[1]
SEALBOX = f'{sys.executable} -c "from sealbox.cli import main; main()"'
UNIT_WALL = "runs in sealbox.service"
RESOLVER_WALLS = ("resolver makes zero attempts", "no resolver configured", "nftables drop the service user's port 53")
FENCE_WALL = "nftables fence for the service user"


def walls_in(tmp_path: Path, setup: str, env: dict[str, str]) -> dict[str, object]:
    require_lockdown("unshare", "ip", "nft", "mount", root=True)
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    script = f"ip link set lo up\n{setup}\n{SEALBOX} doctor --json --root {root}"
    done = subprocess.run(["unshare", "--net", "--mount", "sh", "-ec", script], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, **env})  # fmt: skip
    assert done.returncode == 0, done.stderr
    checks = {check["name"]: check for check in json.loads(done.stdout)["checks"]}
    return checks["lockdown-walls"]


def state_of(check: dict[str, object], wall: str) -> str:
    line = next(line for line in check["details"] if line.startswith(wall))  # type: ignore[union-attr]
    return line.split("[", 1)[1].split("]", 1)[0]


def test_the_doctor_names_every_wall_that_is_missing_on_a_bare_host(tmp_path: Path):
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    check = walls_in(tmp_path, f"mount --bind {tmp_path / 'resolv.conf'} /etc/resolv.conf", {"RES_OPTIONS": ""})
    assert check["status"] == "warn"
    for wall in (*RESOLVER_WALLS, UNIT_WALL, FENCE_WALL):
        assert state_of(check, wall) == "NOT in force", wall
        assert wall in str(check["summary"])
    assert "names 127.0.0.1" in " ".join(check["details"])


def test_the_doctor_sees_the_releases_resolver_walls_and_fence_in_force(tmp_path: Path):
    release = tmp_path / "release"
    context = ServiceContext.build(label="walls-1", root=tmp_path, release_dir=release,
                                   executable=release / "venv/bin/sealbox",
                                   policy=Policy.from_toml('[service]\nuser = "nobody"\n'))  # fmt: skip
    files = write_service_files(release, context)
    setup = f"nft -f {files.nft}\nmount --bind {files.unit.parent / 'resolv.conf'} /etc/resolv.conf"
    check = walls_in(tmp_path, setup, {"RES_OPTIONS": "attempts:0"})
    for wall in (*RESOLVER_WALLS, FENCE_WALL):
        assert state_of(check, wall) == "in force", wall
    assert state_of(check, UNIT_WALL) == "NOT in force"  # the test does not run under systemd
    assert check["status"] == "warn" and "runs in sealbox.service" in str(check["summary"])
    assert "no resolver configured" not in str(check["summary"])


@pytest.mark.parametrize("wall", [*RESOLVER_WALLS, UNIT_WALL, FENCE_WALL])
def test_lockdown_md_says_what_each_wall_closes(wall: str):
    text = (REPO / "docs" / "lockdown.md").read_text()
    assert wall.split(" (")[0].lower() in text.lower()


def test_a_rendered_unit_that_leaves_the_service_a_resolver_fails_the_doctors_unit_check():
    from sealbox.runtime.doctor import REQUIRED_UNIT_DIRECTIVES

    holds = REQUIRED_UNIT_DIRECTIVES["BindReadOnlyPaths"]
    assert holds("/r/service/resolv.conf:/etc/resolv.conf /r/service/hosts:/etc/hosts")
    assert not holds("/r/service/hosts:/etc/hosts")
