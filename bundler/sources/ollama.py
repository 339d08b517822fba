"""`ollama://[host/][namespace/]NAME[:TAG]` models, read from a local Ollama store with no download.

Ollama keeps models as an OCI-like image: `manifests/<host>/<namespace>/<name>/<tag>` is a JSON manifest whose layers
name content-addressed blobs `blobs/sha256-<hex>` by media type. The GGUF weights are the layer of media type
`application/vnd.ollama.image.model`; the prompt template, the default parameters and the license are layers of their
own, carried here as the model's metadata so they travel with it.

The blob is packed straight from Ollama's store (one read, one copy into the bundle); its digest is checked by that same
read (`Artifact.expected_sha256`), so a corrupt store is refused without reading the model twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealbox.bundler.errors import InputError
from sealbox.bundler.sources import Artifact

SCHEME = "ollama://"
DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MODELS_ENV = "OLLAMA_MODELS"
DEFAULT_STORES = (Path("~/.ollama/models"), Path("/usr/share/ollama/.ollama/models"))
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
METADATA_MEDIA_TYPES = {
    "application/vnd.ollama.image.template": "ollama_template",
    "application/vnd.ollama.image.params": "ollama_params",
    "application/vnd.ollama.image.license": "ollama_license",
    "application/vnd.ollama.image.system": "ollama_system",
}
MAX_MANIFEST_BYTES = 1 << 20
MAX_METADATA_BYTES = 1 << 20
"""A template, parameter set or license larger than this is not metadata: refused rather than put in the manifest."""
_FORM = "ollama://[host/][namespace/]NAME[:TAG]"
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}(:[0-9]{1,5})?")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class OllamaReference:
    host: str
    namespace: str
    name: str
    tag: str

    @property
    def manifest_parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.name, self.tag)

    @property
    def canonical(self) -> str:
        """The full reference recorded as provenance (before the digest): `ollama://host/namespace/name:tag`."""
        return f"{SCHEME}{self.host}/{self.namespace}/{self.name}:{self.tag}"

    @property
    def file_name(self) -> str:
        """`models/<this>`: the model name clients ask for is its stem (`gemma3`, `gemma3-270m`)."""
        stem = self.name if self.tag == DEFAULT_TAG else f"{self.name}-{self.tag}"
        return f"{stem}.gguf"


def parse_ollama_reference(ref: str) -> OllamaReference:
    """Split `ollama://[host/][namespace/]NAME[:TAG]`, as Ollama does (`library` and `registry.ollama.ai` by default).

    Raises:
        InputError: not of that form, or a part that could step outside the store (`..`, `/`, empty).
    """
    if not ref.startswith(SCHEME):
        raise InputError(f"{ref}: not an ollama:// reference ({_FORM})")
    body = ref[len(SCHEME) :]
    path, colon, tag = body.rpartition(":") if ":" in body.rsplit("/", 1)[-1] else (body, "", "")
    if colon and not tag:
        raise InputError(f"{ref}: empty tag after ':' ({_FORM})")
    parts = path.split("/")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise InputError(f"{ref}: expected {_FORM}")
    host = parts[0] if len(parts) == 3 else DEFAULT_HOST
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    name, tag = parts[-1], tag or DEFAULT_TAG
    if not _HOST.fullmatch(host) or ".." in host:
        raise InputError(f"{ref}: {host!r} is not a registry host name")
    for what, value in (("namespace", namespace), ("model name", name), ("tag", tag)):
        if not _PART.fullmatch(value) or value in (".", ".."):
            raise InputError(f"{ref}: {value!r} is not a valid Ollama {what} (letters, digits, '.', '_', '-')")
    return OllamaReference(host=host, namespace=namespace, name=name, tag=tag)


def default_store() -> Path:
    """`$OLLAMA_MODELS`, else the first of ~/.ollama/models and /usr/share/ollama/.ollama/models that exists."""
    if env := os.environ.get(MODELS_ENV):
        return Path(env).expanduser()
    for candidate in DEFAULT_STORES:
        if candidate.expanduser().is_dir():
            return candidate.expanduser()
    return DEFAULT_STORES[0].expanduser()


def _read_small(path: Path, limit: int, what: str, ref: str) -> bytes:
    """A regular file of at most `limit` bytes, opened without following a symlink or blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise InputError(f"{ref}: {what} {path} does not exist") from exc
    except OSError as exc:
        raise InputError(f"{ref}: cannot open {what} {path}: {exc.strerror}") from exc
    with open(fd, "rb") as stream:
        info = os.fstat(stream.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{ref}: {what} {path} is not a regular file")
        if info.st_size > limit:
            raise InputError(f"{ref}: {what} {path} is {info.st_size} bytes, more than the {limit} allowed")
        return stream.read(limit + 1)[:limit]


def _available_tags(store: Path, parsed: OllamaReference) -> list[str]:
    directory = store.joinpath("manifests", parsed.host, parsed.namespace, parsed.name)
    try:
        return sorted(item.name for item in directory.iterdir() if item.is_file() and not item.is_symlink())
    except OSError:
        return []


def _layer_digest(layer: dict[str, Any], ref: str) -> str:
    digest = layer.get("digest")
    match = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise InputError(f"{ref}: a layer of the Ollama manifest has no valid sha256 digest ({str(digest)[:80]!r})")
    return match.group(1)


def _blob_path(store: Path, hex_digest: str) -> Path:
    return store / "blobs" / f"sha256-{hex_digest}"


def _metadata(store: Path, layer: dict[str, Any], key: str, ref: str) -> Any:
    hex_digest = _layer_digest(layer, ref)
    data = _read_small(_blob_path(store, hex_digest), MAX_METADATA_BYTES, f"the {key.removeprefix('ollama_')} layer", ref)
    if hashlib.sha256(data).hexdigest() != hex_digest:
        raise InputError(f"{ref}: the {key.removeprefix('ollama_')} layer blob sha256-{hex_digest[:12]}… does not match "
                         "its digest (the Ollama store is corrupt; `ollama pull` it again)")  # fmt: skip
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{ref}: the {key.removeprefix('ollama_')} layer is not UTF-8 text") from exc
    if key == "ollama_params":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise InputError(f"{ref}: the params layer is not JSON: {exc}") from exc
    return text


def resolve_ollama_model(ref: str, *, store: Path | None = None) -> Artifact:
    """Resolve `ref` in the Ollama store to its GGUF blob, with its template, parameters and license as metadata.

    Only the manifest and the small metadata layers are read here; the model blob's digest is checked while it is
    packed (`expected_sha256`), and its size and GGUF header now.

    Raises:
        InputError: a malformed reference; no store; an unknown model or tag (the tags that exist are named); a
            manifest that is not Ollama's; a missing blob, one of the wrong size, or one that is not a regular file.
    """
    parsed = parse_ollama_reference(ref)
    store = (store or default_store()).absolute()
    if not (store / "manifests").is_dir():
        raise InputError(f"{ref}: no Ollama store at {store} (no manifests/ directory); set {MODELS_ENV}")
    manifest_path = store.joinpath("manifests", *parsed.manifest_parts)
    if not manifest_path.exists() and not manifest_path.is_symlink():
        tags = _available_tags(store, parsed)
        known = f"; its tags here: {', '.join(tags)}" if tags else f"; {parsed.namespace}/{parsed.name} is not in this store"
        raise InputError(f"{ref}: no tag {parsed.tag!r} of {parsed.name} in the Ollama store {store}{known}")
    raw = _read_small(manifest_path, MAX_MANIFEST_BYTES, "the manifest", ref)
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"{ref}: the Ollama manifest {manifest_path} is not JSON: {exc}") from exc
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
        raise InputError(f"{ref}: {manifest_path} is not an Ollama manifest (no list of layers)")
    models = [layer for layer in layers if layer.get("mediaType") == MODEL_MEDIA_TYPE]
    if len(models) != 1:
        raise InputError(f"{ref}: the manifest has {len(models)} model layers ({MODEL_MEDIA_TYPE}); sealbox needs one")
    model_layer = models[0]
    hex_digest = _layer_digest(model_layer, ref)
    blob = _blob_path(store, hex_digest)
    try:
        info = os.lstat(blob)
    except FileNotFoundError as exc:
        raise InputError(f"{ref}: the model blob {blob} is missing from the Ollama store (`ollama pull` it again)") from exc
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{ref}: the model blob {blob} is not a regular file")
    declared = model_layer.get("size")
    if isinstance(declared, int) and declared != info.st_size:
        raise InputError(f"{ref}: the model blob {blob} is {info.st_size} bytes, the manifest says {declared} "
                         "(an interrupted pull?)")  # fmt: skip
    meta: dict[str, Any] = {"ollama_model": parsed.canonical, "ollama_digest": f"sha256:{hex_digest}"}
    for layer in layers:
        key = METADATA_MEDIA_TYPES.get(str(layer.get("mediaType")))
        if key is not None:
            meta[key] = _metadata(store, layer, key, ref)
    return Artifact(
        role="model",
        path=f"models/{parsed.file_name}",
        file=blob,
        provenance=f"{parsed.canonical}@sha256:{hex_digest}",
        meta=meta,
        expected_sha256=hex_digest,
    )
