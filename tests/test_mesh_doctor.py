"""`sealbox doctor` checks the mesh on each host, against real processes on loopback: an engine host (`sealbox serve`
with the mesh's mutual TLS) at 127.0.0.2, the gateway's side at 127.0.0.1. The engine's doctor sees a connection
without a client certificate refused; the gateway's sees the engine's status answer over mutual TLS; broken, loose,
expiring and expired key files are named."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509

from gateway_support import EngineHostProcess, engine_key_file
from install_support import Item, Publisher, make_keys, model_item, trust
from mesh_support import Mesh, MeshHost, host_entry, service_user, write_package
from server_support import free_port
from sealbox.bundler.install import InstallRequest, ReleaseContentError, install_bundle
from sealbox.bundler.mesh_keys import install_mesh_keys
from sealbox.runtime.mesh.checkup import check_installed_keys, check_peers
from sealbox.runtime.policy import MESH_CERT_FILE, MESH_KEY_FILE, Policy

REPO = Path(__file__).resolve().parents[1]
ENGINE_PORT = free_port()
GATEWAY = MeshHost("gw", "gateway", "127.0.0.1", free_port())
ENGINE = MeshHost("gpu-1", "engine", "127.0.0.2", ENGINE_PORT)
LIMITS = "[limits]\ncontext = 256\nmax_sequences = 2\nqueue_size = 4\nkv_cells = 512\n"


def host_policy(mesh: Mesh, key_dir: Path, extra: str = "") -> str:
    """The mesh's policy as one host has it: the same text, its own key directory (two hosts share this machine)."""
    return mesh.policy_path.read_text().replace(str(mesh.key_dir), str(key_dir)) + extra


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Mesh:
    return Mesh(tmp_path_factory.mktemp("mesh"), [GATEWAY, ENGINE], extra=LIMITS).create()


@pytest.fixture(scope="module")
def engine(mesh: Mesh, tiny_model: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EngineHostProcess, Policy, Path]]:  # fmt: skip
    root = tmp_path_factory.mktemp("engine-root")
    text = host_policy(mesh, root / "mesh")
    policy = Policy.from_toml(text)
    install_mesh_keys(mesh.package("gpu-1"), policy, "gpu-1")
    process = EngineHostProcess(root=root, models=[tiny_model], policy_text=text, host=ENGINE.address, port=ENGINE.port,
                                name="gpu-1")  # fmt: skip
    key_file = engine_key_file(process)  # the API key the gateway presents, from the engine's own store
    process.start()
    try:
        yield process, policy, key_file
    finally:
        process.stop()


@pytest.fixture(scope="module")
def gateway_policy(mesh: Mesh, engine: tuple[EngineHostProcess, Policy, Path],
                   tmp_path_factory: pytest.TempPathFactory) -> Policy:  # fmt: skip
    folder = tmp_path_factory.mktemp("gateway-root")
    key_file = engine[2]
    entry = f'[[gateway.engines]]\nname = "gpu-1"\nurl = "{host_entry(ENGINE).url}"\napi_key_file = "{key_file}"\n'
    policy = Policy.from_toml(host_policy(mesh, folder / "mesh", entry))
    install_mesh_keys(mesh.package("gw"), policy, "gw")
    return policy


def test_on_an_engine_the_doctor_passes_its_keys_and_sees_a_client_without_certificate_refused(
    engine: tuple[EngineHostProcess, Policy, Path],
) -> None:
    _, policy, _ = engine
    keys = check_installed_keys(policy)
    assert keys.status == "pass", keys.summary
    assert "gpu-1's certificate and key are the mesh CA's for 127.0.0.2" in keys.summary
    peers = check_peers(policy)
    assert peers.status == "pass", peers.summary
    assert peers.summary == f"the engine at 127.0.0.2:{ENGINE_PORT} refuses a connection without a client certificate"


def test_on_the_gateway_the_doctor_sees_each_engine_answer_its_status_over_mutual_tls(gateway_policy: Policy) -> None:
    keys = check_installed_keys(gateway_policy)
    assert keys.status == "pass", keys.summary
    peers = check_peers(gateway_policy)
    assert peers.status == "pass", peers.summary
    assert peers.details == (f"gpu-1 https://127.0.0.2:{ENGINE_PORT}: status answered over mutual TLS",)


