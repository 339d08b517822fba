"""Mesh keys, made on the connected host and installed on each host: `sealbox keys mesh create` / `install` and
`bundle install --mesh-host/--mesh-keys`. Every check of the install is attacked with a package that only that
check refuses, and each refusal leaves the key directory as it was."""

from __future__ import annotations

import os
import pwd
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509

from mesh_support import Mesh, MeshHost, host_entry, service_user, write_package
from server_support import sealbox
from sealbox.bundler.mesh_keys import MeshCA, install_mesh_keys
from sealbox.runtime.mesh.host_identity import MeshIdentityError, certificate_sha256
from sealbox.runtime.policy import MESH_CA_FILE, MESH_CERT_FILE, MESH_KEY_FILE, Policy, PolicyError

GATEWAY = MeshHost("gw", "gateway", "127.0.0.1", 18090)
ENGINE = MeshHost("gpu-1", "engine", "127.0.0.2", 18443)
OTHER_ENGINE = MeshHost("gpu-2", "engine", "127.0.0.3", 18443)
HOSTS = [GATEWAY, ENGINE, OTHER_ENGINE]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Mesh:
    return Mesh(tmp_path_factory.mktemp("mesh"), HOSTS).create()


@pytest.fixture
def key_dir(tmp_path: Path, mesh: Mesh) -> tuple[Policy, Path]:
    """The mesh's policy with its key directory moved under this test's tmp_path (each test installs afresh)."""
    installed = tmp_path / "installed"
    text = mesh.policy_path.read_text().replace(str(mesh.key_dir), str(installed))
    return Policy.from_toml(text), installed


def refused(policy: Policy, package: Path, host: str, match: str) -> None:
    with pytest.raises(MeshIdentityError, match=match):
        install_mesh_keys(package, policy, host)


def test_create_writes_one_package_per_host_and_pins_the_ca_in_the_policy(mesh: Mesh) -> None:
    policy = mesh.policy()
    ca = x509.load_pem_x509_certificate((mesh.ca_dir / MESH_CA_FILE).read_bytes())
    assert policy.mesh.ca_sha256 == certificate_sha256(ca)
    assert stat.S_IMODE(os.stat(mesh.ca_dir / "mesh-ca.key").st_mode) == 0o600
    for host in HOSTS:
        package = mesh.package(host.name)
        assert stat.S_IMODE(os.stat(package / MESH_KEY_FILE).st_mode) == 0o600
        certificate = x509.load_pem_x509_certificate((package / MESH_CERT_FILE).read_bytes())
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == [host.address]
        certificate.verify_directly_issued_by(ca)
    # the policy names the installed files, so serve and gateway read what install put there
    assert policy.server.tls_key == policy.gateway.client_key == str(mesh.key_dir / MESH_KEY_FILE)
    assert policy.server.tls_client_ca == policy.gateway.engine_ca == str(mesh.key_dir / MESH_CA_FILE)


def test_create_again_reuses_the_ca_so_the_pin_and_every_installed_host_stay_valid(mesh: Mesh, tmp_path: Path) -> None:
    before = mesh.policy().mesh.ca_sha256
    again = Mesh(mesh.folder, HOSTS)
    done = sealbox("keys", "mesh", "create", "--policy", str(mesh.policy_path), "--ca-dir", str(mesh.ca_dir),
                   "--out", str(tmp_path / "again"), "--json")  # fmt: skip
    assert '"ca_created": false' in done.stdout
    assert again.policy().mesh.ca_sha256 == before


def test_install_puts_the_hosts_files_in_place_private_to_the_service_user(key_dir: tuple[Policy, Path],
                                                                           mesh: Mesh) -> None:  # fmt: skip
    policy, installed = key_dir
    written = install_mesh_keys(mesh.package("gpu-1"), policy, "gpu-1")
    assert [p.name for p in written] == [MESH_CA_FILE, MESH_CERT_FILE, MESH_KEY_FILE]
    key = os.stat(installed / MESH_KEY_FILE)
    assert stat.S_IMODE(key.st_mode) == 0o600
    assert key.st_uid == pwd.getpwnam(service_user()).pw_uid
    assert (installed / MESH_KEY_FILE).read_bytes() == (mesh.package("gpu-1") / MESH_KEY_FILE).read_bytes()


def test_the_cli_installs_against_the_policy_given(key_dir: tuple[Policy, Path], mesh: Mesh, tmp_path: Path) -> None:
    policy, installed = key_dir
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(mesh.policy_path.read_text().replace(str(mesh.key_dir), str(installed)))
    done = sealbox("keys", "mesh", "install", str(mesh.package("gw")), "--host", "gw", "--policy", str(policy_file))
    assert f"installed {installed / MESH_KEY_FILE}" in done.stdout
    wrong = sealbox("keys", "mesh", "install", str(mesh.package("gw")), "--host", "gpu-1", "--policy", str(policy_file),
                    check=False)  # fmt: skip
    assert wrong.returncode == 33 and "for host 'gw', this host is 'gpu-1'" in wrong.stderr


def test_install_refuses_a_package_from_another_mesh_ca(key_dir: tuple[Policy, Path], tmp_path: Path) -> None:
    policy, installed = key_dir
    stranger = MeshCA.open_or_create(tmp_path / "stranger-ca", name="stranger", now=datetime.now(timezone.utc))[0]
    certificate, key = stranger.issue(host_entry(ENGINE), now=datetime.now(timezone.utc), days=30)
    refused(policy, write_package(tmp_path / "p", stranger.certificate, certificate, key), "gpu-1", "the policy pins")
    assert not installed.exists()


