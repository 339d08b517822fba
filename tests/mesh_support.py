"""A mesh of the test's own making: a policy naming a gateway and engine hosts on loopback addresses, key packages
made by the real `sealbox keys mesh create`, and hand-made packages for the attacks (signed by the real MeshCA)."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server_support import sealbox
from sealbox.bundler.mesh_keys import MeshCA
from sealbox.runtime.policy import MESH_CA_FILE, MESH_CERT_FILE, MESH_KEY_FILE, MeshHostPolicy, Policy


def service_user() -> str:
    """`nobody` when the tests run as root (so the chown is real), else the user running them."""
    return "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name


@dataclass(frozen=True)
class MeshHost:
    name: str
    role: str
    address: str
    port: int


def mesh_policy_text(key_dir: Path, hosts: list[MeshHost], *, extra: str = "") -> str:
    text = f'[service]\nuser = "{service_user()}"\n{extra}[mesh]\nkey_dir = "{key_dir}"\n'
    for host in hosts:
        text += (f'[[mesh.hosts]]\nname = "{host.name}"\nrole = "{host.role}"\naddress = "{host.address}"\n'
                 f"port = {host.port}\n")  # fmt: skip
    return text


@dataclass
class Mesh:
    """A policy file, its CA directory (connected host) and the key packages `keys mesh create` wrote."""

    folder: Path
    hosts: list[MeshHost]
    extra: str = ""

    @property
    def policy_path(self) -> Path:
        return self.folder / "mesh.toml"

    @property
    def ca_dir(self) -> Path:
        return self.folder / "ca"

    @property
    def key_dir(self) -> Path:
        return self.folder / "installed"

    def package(self, name: str) -> Path:
        return self.folder / "packages" / name

    def create(self) -> Mesh:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.policy_path.write_text(mesh_policy_text(self.key_dir, self.hosts, extra=self.extra))
        done = sealbox("keys", "mesh", "create", "--policy", str(self.policy_path), "--ca-dir", str(self.ca_dir),
                       "--out", str(self.folder / "packages"))  # fmt: skip
        assert done.returncode == 0, done.stderr
        return self

    def policy(self) -> Policy:
        return Policy.load(self.policy_path)

    def ca(self) -> MeshCA:
        return MeshCA.open_or_create(self.ca_dir, name="unused", now=datetime.now(timezone.utc))[0]


def write_package(folder: Path, ca: x509.Certificate, certificate: x509.Certificate, key: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MESH_CA_FILE).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / MESH_CERT_FILE).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / MESH_KEY_FILE).write_bytes(key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))  # fmt: skip
    os.chmod(folder / MESH_KEY_FILE, 0o600)
    return folder


def host_entry(host: MeshHost) -> MeshHostPolicy:
    return MeshHostPolicy.model_validate(vars(host))
