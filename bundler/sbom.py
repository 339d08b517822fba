"""The bundle's CycloneDX SBOM: every wheel, model, policy and file it carries, by digest, with license and provenance.

An auditor on the isolated side reads it with any CycloneDX tool: wheels are `library` components with their
`pkg:pypi/name@version` purl, models are `machine-learning-model` components whose GGUF facts are properties
(`sealbox:gguf:<fact>`), policies and other files are `file` components. The bundle itself is the root component and
depends on each of them.

The same artifacts give the same bytes, so a re-run of an interrupted create reuses the SBOM blob like any other:
the serial number is a UUIDv5 of the bundle's name, version and the (path, sha256) of every artifact; bom-refs are
the bundle paths (the library would draw random ones); keys are sorted; the timestamp is the bundle's creation time
when the caller gives it (`created`) and is left out otherwise, never read from the clock.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import PurePosixPath
from typing import Any

from sealbox.bundler.sources import Artifact, model_license

SPEC_VERSION = "1.6"
PROPERTY_PREFIX = "sealbox:"
SERIAL_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/sealbox/sealbox/sbom")
"""Fixed: serial numbers are UUIDv5 names in it, so equal bundles get equal serials."""
_DESCRIBED = frozenset({"sha256", "size"})  # stated as the hash and a property, not repeated as meta
_HASH_CHUNK = 1 << 20


def build_sbom(
    artifacts: Sequence[Artifact], *, bundle_name: str, version: int, created: datetime | None = None
) -> bytes:
    """CycloneDX 1.6 JSON describing `artifacts` as the contents of bundle `bundle_name` version `version`.

    Each artifact's `meta["sha256"]` (and `size`) is used when present, as `create` gives them; otherwise the file
    is hashed here.

    Raises:
        OSError: an artifact without a given sha256 could not be read.
    """
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6

    digests = {artifact.path: _sha256(artifact) for artifact in artifacts}
    root = Component(
        type=ComponentType.APPLICATION,
        name=bundle_name,
        version=str(version),
        bom_ref=f"bundle:{bundle_name}@{version}",
        description="sealbox bundle: signed offline models, wheels and policy",
    )
    tool = Component(type=ComponentType.APPLICATION, name="sealbox", version=_sealbox_version(), bom_ref="tool:sealbox")
    meta = BomMetaData(component=root)
    # The library stamps the clock when given no time; None leaves the (optional) field out.
    stamp = created.astimezone(timezone.utc).replace(microsecond=0) if created else None
    meta.timestamp = stamp  # type: ignore[assignment]
    meta.tools.components.add(tool)
    components = [_component(artifact, digests[artifact.path]) for artifact in artifacts]
    bom = Bom(components=components, metadata=meta, serial_number=_serial(bundle_name, version, digests))
    bom.register_dependency(root, components)
    document = json.loads(JsonV1Dot6(bom).output_as_string())
    return (json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _component(artifact: Artifact, sha256: str) -> Any:
    from cyclonedx.model import HashAlgorithm, HashType
    from cyclonedx.model.component import Component, ComponentType
    from packageurl import PackageURL

    meta = dict(artifact.meta)
    properties = {"path": artifact.path, "provenance": artifact.provenance, "role": artifact.role}
    if "size" in meta:
        properties["size"] = meta["size"]
    common: dict[str, Any] = {
        "bom_ref": artifact.path,
        "hashes": [HashType(alg=HashAlgorithm.SHA_256, content=sha256)],
    }
    if artifact.role == "wheel":
        name, version = str(meta.pop("name", "")), str(meta.pop("version", ""))
        purl = PackageURL(type="pypi", name=_pypi_purl_name(name), version=version) if name and version else None
        return Component(
            type=ComponentType.LIBRARY,
            name=name or PurePosixPath(artifact.path).name,
            version=version or None,
            purl=purl,
            licenses=_licenses(meta.pop("license", None)),
            properties=_properties(properties, meta),
            **common,
        )
    if artifact.role == "model":
        repo, commit = meta.get("hf_repo"), meta.get("hf_commit")
        purl = None
        if isinstance(repo, str) and "/" in repo and isinstance(commit, str):
            owner, name = repo.split("/", 1)
            purl = PackageURL(type="huggingface", namespace=owner, name=name, version=commit)
        kind = "safetensors" if meta.get("format") == "safetensors" else "gguf"  # a vLLM model directory's file
        facts = {
            f"{kind}:{key}": value
            for key, value in meta.items()
            if not key.startswith(("hf_", "ollama_")) and key not in _DESCRIBED
        }
        hub = {f"hf:{key.removeprefix('hf_')}": value for key, value in meta.items() if key.startswith("hf_")}
        # The license text is the license's (below); template and parameters are properties, readable as they are.
        ollama = {
            f"ollama:{key.removeprefix('ollama_')}": value
            for key, value in meta.items()
            if key.startswith("ollama_") and key != "ollama_license"
        }
        return Component(
            type=ComponentType.MACHINE_LEARNING_MODEL,
            name=PurePosixPath(artifact.path).name,
            version=commit if isinstance(commit, str) else None,
            purl=purl,
            licenses=_model_licenses(meta),
            external_references=_origin(artifact.provenance),
            properties=_properties(properties, {**facts, **hub, **ollama}),
            **common,
        )
    return Component(
        type=ComponentType.FILE,
        name=artifact.path,
        properties=_properties(properties, meta),
        **common,
    )


def _model_licenses(meta: dict[str, Any]) -> list[Any]:
    """The model's license; when the model carries its license text (an Ollama license layer), the text goes with it."""
    licenses = _licenses(model_license(meta))
    text = meta.get("ollama_license")
    if isinstance(text, str) and text.strip():
        from cyclonedx.model import AttachedText
        from cyclonedx.model.license import DisjunctiveLicense

        for item in licenses:
            if isinstance(item, DisjunctiveLicense):
                item.text = AttachedText(content=text)
    return licenses


