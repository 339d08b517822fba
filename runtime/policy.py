"""The operator-facing configuration: one TOML file, validated before anything uses it."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class PolicyError(Exception):
    """The policy file is missing, not TOML, or breaks a rule; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def is_loopback_host(host: str) -> bool:
    """`localhost` or a loopback address: what only this host can reach (plain HTTP and --no-auth stay there)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServerPolicy(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    tls_cert: str = ""
    tls_key: str = ""
    max_body_bytes: int = Field(1 << 20, ge=1024)
    tls_client_ca: str = ""
    """CA file that signs the clients allowed to connect (mutual TLS): an engine host behind a gateway sets it to
    the gateway's CA, so a stranger on the link cannot complete a handshake. Empty = no client certificate asked."""
    allow_plain_http: bool = False
    """Serve plain HTTP on an address beyond loopback (no TLS): API keys and prompts cross the network readable by
    anyone on the path. Refused unless set; when set, the start record names it and the doctor flags it."""
    header_timeout_seconds: float = Field(10, gt=0, le=300)
    """A connection whose request line and headers are not complete this long after its first byte is closed."""
    keep_alive_timeout_seconds: float = Field(5, gt=0, le=300)
    """An idle keep-alive connection is closed after this long without a new request."""
    max_connections: int = Field(256, ge=1)
    """Open connections (and requests in progress) at most; past this, new requests are answered 503."""
    refusal_summary_seconds: float = Field(60, ge=1, le=3600)
    """Requests refused before authentication are counted per client address and reason and recorded once per
    interval, so that strangers cannot fill the disk with audit records."""
    cors_origins: list[str] = Field(default_factory=list)
    """Web origins whose pages may call the API from a browser (CORS); empty: none. Each still needs an API key."""

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", origin):
                raise ValueError(f"cors_origins: {origin!r} is not an origin (scheme://host[:port], no path, no *)")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> "ServerPolicy":
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS first)")
        return self

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)


class LimitsPolicy(_Section):
    context: int = Field(8192, ge=0)
    max_tokens: int = Field(2048, ge=1)
    max_sequences: int = Field(0, ge=0, le=1024)
    """Sequences decoded together; 0: as many as the memory plan fits at full context, up to
    `memory_plan.AUTO_SEQUENCES`."""
    queue_size: int = Field(64, ge=0)
    memory_fraction: float = Field(0.9, gt=0, le=1)
    kv_cells: int = Field(0, ge=0)
    """KV cells (tokens held by all sequences together) at most; 0 = as many as `memory_fraction` allows."""
    kv_cache: Literal["auto", "q8_0", "f16"] = "auto"
    """Element type of the KV cache. q8_0 (blocks of 32 int8 values and a scale) holds about twice the tokens of f16
    in the same memory, for a rounding of the cached keys and values that llama.cpp's perplexity measurements put at
    noise level; f16 keeps them exactly as computed. Which decodes faster depends on the model and the CPU (q8_0 won
    by 28% on the synthetic test model here once, f16 by 70% on Gemma 3 270M before its sliding window was kept
    short): "auto" times both at the model's first start (`runtime.models.calibration`), and keeps f16 with flash
    attention unless another measures clearly faster."""
    flash_attention: Literal["auto", "on", "off"] = "auto"
    """llama.cpp's flash attention kernel; "auto" is timed with the KV cache type. A q8_0 V cache needs it."""
    reproducible: Literal["seeded", "seeded-and-greedy"] = "seeded"
    """Which requests answer the same whatever ran before or beside them. A request with a `seed` always does (it
    asked for it). "seeded-and-greedy" extends that to every greedy request (temperature 0) without a seed, at the
    price measured in `scripts/bench-serve`: a lone stream decodes a second, throwaway row per step (about half the
    speed of one stream on Gemma 3 270M here) and each prompt chunk takes a step of its own."""

    @model_validator(mode="after")
    def _kv_cells_hold_a_sequence(self) -> "LimitsPolicy":
        if self.kv_cells and self.context and self.kv_cells < self.context:
            raise ValueError(f"kv_cells ({self.kv_cells}) must hold at least one full context ({self.context} tokens)")
        return self


