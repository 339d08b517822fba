"""Engine hosts behind a gateway, for tests: a private CA, certificates for the engines and the gateway, and the two
processes (`sealbox serve` with mutual TLS, `sealbox gateway`), on loopback or inside a network namespace."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server_support import SEALBOX, ServerProcess, create_api_key


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip
    path.chmod(0o600)


@dataclass
class PrivateCA:
    """A certificate authority of its own, written under `folder`: issues server and client certificates."""

    folder: Path
    name: str = "sealbox test CA"
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    cert_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        self.cert_path = self.folder / f"{self.name.replace(' ', '-')}.crt"
        self.cert_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, address: str | None = None, client: bool = False) -> tuple[Path, Path]:
        """A certificate for `name`: a server's for `address` (IP SAN), or a client's; returns (cert, key) paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )  # fmt: skip
        if address is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]), critical=False
            )
        certificate = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.folder / f"{name}.crt", self.folder / f"{name}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
        return cert_path, key_path


def loopback_pki(folder: Path, engines: tuple[str, ...]) -> dict[str, Path]:
    """An engines' CA with a certificate for each of `engines` on 127.0.0.1, a gateway CA with the gateway's client
    certificate: `engines_ca`, `gateway_ca`, `<name>.crt`, `<name>.key`, `client.crt`, `client.key`."""
    engines_ca, gateway_ca = PrivateCA(folder / "engines", "engines CA"), PrivateCA(folder / "gateway", "gateway CA")
    paths = {"engines_ca": engines_ca.cert_path, "gateway_ca": gateway_ca.cert_path}
    for name in engines:
        paths[f"{name}.crt"], paths[f"{name}.key"] = engines_ca.issue(name, address="127.0.0.1")
    paths["client.crt"], paths["client.key"] = gateway_ca.issue("gateway", client=True)
    return paths


@dataclass
class EngineHostProcess(ServerProcess):
    """`sealbox serve` as an engine host: TLS with its certificate, a client certificate from `client_ca` required."""

    host: str = "127.0.0.1"
    name: str = "engine"

    @property
    def https_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def command(self) -> list[str]:
        command = super().command()
        command[command.index("--host") + 1] = self.host
        return command


def engine_policy(cert: Path, key: Path, client_ca: Path, *, sequences: int = 4, queue: int = 16,
                  context: int = 512) -> str:  # fmt: skip
    return (f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\ntls_client_ca = "{client_ca}"\n'
            f"[limits]\ncontext = {context}\nmax_sequences = {sequences}\nqueue_size = {queue}\nkv_cells = {context * sequences}\n")  # fmt: skip


def engine_key_file(engine: EngineHostProcess) -> Path:
    """An API key of the engine host's own store, for the gateway to present; written as the gateway's key file."""
    path = engine.root / "gateway.key"
    path.write_text(create_api_key(engine.root, "gateway", "gateway") + "\n")
    path.chmod(0o600)
    return path


def gateway_policy(*, engines: list[tuple[EngineHostProcess, Path, str]], engine_ca: Path, client_cert: Path,
                   client_key: Path, per_principal: int = 32, interval_s: float = 0.5) -> str:  # fmt: skip
    """`engines`: (process, API key file, pinned fingerprint or "")."""
    text = (f'[gateway]\nclient_cert = "{client_cert}"\nclient_key = "{client_key}"\nengine_ca = "{engine_ca}"\n'
            f"max_in_flight_per_principal = {per_principal}\nhealth_interval_s = {interval_s}\nconnect_timeout_s = 3\n")  # fmt: skip
    for process, key_file, fingerprint in engines:
        text += (f'[[gateway.engines]]\nname = "{process.name}"\nurl = "{process.https_url}"\n'
                 f'fingerprint = "{fingerprint}"\napi_key_file = "{key_file}"\n')  # fmt: skip
    return text


@dataclass
class GatewayProcess(ServerProcess):
    """`sealbox gateway` in front of the engines its policy names (plain HTTP on loopback, API keys on)."""

    def command(self) -> list[str]:
        command = [*self.executable, "gateway", "--root", str(self.root), "--host", "127.0.0.1", "--port", str(self.port)]
        if self.policy is not None:
            command += ["--policy", str(self.policy)]
        return command + self.extra_args


__all__ = ["SEALBOX", "EngineHostProcess", "GatewayProcess", "PrivateCA", "engine_key_file", "engine_policy",
           "gateway_policy", "loopback_pki"]  # fmt: skip
