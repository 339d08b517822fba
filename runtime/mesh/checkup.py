"""`sealbox doctor`'s view of the mesh on one host: the installed certificate and key (kinds, modes, owner, the
identity checks of host_identity), and the peers themselves: from the gateway, each engine's status answers over
mutual TLS; on an engine, a connection without a client certificate is refused.

Which host this is comes from the installed certificate's common name (what the host will present), looked up
in the policy's `[mesh]`; the certificate must then carry that entry's address.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import ssl
import stat
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from sealbox.runtime.mesh.host_identity import HostIdentity, MeshIdentityError
from sealbox.runtime.policy import MESH_CA_FILE, MESH_CERT_FILE, MESH_KEY_FILE, EgressPolicy, MeshHostPolicy, Policy
from sealbox.runtime.regular_file import file_kind, read_regular

EXPIRY_WARN_DAYS = 30
PROBE_REQUEST = b"GET /v1/engine/status HTTP/1.1\r\nHost: sealbox\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True)
class MeshCheck:
    status: Literal["pass", "warn", "fail", "unknown"]
    summary: str
    details: tuple[str, ...] = ()


def installed_identity(policy: Policy) -> tuple[HostIdentity, MeshHostPolicy]:
    """The files at `[mesh] key_dir` (regular files, the key private to the service user) and this host's entry.

    Raises:
        MeshIdentityError: a file is missing, not a regular file, has unsafe modes or owner, or names no mesh host.
    """
    key_dir = Path(policy.mesh.key_dir)
    contents = {}
    for name in (MESH_CA_FILE, MESH_CERT_FILE, MESH_KEY_FILE):
        path = key_dir / name
        try:
            info = os.lstat(path)
        except FileNotFoundError as exc:
            raise MeshIdentityError(f"{path} is missing (`sealbox keys mesh install`)") from exc
        if not stat.S_ISREG(info.st_mode):
            raise MeshIdentityError(f"{path}: is {file_kind(info.st_mode)}, not a regular file")
        loose = 0o077 if name == MESH_KEY_FILE else 0o022
        if info.st_mode & loose:
            raise MeshIdentityError(f"{path}: mode {stat.S_IMODE(info.st_mode):04o} lets others "
                                    f"{'read' if name == MESH_KEY_FILE else 'write'} it")  # fmt: skip
        if name == MESH_KEY_FILE:
            _check_owner(path, info, policy.service.user)
        try:
            contents[name] = read_regular(path, limit=1 << 16)
        except OSError as exc:
            raise MeshIdentityError(f"{path}: {exc.strerror or exc}") from exc
    identity = HostIdentity.from_bytes(contents[MESH_CA_FILE], contents[MESH_CERT_FILE], contents[MESH_KEY_FILE])
    host = policy.mesh.host(identity.name)
    if host is None:
        raise MeshIdentityError(f"the installed certificate is for {identity.name!r}, a host the policy's mesh "
                                "does not name")  # fmt: skip
    return identity, host


def _check_owner(path: Path, info: os.stat_result, user: str) -> None:
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError as exc:
        raise MeshIdentityError(f"service user {user!r} does not exist") from exc
    if info.st_uid != uid:
        raise MeshIdentityError(f"{path}: owned by uid {info.st_uid}, not the service user {user!r} ({uid})")


def check_installed_keys(policy: Policy, *, now: datetime | None = None,
                         warn_days: int = EXPIRY_WARN_DAYS) -> MeshCheck:  # fmt: skip
    """Fail on anything install would refuse (or the doctor's mode checks); warn within `warn_days` of expiry."""
    if not policy.mesh.hosts:
        return MeshCheck("pass", "a single host: the policy names no mesh")
    now = now or datetime.now(timezone.utc)
    try:
        identity, host = installed_identity(policy)
        identity.verify(policy.mesh, host, now=now)
    except MeshIdentityError as exc:
        return MeshCheck("fail", str(exc))
    expires = min(identity.not_after(), identity.ca.not_valid_after_utc)
    details = (f"host {host.name} ({host.role}) at {host.address}:{host.port}", f"CA {policy.mesh.ca_sha256}",
               f"expires {expires.isoformat()}")  # fmt: skip
    if expires - now < timedelta(days=warn_days):
        return MeshCheck("warn", f"the mesh certificate of {host.name} expires within {warn_days} days "
                                 f"({expires.isoformat()}): issue a new one", details)  # fmt: skip
    return MeshCheck("pass", f"{host.name}'s certificate and key are the mesh CA's for {host.address}", details)


def check_peers(policy: Policy) -> MeshCheck:
    """Talks to the peers (the one check of the doctor that sends packets, and only to the policy's mesh)."""
    if not policy.mesh.hosts:
        return MeshCheck("pass", "a single host: no mesh peers")
    try:
        _, host = installed_identity(policy)
    except MeshIdentityError as exc:
        return MeshCheck("unknown", f"cannot tell which mesh host this is: {exc}")
    if host.role == "gateway":
        return _gateway_reaches_engines(policy)
    return _engine_refuses_strangers(policy, host)


def probe_egress(policy: Policy) -> EgressPolicy:
    """The doctor's egress allowlist: the policy's, plus exactly what check_peers talks to on this host (the gateway:
    each engine on its port; an engine: its own address and port). Unchanged when this host cannot be told."""
    if not policy.mesh.hosts:
        return policy.egress
    try:
        _, host = installed_identity(policy)
    except MeshIdentityError:
        return policy.egress
    if host.role == "gateway":
        from sealbox.runtime.gateway.startup import engine_egress

        return engine_egress(policy.egress, policy.gateway)
    own = f"[{host.address}]:{host.port}" if ":" in host.address else f"{host.address}:{host.port}"
    return policy.egress.model_copy(update={"peers": tuple(dict.fromkeys([*policy.egress.peers, own]))})


def _gateway_reaches_engines(policy: Policy) -> MeshCheck:
    from sealbox.runtime.gateway.engine_hosts import EngineHostError, EngineHosts

    async def poll() -> list[tuple[str, str, bool, str | None]]:
        hosts = EngineHosts.from_policy(policy.gateway)
        try:
            await hosts.poll_all()
            return [(h.name, h.url, h.healthy, h.problem) for h in hosts.hosts]
        finally:
            await hosts.stop()

    if not policy.gateway.engines:
        return MeshCheck("fail", "the gateway's policy names no [[gateway.engines]]")
    try:
        results = asyncio.run(poll())
    except (EngineHostError, OSError, ssl.SSLError) as exc:
        return MeshCheck("fail", f"the gateway cannot set up its engine clients: {exc}")
    details = tuple(f"{name} {url}: " + ("status answered over mutual TLS" if ok else f"NOT answering: {problem}")
                    for name, url, ok, problem in results)  # fmt: skip
    down = [name for name, _, ok, _ in results if not ok]
    if down:
        return MeshCheck("fail", f"engine host(s) not answering over mutual TLS: {', '.join(down)}", details)
    return MeshCheck("pass", f"every engine host ({len(results)}) answers its status over mutual TLS", details)


def _engine_refuses_strangers(policy: Policy, host: MeshHostPolicy) -> MeshCheck:
    """Connect to this engine as a stranger would (trusting the mesh CA, no client certificate); ask for its status."""
    where = f"{host.address}:{host.port}"
    context = ssl.create_default_context(cafile=policy.mesh.path(MESH_CA_FILE))
    try:
        with socket.create_connection((host.address, host.port), timeout=policy.gateway.connect_timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=host.address) as tls:
                tls.sendall(PROBE_REQUEST)
                answer = tls.recv(64)
    except ConnectionRefusedError:
        return MeshCheck("unknown", f"nothing listens on {where}: is the engine running?")
    except ssl.SSLCertVerificationError as exc:
        return MeshCheck("fail", f"the engine at {where} presents a certificate the mesh CA did not issue: "
                                 f"{exc.verify_message}")  # fmt: skip
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        return MeshCheck("pass", f"the engine at {where} refuses a connection without a client certificate",
                         (f"refused with: {exc}",))  # fmt: skip
    except OSError as exc:
        return MeshCheck("unknown", f"cannot reach {where}: {exc}")
    if answer.startswith(b"HTTP/"):
        return MeshCheck("fail", f"the engine at {where} answers without a client certificate: "
                                 f"{answer.splitlines()[0].decode(errors='replace')}")  # fmt: skip
    return MeshCheck("pass", f"the engine at {where} refuses a connection without a client certificate",
                     ("it closed the connection without an answer",))  # fmt: skip
