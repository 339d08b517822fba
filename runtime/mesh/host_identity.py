"""Is this host's mutual-TLS certificate and key the one the policy's mesh CA issued for it? Checked at install
(before the files go in place) and by `sealbox doctor` (on the files in place), as explicit steps over bytes.

The steps, each a refusal of its own: the CA is the one the signed policy pins (sha256 of its DER); the host's
certificate was signed by that CA; it is valid now; its common name is this host's name and its only IP SAN this
host's address; its extended key usage fits the host's role (an engine serves, the gateway is a client); the
private key is the certificate's.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sealbox.runtime.exit_codes import ExitCode
from sealbox.runtime.policy import MeshHostPolicy, MeshPolicy

ROLE_USAGE = {"engine": ExtendedKeyUsageOID.SERVER_AUTH, "gateway": ExtendedKeyUsageOID.CLIENT_AUTH}


class MeshIdentityError(Exception):
    """The certificate, key or CA is not this host's as the policy's mesh says; the message names the step."""

    exit_code = ExitCode.MESH_KEYS


def certificate_sha256(certificate: x509.Certificate) -> str:
    return "sha256:" + hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def load_certificate(data: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise MeshIdentityError(f"{what} is not a PEM certificate: {exc}") from exc


def load_private_key(data: bytes, what: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise MeshIdentityError(f"{what} is not an unencrypted PEM private key: {exc}") from exc


@dataclass(frozen=True)
class HostIdentity:
    """A host's mesh files, parsed: the CA certificate, the host's certificate and its private key."""

    ca: x509.Certificate
    certificate: x509.Certificate
    key: PrivateKeyTypes

    @classmethod
    def from_bytes(cls, ca: bytes, certificate: bytes, key: bytes) -> HostIdentity:
        """Raises MeshIdentityError when a file does not parse."""
        return cls(load_certificate(ca, "the mesh CA certificate"),
                   load_certificate(certificate, "the host certificate"),
                   load_private_key(key, "the host key"))  # fmt: skip

    @property
    def name(self) -> str:
        names = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else ""

    def addresses(self) -> list[str]:
        try:
            san = self.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        return [str(address) for address in san.get_values_for_type(x509.IPAddress)]

    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def verify(self, mesh: MeshPolicy, host: MeshHostPolicy, *, now: datetime | None = None) -> None:
        """Every step, in order. Raises MeshIdentityError naming the first that fails."""
        now = now or datetime.now(timezone.utc)
        self.check_ca_pinned(mesh)
        self.check_issued_by_ca()
        self.check_valid_at(now)
        self.check_for_host(host)
        self.check_key_matches()

    def check_ca_pinned(self, mesh: MeshPolicy) -> None:
        if not mesh.ca_sha256:
            raise MeshIdentityError("the policy pins no mesh CA ([mesh] ca_sha256, which `keys mesh create` writes)")
        seen = certificate_sha256(self.ca)
        if seen != mesh.ca_sha256:
            raise MeshIdentityError(f"the mesh CA certificate is {seen}, the policy pins {mesh.ca_sha256}")

    def check_issued_by_ca(self) -> None:
        try:
            self.certificate.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            why = str(exc) or type(exc).__name__
            raise MeshIdentityError(f"the host certificate does not chain to the mesh CA: {why}") from exc

    def check_valid_at(self, now: datetime) -> None:
        certificate = self.certificate
        if now > certificate.not_valid_after_utc:
            raise MeshIdentityError(f"the host certificate expired at {certificate.not_valid_after_utc.isoformat()}")
        if now < certificate.not_valid_before_utc:
            starts = certificate.not_valid_before_utc.isoformat()
            raise MeshIdentityError(f"the host certificate is not valid before {starts}")
        if now > self.ca.not_valid_after_utc:
            raise MeshIdentityError(f"the mesh CA certificate expired at {self.ca.not_valid_after_utc.isoformat()}")

    def check_for_host(self, host: MeshHostPolicy) -> None:
        if self.name != host.name:
            raise MeshIdentityError(f"the certificate is for host {self.name!r}, this host is {host.name!r}")
        addresses = self.addresses()
        if addresses != [str(ipaddress.ip_address(host.address))]:
            raise MeshIdentityError(f"the certificate names address(es) {addresses}, the policy gives {host.name} "
                                    f"{host.address}")  # fmt: skip
        try:
            usages = list(self.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        except x509.ExtensionNotFound:
            usages = []
        if ROLE_USAGE[host.role] not in usages:
            raise MeshIdentityError(f"the certificate is not for a mesh {host.role} (extended key usage {usages})")

    def check_key_matches(self) -> None:
        der, info = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if self.key.public_key().public_bytes(der, info) != self.certificate.public_key().public_bytes(der, info):
            raise MeshIdentityError("the host key is not the certificate's key")