def test_the_gateways_doctor_names_an_engine_that_does_not_answer(gateway_policy: Policy) -> None:
    down = free_port()
    text = gateway_policy.model_dump(mode="json")
    text["mesh"]["hosts"][1]["port"] = down
    text["gateway"]["engines"][0]["url"] = f"https://127.0.0.2:{down}"
    peers = check_peers(Policy.model_validate(text))
    assert peers.status == "fail"
    assert peers.summary == "engine host(s) not answering over mutual TLS: gpu-1"


def test_an_engine_that_serves_without_asking_for_client_certificates_fails_the_doctor(
    mesh: Mesh, tiny_model: Path, tmp_path: Path
) -> None:
    port = free_port()
    moved = MeshHost("gpu-1", "engine", "127.0.0.2", port)
    text = host_policy(mesh, tmp_path / "mesh").replace(f"port = {ENGINE_PORT}", f"port = {port}")
    policy = Policy.from_toml(text)
    install_mesh_keys(mesh.package("gpu-1"), policy, "gpu-1")  # the certificate names the address, not the port
    # the same certificate and key, but no tls_client_ca: anyone on the link could talk to this engine
    open_policy = f'[server]\ntls_cert = "{policy.server.tls_cert}"\ntls_key = "{policy.server.tls_key}"\n' + LIMITS
    process = EngineHostProcess(root=tmp_path, models=[tiny_model], policy_text=open_policy, host=moved.address,
                                port=port)  # fmt: skip
    engine_key_file(process)
    process.start()
    try:
        peers = check_peers(policy)
    finally:
        process.stop()
    assert peers.status == "fail"
    answered = f"the engine at 127.0.0.2:{port} answers without a client certificate: HTTP/1.1 401"
    assert peers.summary.startswith(answered)


def test_a_stopped_engine_is_unknown_to_its_doctor_not_passed(mesh: Mesh, tmp_path: Path) -> None:
    port = free_port()
    text = host_policy(mesh, tmp_path / "mesh").replace(f"port = {ENGINE_PORT}", f"port = {port}")
    policy = Policy.from_toml(text)
    install_mesh_keys(mesh.package("gpu-1"), policy, "gpu-1")
    peers = check_peers(policy)
    assert peers.status == "unknown" and "nothing listens on 127.0.0.2" in peers.summary


@pytest.fixture
def installed_engine(mesh: Mesh, tmp_path: Path) -> Policy:
    policy = Policy.from_toml(host_policy(mesh, tmp_path / "mesh"))
    install_mesh_keys(mesh.package("gpu-1"), policy, "gpu-1")
    return policy


def test_a_certificate_expiring_within_thirty_days_warns(mesh: Mesh, installed_engine: Policy) -> None:
    assert check_installed_keys(installed_engine).status == "pass"
    ca = mesh.ca()
    certificate, key = ca.issue(host_entry(ENGINE), now=datetime.now(timezone.utc), days=10)
    replace_installed_package(installed_engine, ca.certificate, certificate, key)
    check = check_installed_keys(installed_engine)
    assert check.status == "warn" and "expires within 30 days" in check.summary


def test_an_expired_certificate_fails(mesh: Mesh, installed_engine: Policy) -> None:
    ca = mesh.ca()
    certificate, key = ca.issue(host_entry(ENGINE), now=datetime.now(timezone.utc) - timedelta(days=5), days=1)
    replace_installed_package(installed_engine, ca.certificate, certificate, key)
    check = check_installed_keys(installed_engine)
    assert check.status == "fail" and "expired at" in check.summary


def test_a_certificate_whose_address_is_not_this_hosts_entry_fails(mesh: Mesh, installed_engine: Policy) -> None:
    ca = mesh.ca()
    certificate, key = ca.issue(host_entry(MeshHost("gpu-1", "engine", "127.0.0.9", ENGINE_PORT)),
                                now=datetime.now(timezone.utc), days=90)  # fmt: skip
    replace_installed_package(installed_engine, ca.certificate, certificate, key)
    check = check_installed_keys(installed_engine)
    assert check.status == "fail" and "the policy gives gpu-1 127.0.0.2" in check.summary


def test_a_key_readable_by_others_fails(installed_engine: Policy) -> None:
    key = Path(installed_engine.mesh.key_dir) / MESH_KEY_FILE
    os.chmod(key, 0o640)
    check = check_installed_keys(installed_engine)
    assert check.status == "fail" and "mode 0640 lets others read it" in check.summary


