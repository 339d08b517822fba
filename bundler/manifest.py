"""The bundle manifest: what a bundle holds, for which target, until when. One class per object, canonical JSON.

Each class reads itself with `from_dict` (raising `FormatError` naming the field) and writes itself with `to_dict`;
fields this version does not know are kept, so a newer manifest round-trips through an older tool unchanged.
The manifest is signed as bytes (`canonical_bytes`), so the encoding only needs to be deterministic, not clever:
sorted keys, no whitespace, UTF-8.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, get_args

from sealbox.bundler.errors import FormatError
from sealbox.runtime.strict_json import DuplicateKeyError, loads_unique

FORMAT = "sealbox-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
BLOB_DIR = "blobs/sha256"

Role = Literal["model", "wheel", "policy", "sbom", "file", "eval"]
ROLES: frozenset[str] = frozenset(get_args(Role))

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _take(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """Pop a required field of a given JSON type, or raise FormatError naming it."""
    if key not in data:
        raise FormatError(f"manifest: {where}.{key} is missing")
    value = data.pop(key)
    # bool is an int in Python; a JSON `true` is never a valid size or version.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise FormatError(f"manifest: {where}.{key} has the wrong type ({type(value).__name__})")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _digest(data: dict[str, Any], key: str, where: str) -> str:
    # Digests become file names: anything but 64 lowercase hex would let a manifest name an arbitrary path.
    value = _take(data, key, str, where)
    if not _HEX64.fullmatch(value):
        raise FormatError(f"manifest: {where}.{key} is not a lowercase hex sha256: {value[:80]!r}")
    return value


def _size(data: dict[str, Any], key: str, where: str) -> int:
    value = _take(data, key, int, where)
    if value < 0:
        raise FormatError(f"manifest: {where}.{key} is negative")
    return value


def format_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str, where: str) -> datetime:
    try:
        moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError as exc:
        raise FormatError(f"manifest: {where} is not a UTC time like 2030-01-31T12:00:00Z: {text!r}") from exc
    return moment.replace(tzinfo=timezone.utc)


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON: sorted keys, no insignificant whitespace, UTF-8, no NaN/Infinity."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


@dataclass(frozen=True)
class Part:
    """One file of a blob on the medium: its exact length and sha256, so a bad sector is named to the part."""

    size: int
    sha256: str
    unrecognized: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Part:
        data = dict(data)
        return cls(size=_size(data, "size", where), sha256=_digest(data, "sha256", where), unrecognized=data)

    def to_dict(self) -> dict[str, Any]:
        return {**self.unrecognized, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Target:
    """The platform the bundle's wheels are for: the isolated host's Python, not this one's."""

    python: str
    """`major.minor`, e.g. `3.11`."""
    implementation: str = "cp"
    abi: str = ""
    """e.g. `cp311`; empty means the implementation's default for `python`."""
    platforms: tuple[str, ...] = ()
    """Wheel platform tags in order of preference, e.g. `manylinux_2_28_x86_64`."""
    accelerator: dict[str, Any] | None = field(default=None, hash=False)
    """What the carried engine is built for: absent for the CPU, else e.g. `{"accelerator": "cuda",
    "cuda_version": "12.9", "cuda_archs": [80, 86, 89, 90], "engine": "llama-cpp-python==0.3.36"}`."""
    unrecognized: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def host(cls) -> Target:
        """This interpreter and platform: the default when no `--python`/`--platform` is given."""
        from packaging import tags

        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        interpreter = tags.interpreter_name()
        abi = f"{interpreter}{sys.version_info.major}{sys.version_info.minor}"
        return cls(python=python, implementation=interpreter, abi=abi, platforms=tuple(tags.platform_tags()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Target:
        data = dict(data)
        where = "target"
        python = _take(data, "python", str, where)
        implementation = _take(data, "implementation", str, where)
        abi = _take(data, "abi", str, where)
        platforms = _take(data, "platforms", list, where)
        if not all(isinstance(item, str) for item in platforms):
            raise FormatError("manifest: target.platforms must be a list of strings")
        accelerator = _take(data, "accelerator", dict, where) if "accelerator" in data else None
        return cls(python, implementation, abi, tuple(platforms), accelerator, data)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.unrecognized,
            "python": self.python,
            "implementation": self.implementation,
            "abi": self.abi,
            "platforms": list(self.platforms),
            **({"accelerator": self.accelerator} if self.accelerator is not None else {}),
        }


@dataclass(frozen=True)
class Base:
    """For a delta bundle: the installed release it builds on, pinned by its manifest digest."""

    name: str
    version: int
    manifest_sha256: str
    unrecognized: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Base:
        data = dict(data)
        return cls(
            name=_take(data, "name", str, "base"),
            version=_size(data, "version", "base"),
            manifest_sha256=_digest(data, "manifest_sha256", "base"),
            unrecognized=data,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.unrecognized, "name": self.name, "version": self.version, "manifest_sha256": self.manifest_sha256}


@dataclass(frozen=True)
class BlobEntry:
    """One logical file of the bundle (a model, a wheel, a policy…) and the content-addressed blob that holds it."""

    role: Role
    path: str
    """Logical POSIX path inside the release, e.g. `models/tiny.gguf`; checked by `verify` to stay inside it."""
    size: int
    sha256: str
    """sha256 of the whole content: the blob's name in `blobs/sha256/` and in the host store."""
    parts: tuple[Part, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    """GGUF facts for models; name, version, license for wheels."""
    provenance: str = ""
    in_base: bool = False
    """Carried by the base release (delta bundle): listed and signed here, but its bytes are not in this bundle."""
    unrecognized: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], index: int) -> BlobEntry:
        data = dict(data)
        where = f"blobs[{index}]"
        role = _take(data, "role", str, where)
        if role not in ROLES:
            raise FormatError(f"manifest: {where}.role {role!r} is not one of {sorted(ROLES)}")
        path = _take(data, "path", str, where)
        size = _size(data, "size", where)
        sha256 = _digest(data, "sha256", where)
        raw_parts = _take(data, "parts", list, where)
        parts = tuple(
            Part.from_dict(item if isinstance(item, dict) else {}, f"{where}.parts[{n}]") for n, item in enumerate(raw_parts)
        )
        meta = _take(data, "meta", dict, where) if "meta" in data else {}
        provenance = _take(data, "provenance", str, where) if "provenance" in data else ""
        in_base = _take(data, "in_base", bool, where) if "in_base" in data else False
        entry = cls(role, path, size, sha256, parts, meta, provenance, in_base, data)  # type: ignore[arg-type]
        entry._check_parts(where)
        return entry

    def _check_parts(self, where: str) -> None:
        if not self.parts:
            raise FormatError(f"manifest: {where} ({self.path}) has no parts")
        if sum(part.size for part in self.parts) != self.size:
            raise FormatError(f"manifest: {where} ({self.path}) parts do not add up to its size {self.size}")
        if len(self.parts) == 1 and self.parts[0].sha256 != self.sha256:
            raise FormatError(f"manifest: {where} ({self.path}) has one part whose sha256 differs from the blob's")
        if len(self.parts) > 1 and any(part.size == 0 for part in self.parts):
            raise FormatError(f"manifest: {where} ({self.path}) has an empty part")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            **self.unrecognized,
            "role": self.role,
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "parts": [part.to_dict() for part in self.parts],
            "meta": self.meta,
            "provenance": self.provenance,
        }
        if self.in_base:
            data["in_base"] = True
        return data

    def part_files(self) -> list[str]:
        """The bundle-relative file of each part: `blobs/sha256/<digest>`, or `<digest>.partNNN` when split."""
        return part_file_names(self.sha256, len(self.parts))