def test_install_refuses_a_certificate_that_does_not_chain_to_the_pinned_ca(key_dir: tuple[Policy, Path], mesh: Mesh,
                                                                            tmp_path: Path) -> None:  # fmt: skip
    policy, installed = key_dir
    stranger = MeshCA.open_or_create(tmp_path / "stranger-ca", name="stranger", now=datetime.now(timezone.utc))[0]
    certificate, key = stranger.issue(host_entry(ENGINE), now=datetime.now(timezone.utc), days=30)
    # the pinned CA's certificate beside a host certificate some other CA signed
    package = write_package(tmp_path / "p", mesh.ca().certificate, certificate, key)
    refused(policy, package, "gpu-1", "does not chain to the mesh CA")
    assert not installed.exists()


def test_install_refuses_another_hosts_certificate(key_dir: tuple[Policy, Path], mesh: Mesh) -> None:
    policy, installed = key_dir
    refused(policy, mesh.package("gpu-2"), "gpu-1", "for host 'gpu-2', this host is 'gpu-1'")
    assert not installed.exists()


def test_install_refuses_a_certificate_for_this_name_at_another_address(key_dir: tuple[Policy, Path], mesh: Mesh,
                                                                        tmp_path: Path) -> None:  # fmt: skip
    policy, installed = key_dir
    ca = mesh.ca()
    moved = host_entry(MeshHost("gpu-1", "engine", "127.0.0.9", 18443))
    certificate, key = ca.issue(moved, now=datetime.now(timezone.utc), days=30)
    refused(policy, write_package(tmp_path / "p", ca.certificate, certificate, key), "gpu-1", r"address\(es\) \['127.0.0.9'\]")
    assert not installed.exists()


def test_install_refuses_a_gateway_certificate_on_an_engine_of_the_same_name(key_dir: tuple[Policy, Path], mesh: Mesh,
                                                                             tmp_path: Path) -> None:  # fmt: skip
    policy, _ = key_dir
    ca = mesh.ca()
    certificate, key = ca.issue(host_entry(MeshHost("gpu-1", "gateway", "127.0.0.2", 18443)), now=datetime.now(timezone.utc), days=30)
    refused(policy, write_package(tmp_path / "p", ca.certificate, certificate, key), "gpu-1", "not for a mesh engine")


def test_install_refuses_an_expired_certificate(key_dir: tuple[Policy, Path], mesh: Mesh, tmp_path: Path) -> None:
    policy, installed = key_dir
    ca = mesh.ca()
    certificate, key = ca.issue(host_entry(ENGINE), now=datetime.now(timezone.utc) - timedelta(days=10), days=2)
    refused(policy, write_package(tmp_path / "p", ca.certificate, certificate, key), "gpu-1", "expired at")
    assert not installed.exists()


def test_install_refuses_a_key_that_is_not_the_certificates(key_dir: tuple[Policy, Path], mesh: Mesh, tmp_path: Path) -> None:
    policy, installed = key_dir
    ca = mesh.ca()
    certificate, _ = ca.issue(host_entry(ENGINE), now=datetime.now(timezone.utc), days=30)
    _, other_key = ca.issue(host_entry(ENGINE), now=datetime.now(timezone.utc), days=30)
    refused(policy, write_package(tmp_path / "p", ca.certificate, certificate, other_key), "gpu-1", "not the certificate's key")
    assert not installed.exists()


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_install_refuses_a_symlink_or_fifo_where_the_key_file_belongs(kind: str, key_dir: tuple[Policy, Path], mesh: Mesh,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    policy, installed = key_dir
    installed.mkdir()
    target = tmp_path / "elsewhere"
    target.write_text("not a key\n")
    if kind == "symlink":
        (installed / MESH_KEY_FILE).symlink_to(target)
    else:
        os.mkfifo(installed / MESH_KEY_FILE)
    refused(policy, mesh.package("gpu-1"), "gpu-1", "a symlink|a FIFO")
    assert target.read_text() == "not a key\n"
    assert sorted(p.name for p in installed.iterdir()) == [MESH_KEY_FILE]  # nothing written beside it either
    assert stat.S_ISLNK(os.lstat(installed / MESH_KEY_FILE).st_mode) == (kind == "symlink")


def test_install_refuses_a_fifo_in_the_package_without_blocking(key_dir: tuple[Policy, Path], mesh: Mesh, tmp_path: Path) -> None:
    policy, installed = key_dir
    package = tmp_path / "p"
    package.mkdir()
    for name in (MESH_CA_FILE, MESH_CERT_FILE):
        (package / name).write_bytes((mesh.package("gpu-1") / name).read_bytes())
    os.mkfifo(package / MESH_KEY_FILE)
    refused(policy, package, "gpu-1", "a FIFO")
    assert not installed.exists()


def test_install_refuses_a_host_the_policy_does_not_name(key_dir: tuple[Policy, Path], mesh: Mesh) -> None:
    policy, _ = key_dir
    refused(policy, mesh.package("gpu-1"), "gpu-9", "names no host 'gpu-9'")


def test_a_policy_whose_tls_paths_point_elsewhere_than_the_mesh_files_is_refused(mesh: Mesh) -> None:
    text = mesh.policy_path.read_text().replace("[mesh]", '[server]\ntls_key = "/etc/other.key"\ntls_cert = "/etc/o.crt"\n[mesh]')
    with pytest.raises(PolicyError, match="server.tls_cert must be"):
        Policy.from_toml(text)


def test_a_gateway_engine_that_is_not_a_mesh_engine_at_that_url_is_refused(mesh: Mesh) -> None:
    text = mesh.policy_path.read_text() + '[[gateway.engines]]\nname = "gpu-1"\nurl = "https://127.0.0.2:9999"\n'
    with pytest.raises(PolicyError, match="not a mesh engine host at that URL"):
        Policy.from_toml(text)