def test_a_symlink_where_the_key_belongs_fails(installed_engine: Policy, tmp_path: Path) -> None:
    key = Path(installed_engine.mesh.key_dir) / MESH_KEY_FILE
    shutil.move(key, tmp_path / "moved.key")
    key.symlink_to(tmp_path / "moved.key")
    check = check_installed_keys(installed_engine)
    assert check.status == "fail" and "is a symlink, not a regular file" in check.summary


def test_a_key_not_owned_by_the_service_user_fails(installed_engine: Policy) -> None:
    if os.geteuid() != 0:
        pytest.skip("handing a file to another owner needs root")
    os.chown(Path(installed_engine.mesh.key_dir) / MESH_KEY_FILE, 0, 0)
    check = check_installed_keys(installed_engine)
    assert check.status == "fail" and f"not the service user '{service_user()}'" in check.summary


def test_a_single_host_passes_both_checks_without_touching_the_network() -> None:
    assert check_installed_keys(Policy.default()).status == "pass"
    assert check_peers(Policy.default()).summary == "a single host: no mesh peers"


def _service_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(service_user())
    return entry.pw_uid, entry.pw_gid


def replace_installed_package(policy: Policy, ca_certificate: x509.Certificate, certificate: x509.Certificate,
                              key: object) -> None:  # fmt: skip
    """Put another certificate and key in the installed key directory, the key owned as the installer leaves it."""
    write_package(Path(policy.mesh.key_dir), ca_certificate, certificate, key)
    os.chown(Path(policy.mesh.key_dir) / MESH_KEY_FILE, *_service_ids())


# --- the whole flow: a signed bundle carrying the mesh policy, installed with this host's keys, then the doctor ----


def test_bundle_install_with_this_hosts_keys_renders_its_walls_and_the_doctor_passes_the_mesh(
    mesh: Mesh, tiny_model: Path, tmp_path: Path, engine: tuple[EngineHostProcess, Policy, Path]
) -> None:
    keys = make_keys(tmp_path / "keys", "publisher")
    root = tmp_path / "root"
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(host_policy(mesh, root / "mesh"))
    items = [model_item(tiny_model), Item("policy", "policy.toml", policy_file)]
    bundle = Publisher(keys).publish(tmp_path / "bundle", items, name="mesh", version=1, signers=("publisher",))
    host = trust(root, keys / "publisher.pub")
    with pytest.raises(ReleaseContentError, match="for host 'gw', this host is 'gpu-1'"):
        install_bundle(InstallRequest(bundle=bundle, root=host, mesh_host="gpu-1", mesh_keys=mesh.package("gw"),
                                      skip_eval=True, confirm_skip_eval=lambda _q: True))  # fmt: skip
    assert not (root / "current").exists()  # refused before anything went live
    sealbox_cli = [sys.executable, "-c", "from sealbox.cli import main; main()"]
    done = subprocess.run([*sealbox_cli, "bundle", "install", str(bundle), "--root", str(root), "--mesh-host", "gpu-1",
                           "--mesh-keys", str(mesh.package("gpu-1")), "--skip-eval", "--yes"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (root / "mesh" / MESH_CERT_FILE).read_bytes() == (mesh.package("gpu-1") / MESH_CERT_FILE).read_bytes()
    unit = (root / "current" / "service" / "sealbox.service").read_text()
    assert "IPAddressAllow=localhost 127.0.0.1/32\n" in unit  # the gateway, and nobody else
    doctor = subprocess.run([*sealbox_cli, "doctor", "--json", "--root", str(root)], capture_output=True, text=True,
                            timeout=300, cwd=REPO)  # fmt: skip
    checks = {check["name"]: check for check in json.loads(doctor.stdout)["checks"]}
    assert checks["mesh-keys"]["status"] == "pass", checks["mesh-keys"]
    # the real `sealbox doctor`, under its own egress guard, reaches this host's engine (the module's, at gpu-1's
    # address and port) and sees it refuse a client without a certificate
    assert checks["mesh-peers"]["status"] == "pass", checks["mesh-peers"]
    assert "refuses a connection without a client certificate" in checks["mesh-peers"]["summary"]