def _origin(provenance: str) -> list[Any]:
    """Where the model's bytes came from, as a `distribution` reference: `hf://…@commit`, `ollama://…@sha256:…`, or
    the `file://` path it was read from on the connected host."""
    from cyclonedx.model import ExternalReference, ExternalReferenceType, XsUri

    if not provenance:
        return []
    url = provenance if "://" in provenance else PurePosixPath(provenance).as_uri() if provenance.startswith("/") else None
    if url is None:
        return []
    return [ExternalReference(type=ExternalReferenceType.DISTRIBUTION, url=XsUri(url), comment="origin of the model's bytes")]


def _pypi_purl_name(name: str) -> str:
    # The purl spec for pypi: lowercase, '_' replaced by '-' (packaging's canonical name does both and more).
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def _licenses(value: object) -> list[Any]:
    """One license from what the wheel or model states: an SPDX id, an SPDX expression, or a plain name."""
    if not isinstance(value, str) or not value.strip():
        return []
    from cyclonedx.contrib.license.factories import LicenseFactory

    return [LicenseFactory().make_from_string(value.strip())]


def _properties(first: dict[str, Any], rest: dict[str, Any]) -> list[Any]:
    from cyclonedx.model import Property

    merged = {**first, **{key: value for key, value in rest.items() if key not in _DESCRIBED}}
    return [
        Property(name=f"{PROPERTY_PREFIX}{key}", value=_text(value))
        for key, value in sorted(merged.items())
        if value is not None and value != ""
    ]


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def _serial(bundle_name: str, version: int, digests: dict[str, str]) -> uuid.UUID:
    content = json.dumps([bundle_name, version, sorted(digests.items())], separators=(",", ":"))
    return uuid.uuid5(SERIAL_NAMESPACE, content)


def _sha256(artifact: Artifact) -> str:
    given = artifact.meta.get("sha256")
    if isinstance(given, str):
        return given
    digest = hashlib.sha256()
    with artifact.file.open("rb") as stream:
        for chunk in iter(lambda: stream.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sealbox_version() -> str:
    try:
        return metadata.version("sealbox")
    except metadata.PackageNotFoundError:
        return "unknown"