class AuditPolicy(_Section):
    log_content: bool = False
    retention_days: int = Field(365, ge=1)
    checkpoint_every_records: int = Field(1000, ge=1)
    checkpoint_every_seconds: float = Field(60, gt=0)
    group_commit_records: int = Field(64, ge=1)
    group_commit_ms: float = Field(5, ge=0)
    max_unsigned_records: int = Field(2000, ge=1)
    """Records a checkpoint may trail by (the live tail) before verify fails and a writer refuses to sign over them:
    bounds what someone could rewrite unseen after deleting the newest checkpoints."""
    max_unsigned_seconds: float = Field(300, gt=0)
    """… and the time the tail may span since the last checkpoint stopped covering the log (first to last record)."""
    recovery_retry_seconds: float = Field(1, gt=0)
    """How often a log that failed to write (disk full) tries again; requests are refused (503) meanwhile."""

    @model_validator(mode="after")
    def _tail_bound_leaves_room_for_checkpoints(self) -> "AuditPolicy":
        # A healthy writer trails by up to one checkpoint interval plus one group: the bound must leave that room.
        if self.max_unsigned_records < self.checkpoint_every_records + self.group_commit_records:
            raise ValueError(
                f"max_unsigned_records ({self.max_unsigned_records}) must be at least checkpoint_every_records + "
                f"group_commit_records ({self.checkpoint_every_records + self.group_commit_records})"
            )
        if self.max_unsigned_seconds < 2 * self.checkpoint_every_seconds:
            raise ValueError(
                f"max_unsigned_seconds ({self.max_unsigned_seconds}) must be at least twice checkpoint_every_seconds"
            )
        return self


DNS_PORT = 53
DEFAULT_LOCAL_NAMES: tuple[tuple[str, tuple[str, ...]], ...] = (("localhost", ("127.0.0.1", "::1")),)
_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


class EgressPolicy(_Section):
    allow: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    allow_ports: tuple[int, ...] = (8080,)
    """Narrows `allow` to these ports (empty = any port but DNS's 53): loopback also hosts other services (databases,
    agents, a stub resolver that forwards upstream). The default is the server's own port and nothing else."""
    local_names: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_LOCAL_NAMES
    """The only names the process may resolve, with their addresses (TOML: `{ localhost = ["127.0.0.1", "::1"] }`).
    The unit's /etc/hosts is rendered from them and it gets no resolver: any other name would be a DNS query."""
    peers: tuple[str, ...] = ()
    """Single hosts reachable on exactly the ports named (`10.0.0.11:8443`, `[fd00::2]:8443`, `10.0.0.12:10002-10100`),
    outside `allow` x `allow_ports`: the gateway adds its engines from `[mesh]`/`[gateway]`, a Ray node its peers."""

    @field_validator("peers")
    @classmethod
    def _peers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from sealbox.runtime.egress.peers import PeerPorts

        for item in value:
            PeerPorts.parse(item)
        return value

    @field_validator("allow_ports")
    @classmethod
    def _ports(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        for port in value:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is outside 1..65535")
        if len(set(value)) != len(value):
            raise ValueError("a port is listed twice")
        return value

    @field_validator("allow")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            ipaddress.ip_network(item, strict=False)
        return value

    @field_validator("local_names", mode="before")
    @classmethod
    def _local_names(cls, value: object) -> object:
        items = value.items() if isinstance(value, dict) else value
        checked: list[tuple[str, tuple[str, ...]]] = []
        for item in items:
            name, addresses = item
            if not isinstance(name, str) or not _HOST_NAME.fullmatch(name):
                raise ValueError(f"local name {name!r} is not a plain host name")
            if isinstance(addresses, str) or not addresses:
                raise ValueError(f"local name {name!r} needs a list of one or more addresses")
            for address in addresses:
                ipaddress.ip_address(address)
            checked.append((name.lower(), tuple(str(a) for a in addresses)))
        if len({name for name, _ in checked}) != len(checked):
            raise ValueError("a local name is listed twice")
        return tuple(checked)

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(item, strict=False) for item in self.allow]

    def local_name_set(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.local_names)


