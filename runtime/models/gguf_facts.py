"""The facts a GGUF file states about itself, read from its header alone.

Bundles record them, `sealbox plan` and admission size the KV cache from them, and the SBOM lists them. The header is
parsed here, not by llama.cpp or `gguf.GGUFReader`, so that a malformed or hostile file costs one clear exception and
never the process: every length is checked against the file's size before it is trusted.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gguf

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
_MAX_STRING = 64 << 20  # a chat template is a few KiB; anything near this is an attack, not a model

# GGUF value types (gguf.GGUFValueType): fixed-size scalars by struct format.
_SCALARS: dict[int, str] = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

_KV_SIZES = {name: gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]] for name in ("f32", "f16", "bf16", "q8_0", "q4_0")}
KV_TYPE_BYTES: dict[str, float] = {name: size / block for name, (block, size) in _KV_SIZES.items()}
"""Bytes per element of a KV cache type, from gguf's table of block sizes (q8_0: 34 bytes per 32 values)."""
KV_BLOCK: dict[str, int] = {name: block for name, (block, _size) in _KV_SIZES.items()}
"""Values per block: a head's K and V width must be a whole number of blocks."""


class ModelFileError(Exception):
    """A model file cannot be used; the message names the file and what is wrong with it."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


class NotGGUFError(ModelFileError):
    """The file is not a GGUF model, or its header is truncated or malformed."""


@dataclass(frozen=True)
class ModelFacts:
    architecture: str
    name: str
    parameter_count: int
    file_type: str
    """Quantisation of the weights, e.g. `MOSTLY_Q4_K_M`, `ALL_F32`."""
    context_length: int
    block_count: int
    head_count: int
    head_count_kv: int
    embedding_length: int
    head_dim: int
    vocab_size: int
    chat_template_sha256: str | None
    license: str | None
    gguf_version: int
    tensor_count: int
    pooling_type: int | None = None
    """Set by embedding models (llama.cpp's `pooling_type`); None for generative ones."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    tensor_count: int
    metadata: dict[str, Any]
    """Key/value metadata; arrays other than short ones are replaced by their length (`tokenizer.ggml.tokens` → int)."""
    tensors: tuple[tuple[str, tuple[int, ...], int], ...]
    """(name, shape, ggml type) per tensor."""


class _Reader:
    def __init__(self, stream: BinaryIO, size: int, path: Path) -> None:
        self._stream = stream
        self._size = size
        self._path = path

    def take(self, n: int) -> bytes:
        data = self._stream.read(n)
        if len(data) != n:
            raise NotGGUFError(self._path, f"header truncated at byte {self._stream.tell()} of {self._size}")
        return data

    def scalar(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.scalar("Q")
        if length > min(_MAX_STRING, self._size):
            raise NotGGUFError(self._path, f"a string in the header claims {length} bytes")
        raw = self.take(length)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NotGGUFError(self._path, "a string in the header is not UTF-8") from exc

    def value(self, vtype: int, *, keep_array: bool) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = self.scalar("I")
            count = self.scalar("Q")
            if count > self._size:
                raise NotGGUFError(self._path, f"an array in the header claims {count} items")
            if item_type in _SCALARS and not keep_array:
                self.take(count * struct.calcsize(_SCALARS[item_type]))
                return count
            items = [self.value(item_type, keep_array=keep_array) for _ in range(count)]
            return items if keep_array else count
        raise NotGGUFError(self._path, f"unknown metadata value type {vtype}")


_KEPT_ARRAYS = 16  # short arrays (e.g. per-layer head counts) are kept; vocabularies are summarised by length


def read_header(path: Path) -> GGUFHeader:
    """Parse magic, version, metadata and tensor infos. Raises NotGGUFError for anything else."""
    path = Path(path)
    try:
        size = path.stat().st_size
        stream = path.open("rb")
    except OSError as exc:
        raise NotGGUFError(path, f"cannot read: {exc.strerror}") from exc
    with stream:
        reader = _Reader(stream, size, path)
        magic = stream.read(4)
        if magic != GGUF_MAGIC:
            raise NotGGUFError(path, f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        version = reader.scalar("I")
        if version not in SUPPORTED_VERSIONS:
            raise NotGGUFError(path, f"unsupported GGUF version {version}")
        tensor_count = reader.scalar("Q")
        kv_count = reader.scalar("Q")
        if tensor_count > size or kv_count > size:
            raise NotGGUFError(path, "header counts exceed the file size")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = reader.string()
            vtype = reader.scalar("I")
            if vtype == _ARRAY:
                start = stream.tell()
                item_type, count = reader.scalar("I"), reader.scalar("Q")
                stream.seek(start)
                metadata[key] = reader.value(vtype, keep_array=count <= _KEPT_ARRAYS and item_type in _SCALARS)
            else:
                metadata[key] = reader.value(vtype, keep_array=False)
        tensors = []
        data_end = 0
        for _ in range(tensor_count):
            name = reader.string()
            n_dims = reader.scalar("I")
            if n_dims > 8:
                raise NotGGUFError(path, f"tensor {name!r} claims {n_dims} dimensions")
            shape = tuple(reader.scalar("Q") for _ in range(n_dims))
            ggml_type = reader.scalar("I")
            offset = reader.scalar("Q")
            tensors.append((name, shape, ggml_type))
            data_end = max(data_end, offset + _tensor_bytes(path, name, shape, ggml_type))
        alignment = int(metadata.get("general.alignment", 32))
        header_end = stream.tell()
        data_start = header_end + (-header_end % alignment) if alignment > 0 else header_end
        if data_start + data_end > size:
            raise NotGGUFError(path, f"tensor data truncated: needs {data_start + data_end} bytes, file has {size}")
    return GGUFHeader(version=version, tensor_count=tensor_count, metadata=metadata, tensors=tuple(tensors))


@dataclass(frozen=True)
class ModelFile:
    """A GGUF file's header, read once, and what it says: what a server needs to start the model (its facts, its
    chat template, its tensors' sizes), so that no step reads the header again."""

    path: Path
    header: GGUFHeader
    facts: ModelFacts

    @property
    def chat_template(self) -> str | None:
        template = self.header.metadata.get("tokenizer.chat_template")
        return template if isinstance(template, str) else None

    def tensor_sizes(self) -> list[tuple[str, int]]:
        """(name, bytes) of every tensor, from its shape and type."""
        return [(name, _tensor_bytes(self.path, name, shape, kind)) for name, shape, kind in self.header.tensors]


def read_model_file(path: Path) -> ModelFile:
    """Read the header once; raises NotGGUFError naming the file and the fault."""
    header = read_header(path)
    return ModelFile(Path(path), header, facts_from_header(path, header))


def read_facts(path: Path) -> ModelFacts:
    """The model's facts from its header; raises NotGGUFError naming the file and the fault."""
    return facts_from_header(path, read_header(path))


def facts_from_header(path: Path, header: GGUFHeader) -> ModelFacts:
    """The facts a parsed header states; raises NotGGUFError when it lacks the architecture."""
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise NotGGUFError(path, "GGUF header has no general.architecture")

    def arch_int(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer values: the largest bounds memory
            value = max(value) if value else default
        return int(value)

    head_count = arch_int("attention.head_count")
    embedding = arch_int("embedding_length")
    head_dim = arch_int("attention.key_length") or (embedding // head_count if head_count else 0)
    template = meta.get("tokenizer.chat_template")
    params = sum(_product(shape) for _, shape, _ in header.tensors)
    file_type = meta.get("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(int(file_type)).name if file_type is not None else "UNKNOWN"
    except ValueError:
        file_type_name = f"UNKNOWN({file_type})"
    tokens = meta.get("tokenizer.ggml.tokens", 0)
    pooling = meta.get(f"{arch}.pooling_type")
    return ModelFacts(
        architecture=arch,
        name=str(meta.get("general.name", Path(path).stem)),
        parameter_count=params,
        file_type=file_type_name,
        context_length=arch_int("context_length"),
        block_count=arch_int("block_count"),
        head_count=head_count,
        head_count_kv=arch_int("attention.head_count_kv", head_count),
        embedding_length=embedding,
        head_dim=head_dim,
        vocab_size=len(tokens) if isinstance(tokens, list) else int(tokens),
        chat_template_sha256=hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None,
        license=str(meta["general.license"]) if "general.license" in meta else None,
        gguf_version=header.version,
        tensor_count=header.tensor_count,
        pooling_type=int(pooling) if pooling is not None else None,
    )


def kv_bytes_per_token(facts: ModelFacts, type_k: str = "f16", type_v: str = "f16") -> int:
    """KV-cache bytes one token occupies in one sequence: K and V, every layer, every KV head."""
    per_layer_elements = facts.head_count_kv * facts.head_dim
    return int(facts.block_count * per_layer_elements * (KV_TYPE_BYTES[type_k] + KV_TYPE_BYTES[type_v]))


def _tensor_bytes(path: Path, name: str, shape: tuple[int, ...], ggml_type: int) -> int:
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError) as exc:
        raise NotGGUFError(path, f"tensor {name!r} has unknown type {ggml_type}") from exc
    return _product(shape) // block * type_size


def _product(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total
