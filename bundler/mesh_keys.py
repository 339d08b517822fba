"""Mutual-TLS keys of a mesh (one gateway, its engine hosts): made on the connected host, installed on each host.

Design (docs/architecture.md, "Mesh keys"): `sealbox keys mesh create` makes the mesh CA once and keeps its private
key on the connected host (like the publisher keys); it issues one certificate per host the policy's `[mesh]`
names and writes one key package per host, `OUT/<host>/` (CA certificate, host certificate, host key 0600). The
CA's sha256 is written into the policy, so it travels signed in the bundle; the packages never do: each goes to its
own host on its own medium, and `sealbox bundle install --mesh-host NAME --mesh-keys DIR` (or `sealbox keys mesh
install`) refuses any package that is not the pinned CA's certificate for this very host before writing a byte.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sealbox.runtime.durable_file import write_atomically
from sealbox.runtime.mesh.host_identity import ROLE_USAGE, HostIdentity, MeshIdentityError, certificate_sha256
from sealbox.runtime.mesh.peer_set import MeshHostError, this_host
from sealbox.runtime.policy import MESH_CA_FILE, MESH_CERT_FILE, MESH_KEY_FILE, MeshHostPolicy, Policy, PolicyError
from sealbox.runtime.regular_file import file_kind, read_regular

CA_KEY_FILE = "mesh-ca.key"
CA_DAYS = 3650
HOST_DAYS = 397
_CA_PIN = re.compile(r'^ca_sha256\s*=\s*"[^"\n]*"[ \t]*$', re.MULTILINE)
_MESH_HEADER = re.compile(r"^\[mesh\][ \t]*$", re.MULTILINE)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class MeshCA:
    """The mesh's certificate authority: its key never leaves the connected host's `ca_dir`."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def open_or_create(cls, ca_dir: Path, *, name: str, now: datetime.datetime) -> tuple[MeshCA, bool]:
        """The CA in `ca_dir` (reused: re-issuing keeps every host's trust), else a new one. (CA, created?)"""
        key_path, cert_path = ca_dir / CA_KEY_FILE, ca_dir / MESH_CA_FILE
        if key_path.exists() or cert_path.exists():
            key = serialization.load_pem_private_key(read_regular(key_path), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise MeshIdentityError(f"{key_path}: not an EC private key")
            return cls(key, x509.load_pem_x509_certificate(read_regular(cert_path))), False
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"sealbox mesh CA {name}")])
        usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False)  # fmt: skip
        certificate = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        ca_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(key_path, _pem_key(key), mode=0o600)
        write_atomically(cert_path, _pem(certificate), mode=0o644)
        return cls(key, certificate), True

    def issue(self, host: MeshHostPolicy, *, now: datetime.datetime,
              days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:  # fmt: skip
        """A certificate for `host`: its name as CN, its address as the only IP SAN, the role's key usage."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host.name)]))
            .issuer_name(self.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=days), self.certificate.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ROLE_USAGE[host.role]]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host.address))]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        return certificate, key


@dataclass(frozen=True)
class CreatedMesh:
    ca_sha256: str
    ca_created: bool
    packages: dict[str, Path]


def create_mesh_keys(policy_path: Path, *, ca_dir: Path, out: Path, days: int = HOST_DAYS,
                     now: datetime.datetime | None = None) -> CreatedMesh:  # fmt: skip
    """Make (or reuse) the mesh CA, one key package per host of the policy's `[mesh]`, and pin the CA in the policy.

    Raises:
        PolicyError: the policy does not parse or names no mesh hosts.
        MeshIdentityError: the CA in `ca_dir` cannot be read.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    policy = Policy.load(policy_path)
    if not policy.mesh.hosts:
        raise PolicyError(f"{policy_path}: [mesh] names no hosts: add one [[mesh.hosts]] table per host")
    ca, created = MeshCA.open_or_create(ca_dir, name=policy_path.stem, now=now)
    packages = {}
    for host in policy.mesh.hosts:
        certificate, key = ca.issue(host, now=now, days=days)
        folder = out / host.name
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        write_atomically(folder / MESH_CA_FILE, _pem(ca.certificate), mode=0o644)
        write_atomically(folder / MESH_CERT_FILE, _pem(certificate), mode=0o644)
        write_atomically(folder / MESH_KEY_FILE, _pem_key(key), mode=0o600)
        packages[host.name] = folder
    pin = certificate_sha256(ca.certificate)
    pin_ca_in_policy(policy_path, pin)
    return CreatedMesh(pin, created, packages)


def pin_ca_in_policy(policy_path: Path, pin: str) -> None:
    """Write `ca_sha256 = "<pin>"` into the policy's `[mesh]` table (replacing one there), keeping the rest as written.

    Raises:
        PolicyError: the file has no `[mesh]` header, or the edit did not give the policy this pin.
    """
    text = policy_path.read_text(encoding="utf-8")
    line = f'ca_sha256 = "{pin}"'
    if len(_CA_PIN.findall(text)) == 1:
        updated = _CA_PIN.sub(line, text)
    elif (header := _MESH_HEADER.search(text)) is not None and not _CA_PIN.search(text):
        updated = text[: header.end()] + "\n" + line + text[header.end():]
    else:
        raise PolicyError(f"{policy_path}: cannot place the mesh CA pin: write a `[mesh]` table with one "
                          "ca_sha256 line")  # fmt: skip
    if Policy.from_toml(updated, source=str(policy_path)).mesh.ca_sha256 != pin:
        raise PolicyError(f"{policy_path}: the ca_sha256 line edited is not the [mesh] table's")
    write_atomically(policy_path, updated.encode("utf-8"), mode=stat.S_IMODE(os.stat(policy_path).st_mode))


@dataclass(frozen=True)
class KeyPackage:
    """One host's key package as read from its medium (each file opened as a regular file only)."""

    folder: Path
    ca: bytes
    certificate: bytes
    key: bytes

    @classmethod
    def read(cls, folder: Path) -> KeyPackage:
        """Raises MeshIdentityError when a file is missing or is not a regular file (a symlink, a FIFO)."""
        try:
            names = (MESH_CA_FILE, MESH_CERT_FILE, MESH_KEY_FILE)
            files = (read_regular(folder / name, limit=1 << 16) for name in names)
            return cls(folder, *files)
        except OSError as exc:
            raise MeshIdentityError(f"key package {folder}: {exc.strerror or exc}") from exc

    def identity(self) -> HostIdentity:
        return HostIdentity.from_bytes(self.ca, self.certificate, self.key)

    def verify(self, policy: Policy, host_name: str | None) -> MeshHostPolicy:
        """The package is the pinned CA's, for this host, valid now, its key the certificate's.

        Raises:
            MeshIdentityError: naming the first check that fails.
        """
        try:
            host = this_host(policy, host_name)
        except MeshHostError as exc:
            raise MeshIdentityError(str(exc)) from exc
        self.identity().verify(policy.mesh, host)
        return host


def install_mesh_keys(folder: Path, policy: Policy, host_name: str | None) -> list[Path]:
    """Check the package, then put its files at the policy's `[mesh] key_dir`: the key 0600 and the certificates
    0644, all owned by the service user. Returns the paths written.

    Raises:
        MeshIdentityError: the package fails a check, the service user does not exist, or a symlink, FIFO or
            anything but a regular file sits where a file belongs (nothing is written then).
    """
    package = KeyPackage.read(folder)
    package.verify(policy, host_name)
    owner = _service_owner(policy.service.user)
    key_dir = Path(policy.mesh.key_dir)
    _check_directory(key_dir)
    targets = [(MESH_CA_FILE, package.ca, 0o644), (MESH_CERT_FILE, package.certificate, 0o644),
               (MESH_KEY_FILE, package.key, 0o600)]  # fmt: skip
    for name, _, _ in targets:
        _check_place(key_dir / name)
    written = []
    for name, data, mode in targets:
        write_atomically(key_dir / name, data, mode=mode, owner=owner)
        written.append(key_dir / name)
    return written


def _service_owner(user: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError as exc:
        raise MeshIdentityError(f"service user {user!r} does not exist on this host: create it first") from exc
    if os.geteuid() not in (0, entry.pw_uid):
        raise MeshIdentityError(f"only root can hand the mesh key to service user {user!r}")
    return entry.pw_uid, entry.pw_gid


def _check_directory(key_dir: Path) -> None:
    try:
        mode = os.lstat(key_dir).st_mode
    except FileNotFoundError:
        key_dir.mkdir(parents=True, mode=0o755)
        return
    if not stat.S_ISDIR(mode):
        raise MeshIdentityError(f"{key_dir}: is {file_kind(mode)} where the mesh key directory belongs")


def _check_place(path: Path) -> None:
    """What sits where a mesh file goes may be replaced only if it is a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise MeshIdentityError(f"{path}: is {file_kind(mode)} where a mesh file belongs; remove it and install again")