class ServicePolicy(_Section):
    user: str = "sealbox"
    client_networks: tuple[str, ...] = ()
    gpu_devices: tuple[str, ...] = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm")

    @field_validator("client_networks")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            ipaddress.ip_network(item, strict=False)
        return value


class ReleasesPolicy(_Section):
    keep: int = Field(3, ge=1)


class EngineHostPolicy(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    url: str = Field(pattern=r"^https://[^/?#@]+$")
    """`https://HOST:PORT` of the engine's `sealbox serve`; never plain HTTP between hosts."""
    fingerprint: str = Field("", pattern=r"^(|sha256:[0-9a-f]{64})$")
    """sha256 of the engine's certificate (DER); when set, an engine presenting another certificate is refused."""
    api_key_file: str = ""
    """File holding the API key the gateway presents to this engine (a key of the engine host's own key store)."""


class GatewayPolicy(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8090, ge=1, le=65535)
    tls_cert: str = ""
    tls_key: str = ""
    """The gateway's certificate for its own clients; both or neither."""
    client_cert: str = ""
    client_key: str = ""
    """The certificate the gateway presents to the engines (mutual TLS)."""
    engine_ca: str = ""
    """CA file the engines' certificates must chain to."""
    engines: tuple[EngineHostPolicy, ...] = ()
    max_in_flight_per_principal: int = Field(32, ge=1)
    """Requests one principal may have in flight through the gateway; past it, 429: no key starves the others."""
    health_interval_s: float = Field(2.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    prefix_affinity_entries: int = Field(10000, ge=0)
    """Conversations remembered for routing to the engine that holds their cached prefix (0 = no affinity)."""

    @model_validator(mode="after")
    def _consistent(self) -> "GatewayPolicy":
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be set together")
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("client_cert and client_key must be set together")
        names = [engine.name for engine in self.engines]
        if len(set(names)) != len(names):
            raise ValueError(f"two engine hosts share a name: {names}")
        return self


MESH_CA_FILE, MESH_CERT_FILE, MESH_KEY_FILE = "mesh-ca.crt", "host.crt", "host.key"


class MeshHostPolicy(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    role: Literal["gateway", "engine"]
    address: str
    """The host's IP address on the isolated network: the IP SAN of its certificate and what the walls let through."""
    port: int = Field(ge=1, le=65535)
    """The port it serves the mesh on (an engine's `sealbox serve`, the gateway's API)."""

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return str(ipaddress.ip_address(value))

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"https://{host}:{self.port}"


class MeshPolicy(_Section):
    """The hosts of one gateway and its engines, and the CA that signs their mutual-TLS certificates."""

    ca_sha256: str = Field("", pattern=r"^(|sha256:[0-9a-f]{64})$")
    """sha256 of the mesh CA's certificate (DER), written by `sealbox keys mesh create`: a key package whose CA is
    not this one is refused at install, so the pin travels signed in the bundle and the CA's key never does."""
    key_dir: str = ""
    """Where each host's certificate, key and CA certificate are installed (`host.crt`, `host.key`, `mesh-ca.crt`)."""
    hosts: tuple[MeshHostPolicy, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> "MeshPolicy":
        if not self.hosts:
            return self
        if not self.key_dir.startswith("/"):
            raise ValueError("mesh.key_dir must be an absolute path when mesh.hosts are named")
        names = [host.name for host in self.hosts]
        if len(set(names)) != len(names):
            raise ValueError(f"two mesh hosts share a name: {names}")
        if len({host.address for host in self.hosts}) != len(self.hosts):
            raise ValueError("two mesh hosts share an address")
        if [host.role for host in self.hosts].count("gateway") != 1:
            raise ValueError("the mesh names exactly one gateway host")
        return self

    def host(self, name: str) -> MeshHostPolicy | None:
        return next((host for host in self.hosts if host.name == name), None)

    def path(self, file: str) -> str:
        return f"{self.key_dir.rstrip('/')}/{file}"

    def tls_paths(self) -> dict[str, dict[str, str]]:
        """The policy fields that point at the installed mesh files (filled when left empty, refused when not these)."""
        ca, cert, key = self.path(MESH_CA_FILE), self.path(MESH_CERT_FILE), self.path(MESH_KEY_FILE)
        return {"server": {"tls_cert": cert, "tls_key": key, "tls_client_ca": ca},
                "gateway": {"client_cert": cert, "client_key": key, "engine_ca": ca}}  # fmt: skip


class VllmPolicy(_Section):
    """vLLM as a supervised child engine (GPU clusters): rendered into a launch command, environment and unit."""

    model_dir: str = ""
    """Directory of the model's safetensors inside the release (relative to the release directory)."""
    served_name: str = Field("", pattern=r"^[A-Za-z0-9_.:-]{0,128}$")
    port: int = Field(8000, ge=1, le=65535)
    """Loopback port of the child's OpenAI API (the sealbox front or gateway talks to it; nothing else can)."""
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    pipeline_parallel_size: int = Field(1, ge=1, le=64)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int = Field(0, ge=0)
    max_num_seqs: int = Field(256, ge=1, le=65536)
    """Sequences vLLM batches at once: what the front reports as the engine's capacity (beyond it, 429)."""
    restart_backoff_s: float = Field(1.0, gt=0, le=300)
    restart_backoff_max_s: float = Field(60.0, gt=0, le=3600)
    """A child that dies is started again after restart_backoff_s, doubled after each start that never became
    ready, up to restart_backoff_max_s."""
    node_ip: str = ""
    """This node's address on the cluster network (Ray binds there); empty = single node, no Ray cluster."""
    ray_head: str = ""
    """`IP:PORT` of the Ray head; equal to this node's `node_ip:ray_port` on the head itself."""
    ray_peers: tuple[str, ...] = ()
    """Addresses of the other nodes of the Ray cluster: the only hosts the unit and nftables rules let in and out."""
    ray_port: int = Field(6379, ge=1, le=65535)
    ray_node_manager_port: int = Field(6380, ge=1, le=65535)
    ray_object_manager_port: int = Field(6381, ge=1, le=65535)
    ray_min_worker_port: int = Field(10002, ge=1, le=65535)
    ray_max_worker_port: int = Field(10100, ge=1, le=65535)

    @field_validator("ray_head")
    @classmethod
    def _head(cls, value: str) -> str:
        """IP:PORT ([IPv6]:PORT): it is written into `ray start`'s command line and the walls."""
        if value:
            address, _, port = value.rpartition(":")
            ipaddress.ip_address(address.removeprefix("[").removesuffix("]") if ":" in address else address)
            if not port.isdigit() or not 1 <= int(port) <= 65535 or (":" in address) != address.startswith("["):
                raise ValueError(f"ray_head {value!r} is not IP:PORT")
        return value

    @field_validator("ray_peers")
    @classmethod
    def _peers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            ipaddress.ip_address(item)
        return value

    @model_validator(mode="after")
    def _cluster(self) -> "VllmPolicy":
        if self.node_ip:
            ipaddress.ip_address(self.node_ip)
        if (self.ray_peers or self.ray_head) and not self.node_ip:
            raise ValueError("a Ray cluster (ray_head, ray_peers) needs this node's node_ip")
        if self.ray_min_worker_port > self.ray_max_worker_port:
            raise ValueError("ray_min_worker_port is above ray_max_worker_port")
        return self

    @property
    def multi_node(self) -> bool:
        return bool(self.node_ip)


class Policy(_Section):
    server: ServerPolicy = ServerPolicy()
    limits: LimitsPolicy = LimitsPolicy()
    audit: AuditPolicy = AuditPolicy()
    egress: EgressPolicy = EgressPolicy()
    service: ServicePolicy = ServicePolicy()
    releases: ReleasesPolicy = ReleasesPolicy()
    gateway: GatewayPolicy = GatewayPolicy()
    vllm: VllmPolicy = VllmPolicy()
    mesh: MeshPolicy = MeshPolicy()

    @model_validator(mode="before")
    @classmethod
    def _mesh_paths_by_default(cls, data: object) -> object:
        """With `[mesh] hosts`, the TLS paths of `[server]` and `[gateway]` default to the installed mesh files."""
        mesh = data.get("mesh") if isinstance(data, dict) else None
        if not isinstance(mesh, dict) or not mesh.get("hosts") or not isinstance(mesh.get("key_dir"), str):
            return data
        paths = MeshPolicy.model_construct(key_dir=mesh["key_dir"]).tls_paths()
        data = dict(data)
        for section, fields in paths.items():
            given = data.get(section, {})
            if isinstance(given, dict):
                data[section] = {**{k: v for k, v in fields.items() if not given.get(k)}, **given}
        return data

    @model_validator(mode="after")
    def _mesh_consistent(self) -> "Policy":
        if not self.mesh.hosts:
            return self
        for section, fields in self.mesh.tls_paths().items():
            for name, path in fields.items():
                if getattr(getattr(self, section), name) != path:
                    raise ValueError(f"{section}.{name} must be {path} (the mesh's installed file) or left empty")
        engines = {host.name: host for host in self.mesh.hosts if host.role == "engine"}
        for engine in self.gateway.engines:
            if engine.name not in engines or engines[engine.name].url != engine.url:
                raise ValueError(f"gateway.engines {engine.name} ({engine.url}) is not a mesh engine host at that URL")
        return self

    @model_validator(mode="after")
    def _vllm_fits_the_walls(self) -> "Policy":
        if not self.vllm.model_dir:
            return self
        # The front reaches its vLLM child on loopback; the guard, the unit and the nftables rules all read the
        # loopback ports from egress.allow_ports, so the child's port must be listed there, not opened on the side.
        if self.egress.allow_ports and self.vllm.port not in self.egress.allow_ports:
            raise ValueError(f"egress.allow_ports must list vllm.port ({self.vllm.port}): the sealbox front reaches "
                             "its vLLM child there")  # fmt: skip
        # The child runs inside sealbox's unit, which opens only service.gpu_devices (DevicePolicy=closed).
        nodes = 1 + len(self.vllm.ray_peers)
        needed = -(-self.vllm.tensor_parallel_size * self.vllm.pipeline_parallel_size // nodes)
        gpus = [d for d in self.service.gpu_devices if re.fullmatch(r"/dev/nvidia\d+", d)]
        if len(gpus) < needed:
            raise ValueError(f"service.gpu_devices opens {len(gpus)} GPU(s) (/dev/nvidiaN) to the unit; vLLM's "
                             f"parallelism needs {needed} on this node")  # fmt: skip
        return self

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<policy>") -> "Policy":
        """Parse and validate; raises PolicyError naming the source and the field at fault."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{source}: not valid TOML: {exc}") from exc
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise PolicyError(f"{source}: {where}: {first['msg']}") from exc

    @classmethod
    def load(cls, path: Path) -> "Policy":
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read policy: {exc.strerror}") from exc
        return cls.from_toml(text, source=str(path))

    @classmethod
    def default(cls) -> "Policy":
        return cls.from_toml(default_policy_text(), source="policies/default.toml")

    def digest(self) -> str:
        """sha256 of the validated settings: recorded at server start so the audit log names the config in force."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def default_policy_text() -> str:
    return resources.files("sealbox.policies").joinpath("default.toml").read_text(encoding="utf-8")