def part_file_names(sha256: str, count: int) -> list[str]:
    if count == 1:
        return [f"{BLOB_DIR}/{sha256}"]
    return [f"{BLOB_DIR}/{sha256}.part{index:03d}" for index in range(count)]


@dataclass(frozen=True)
class Manifest:
    """The signed statement: this name and version, for this target, valid until `expires`, holds exactly these blobs."""

    name: str
    version: int
    created: datetime
    expires: datetime
    target: Target
    blobs: tuple[BlobEntry, ...]
    base: Base | None = None
    format_version: int = FORMAT_VERSION
    unrecognized: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Raises FormatError for another format, another format version, or a field of the wrong shape."""
        if not isinstance(data, dict):
            raise FormatError("manifest: the payload is not a JSON object")
        data = dict(data)
        fmt = data.pop("format", None)
        if fmt != FORMAT:
            raise FormatError(f"manifest: format is {fmt!r}, not {FORMAT!r}")
        format_version = _take(data, "format_version", int, "manifest")
        if format_version != FORMAT_VERSION:
            raise FormatError(f"manifest: format_version {format_version} is not supported (this sealbox reads {FORMAT_VERSION})")
        name = _take(data, "name", str, "manifest")
        if not _NAME.fullmatch(name):
            raise FormatError(f"manifest: name {name!r} must be 1-64 of A-Z a-z 0-9 . _ - and start with a letter or digit")
        version = _size(data, "version", "manifest")
        created = parse_time(_take(data, "created", str, "manifest"), "created")
        expires = parse_time(_take(data, "expires", str, "manifest"), "expires")
        if expires <= created:
            raise FormatError("manifest: expires is not after created")
        target = Target.from_dict(_take(data, "target", dict, "manifest"))
        raw_base = data.pop("base", None)
        if raw_base is not None and not isinstance(raw_base, dict):
            raise FormatError("manifest: base must be an object or null")
        base = Base.from_dict(raw_base) if raw_base is not None else None
        raw_blobs = _take(data, "blobs", list, "manifest")
        blobs = tuple(
            BlobEntry.from_dict(item if isinstance(item, dict) else {}, index) for index, item in enumerate(raw_blobs)
        )
        manifest = cls(name, version, created, expires, target, blobs, base, format_version, data)
        manifest._check_same_digest_same_layout()
        return manifest

    def _check_same_digest_same_layout(self) -> None:
        seen: dict[str, tuple[int, tuple[Part, ...]]] = {}
        for entry in self.blobs:
            layout = (entry.size, entry.parts)
            if seen.setdefault(entry.sha256, layout) != layout:
                raise FormatError(f"manifest: blob {entry.sha256} is listed twice with different parts")

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.unrecognized,
            "format": FORMAT,
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "created": format_time(self.created),
            "expires": format_time(self.expires),
            "target": self.target.to_dict(),
            "base": self.base.to_dict() if self.base else None,
            "blobs": [entry.to_dict() for entry in self.blobs],
        }

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_bytes(cls, payload: bytes) -> Manifest:
        """Parse signed payload bytes; raises FormatError."""
        try:
            data = loads_unique(payload)
        except DuplicateKeyError as exc:
            raise FormatError(f"manifest: the signed payload is ambiguous: {exc}") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"manifest: the signed payload is not JSON: {exc}") from exc
        return cls.from_dict(data)

    def carried(self) -> list[BlobEntry]:
        """Entries whose bytes travel in this bundle (not carried by the base)."""
        return [entry for entry in self.blobs if not entry.in_base]

    def expected_files(self) -> dict[str, tuple[BlobEntry, int]]:
        """Every bundle-relative part file this manifest requires, with its entry and part index (deduplicated by digest)."""
        files: dict[str, tuple[BlobEntry, int]] = {}
        for entry in self.carried():
            for index, name in enumerate(entry.part_files()):
                files.setdefault(name, (entry, index))
        return files

    def entries(self, role: Role) -> list[BlobEntry]:
        return [entry for entry in self.blobs if entry.role == role]


def manifest_digest(payload: bytes) -> str:
    """The digest a delta bundle's `base.manifest_sha256` and the host's release records name a manifest by."""
    return hashlib.sha256(payload).hexdigest()
