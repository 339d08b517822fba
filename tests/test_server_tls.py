"""TLS from the policy's certificate and key: clients on other hosts talk to the server encrypted, and a client that
does not trust the certificate gets no answer."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server_support import ServerProcess


def self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sealbox test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("appliance")
    cert, key = self_signed(root)
    policy = f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n[limits]\ncontext = 512\n'
    with ServerProcess(root, models=[tiny_model], policy_text=policy, no_auth=True) as process:
        yield process


def test_the_server_speaks_tls_with_the_configured_certificate(server: ServerProcess) -> None:
    trusted = ssl.create_default_context(cafile=str(server.root / "server.crt"))
    with httpx.Client(verify=trusted, timeout=30) as http:
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{server.port}/v1", api_key="unused", http_client=http)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert "https://" in server.stderr


def test_a_client_that_does_not_trust_the_certificate_gets_no_answer(server: ServerProcess) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://127.0.0.1:{server.port}/health", timeout=10)


def test_plain_http_to_the_tls_port_is_not_served(server: ServerProcess) -> None:
    with pytest.raises(httpx.HTTPError):
        response = httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=10)
        response.raise_for_status()
