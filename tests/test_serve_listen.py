"""Plain HTTP beyond loopback: refused at start unless the policy has TLS, or says in so many words that clear text
is accepted; then the start record names it and the doctor flags it.

Every server here that listens beyond loopback does so inside a network namespace the test creates (`unshare -rn`,
only `lo` in it), so no port opens on the host's own interfaces even if a check were missing. Refusals happen before
any socket is opened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from audit_records import audit_records
from conftest import network_namespace_available
from server_support import SEALBOX, ServerProcess, create_api_key, sealbox

IN_NAMESPACE = ["unshare", "-rn", *SEALBOX]
POLICY = "[limits]\ncontext = 512\n"


@pytest.fixture
def namespace() -> None:
    if not network_namespace_available():
        if os.environ.get("CI"):
            pytest.fail("CI must be able to create a network namespace (unshare -rn): the listen tests need one")
        pytest.skip("no unprivileged network namespace here (unshare -rn)")


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
@pytest.mark.parametrize("strict", [False, True], ids=["plain", "strict"])
def test_plain_http_beyond_loopback_is_refused_at_start_without_tls(
    namespace: None, tmp_path: Path, tiny_model: Path, host: str, strict: bool
) -> None:
    create_api_key(tmp_path, "alice")  # everything else it needs is there: only the listen check can refuse
    server = ServerProcess(tmp_path, models=[tiny_model], policy_text=POLICY, host=host, executable=IN_NAMESPACE,
                           extra_args=["--strict"] if strict else [])  # fmt: skip
    server.policy = tmp_path / "policy.toml"
    server.policy.write_text(POLICY)
    done = server.run_to_exit(timeout_s=60)  # a server that started instead runs into this timeout
    assert done.returncode == 3, done.stderr  # EXIT_REFUSED
    assert "sealbox serving" not in done.stderr
    message = " ".join(done.stderr.split())
    assert f"{host} is beyond loopback and the policy has no TLS certificate" in message
    assert "allow_plain_http" in message


def test_allow_plain_http_serves_beyond_loopback_with_a_warning_and_the_start_record_names_it(
    namespace: None, tmp_path: Path, tiny_model: Path
) -> None:
    create_api_key(tmp_path, "alice")
    policy = "[server]\nallow_plain_http = true\n" + POLICY
    with ServerProcess(tmp_path, models=[tiny_model], policy_text=policy, host="0.0.0.0",
                       executable=IN_NAMESPACE) as server:  # fmt: skip
        assert f"http://0.0.0.0:{server.port}/v1" in server.stderr
        assert "WARNING: plain HTTP on 0.0.0.0, beyond loopback" in server.stderr
    (start,) = [record for record in audit_records(tmp_path / "audit") if record.event == "server.start"]
    assert start.fields["plain_http_beyond_loopback"] is True
    assert start.fields["transport"] == "http"
    assert start.fields["listen"] == f"0.0.0.0:{server.port}"


def test_a_loopback_start_record_says_plain_http_stays_on_the_host(tmp_path: Path, tiny_model: Path) -> None:
    create_api_key(tmp_path, "alice")
    with ServerProcess(tmp_path, models=[tiny_model], policy_text=POLICY) as server:
        assert "WARNING" not in server.stderr
    (start,) = [record for record in audit_records(tmp_path / "audit") if record.event == "server.start"]
    assert (start.fields["plain_http_beyond_loopback"], start.fields["transport"]) == (False, "http")


def release_with_policy(root: Path, policy: str) -> Path:
    """A minimal active release whose policy in force is `policy` (the doctor reads it from there)."""
    release = root / "releases" / "demo-1"
    release.mkdir(parents=True)
    (release / "policy.toml").write_text(policy)
    record = {"name": "demo", "version": 1, "models": [], "policy": "policy.toml"}
    (release / "release.json").write_text(json.dumps(record))
    (root / "current").symlink_to(Path("releases") / "demo-1")
    return root


def listen_check(root: Path) -> dict[str, str]:
    result = sealbox("doctor", "--json", root=root, check=False)
    report = json.loads(result.stdout)
    return next(check for check in report["checks"] if check["name"] == "listen")


@pytest.mark.parametrize(
    ("server_section", "status", "words"),
    [
        ('host = "0.0.0.0"\nallow_plain_http = true', "warn", "clear text"),
        ('host = "0.0.0.0"', "fail", "refuses to start"),
        ('host = "127.0.0.1"', "pass", "loopback"),
    ],
    ids=["plain http allowed beyond loopback", "plain http beyond loopback", "loopback"],
)
def test_doctor_flags_plain_http_beyond_loopback(tmp_path: Path, server_section: str, status: str, words: str):
    root = release_with_policy(tmp_path, f"[server]\n{server_section}\n")
    check = listen_check(root)
    assert check["status"] == status, check
    assert words in check["summary"]
