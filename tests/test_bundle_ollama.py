"""`bundle create --model ollama://NAME[:TAG]`: a model read from an Ollama store laid out by the test in Ollama's format.

The store is what `ollama pull` leaves: `manifests/registry.ollama.ai/<namespace>/<name>/<tag>` (a JSON image
manifest whose layers name blobs by digest and media type) and `blobs/sha256-<hex>`. The model layer is a real GGUF
file; the template, params and license layers are the small texts Ollama writes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from sealbox.bundler.cli.bundle import bundle_app
from sealbox.bundler.errors import InputError
from sealbox.bundler.keys import generate_key_pair
from sealbox.bundler.manifest import BLOB_DIR, Manifest
from sealbox.bundler.sources.ollama import default_store, parse_ollama_reference, resolve_ollama_model

app = typer.Typer()
app.add_typer(bundle_app, name="bundle")
runner = CliRunner(env={"COLUMNS": "400"})

TEMPLATE = "{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}<|assistant|>"
PARAMS = {"stop": ["<|user|>"], "temperature": 0.7}
LICENSE = "Apache License\nVersion 2.0, January 2004\nhttp://www.apache.org/licenses/\n"


@dataclass
class OllamaStore:
    path: Path

    def blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (self.path / "blobs").mkdir(parents=True, exist_ok=True)
        (self.path / "blobs" / f"sha256-{digest}").write_bytes(data)
        return digest

    def add(self, name: str, tag: str, model: Path, *, namespace: str = "library",
            host: str = "registry.ollama.ai") -> tuple[Path, str]:  # fmt: skip
        """Lay out `name:tag` as `ollama pull` does; returns (manifest path, model blob's hex digest)."""
        model_digest = self.blob(model.read_bytes())
        layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{model_digest}",
                   "size": model.stat().st_size}]  # fmt: skip
        for media_type, text in (
            ("application/vnd.ollama.image.template", TEMPLATE),
            ("application/vnd.ollama.image.params", json.dumps(PARAMS)),
            ("application/vnd.ollama.image.license", LICENSE),
        ):
            data = text.encode()
            layers.append({"mediaType": media_type, "digest": f"sha256:{self.blob(data)}", "size": len(data)})
        config = json.dumps({"model_format": "gguf", "model_family": "llama"}).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": f"sha256:{self.blob(config)}", "size": len(config)},  # fmt: skip
            "layers": layers,
        }
        path = self.path / "manifests" / host / namespace / name / tag
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest))
        return path, model_digest


@pytest.fixture
def store(tmp_path: Path) -> OllamaStore:
    return OllamaStore(tmp_path / "ollama" / "models")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    generate_key_pair("alice", folder, passphrase=None)
    return folder


def create(out: Path, keys: Path, store: OllamaStore, *inputs: str):
    args = ["bundle", "create", "--name", "demo", "--version", "1", "--out", str(out)]
    args += ["--sign-key", str(keys / "alice.key"), "--json", *inputs]
    return runner.invoke(app, args, env={"OLLAMA_MODELS": str(store.path)})


def signed_manifest(bundle: Path) -> Manifest:
    envelope = json.loads((bundle / "manifest.json").read_bytes())
    return Manifest.from_bytes(base64.b64decode(envelope["payload"]))


def test_ollama_reference_defaults_to_the_library_namespace_and_latest_tag() -> None:
    assert parse_ollama_reference("ollama://gemma3").canonical == "ollama://registry.ollama.ai/library/gemma3:latest"
    assert parse_ollama_reference("ollama://gemma3:270m").file_name == "gemma3-270m.gguf"
    other = parse_ollama_reference("ollama://example.org:5000/team/coder:q4")
    assert other.manifest_parts == ("example.org:5000", "team", "coder", "q4")


@pytest.mark.parametrize("ref", ["ollama://../etc:passwd", "ollama://a/b/c/d", "ollama://name:", "ollama://na me",
                                 "ollama://library/..:latest", "ollama://", "ollama://x:../../y"])  # fmt: skip
def test_ollama_reference_that_could_leave_the_store_is_refused(ref: str) -> None:
    with pytest.raises(InputError, match="ollama"):
        parse_ollama_reference(ref)


def test_ollama_store_location_follows_ollama_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    assert default_store() == tmp_path


def test_create_bundles_the_gguf_layer_with_template_params_and_license_as_metadata(
    tmp_path: Path, keys: Path, store: OllamaStore, tiny_model: Path
) -> None:
    _, digest = store.add("tiny", "q8", tiny_model)
    out = tmp_path / "bundle"
    result = create(out, keys, store, "--model", "ollama://tiny:q8")
    assert result.exit_code == 0, result.output
    manifest = signed_manifest(out)
    [model] = manifest.entries("model")
    assert model.path == "models/tiny-q8.gguf"
    assert model.sha256 == digest
    assert (out / BLOB_DIR / digest).read_bytes() == tiny_model.read_bytes()
    assert model.provenance == f"ollama://registry.ollama.ai/library/tiny:q8@sha256:{digest}"
    assert model.meta["ollama_template"] == TEMPLATE
    assert model.meta["ollama_params"] == PARAMS
    assert model.meta["ollama_license"] == LICENSE
    assert model.meta["architecture"] == "llama"  # the GGUF header was read, as for a local model
    sbom = json.loads((out / BLOB_DIR / manifest.entries("sbom")[0].sha256).read_bytes())
    [component] = [c for c in sbom["components"] if c["type"] == "machine-learning-model"]
    [license_] = component["licenses"]
    assert license_["license"]["id"] == "Apache-2.0"  # the GGUF header's statement; the layer's text travels with it
    assert license_["license"]["text"]["content"] == LICENSE
    assert any(ref["url"].startswith("ollama://registry.ollama.ai/library/tiny:q8") for ref in component["externalReferences"])


def test_create_reads_another_namespace_of_another_registry(tmp_path: Path, store: OllamaStore, tiny_model: Path) -> None:
    _, digest = store.add("coder", "latest", tiny_model, namespace="team", host="example.org")
    artifact = resolve_ollama_model("ollama://example.org/team/coder", store=store.path)
    assert artifact.path == "models/coder.gguf"
    assert artifact.expected_sha256 == digest
    assert artifact.file == store.path / "blobs" / f"sha256-{digest}"  # read in place: no copy before packing


def test_create_refuses_a_tag_that_does_not_exist_and_names_the_tags_there(
    tmp_path: Path, keys: Path, store: OllamaStore, tiny_model: Path
) -> None:
    store.add("tiny", "q8", tiny_model)
    store.add("tiny", "f16", tiny_model)
    out = tmp_path / "bundle"
    result = create(out, keys, store, "--model", "ollama://tiny:q4")
    assert result.exit_code == 3, result.output
    assert "no tag 'q4' of tiny" in result.output and "f16, q8" in result.output
    assert not (out / "manifest.json").exists()


def test_create_refuses_a_model_that_is_not_in_the_store(tmp_path: Path, store: OllamaStore, tiny_model: Path) -> None:
    store.add("tiny", "q8", tiny_model)
    with pytest.raises(InputError, match="library/other is not in this store"):
        resolve_ollama_model("ollama://other", store=store.path)


def test_create_refuses_a_missing_model_blob(tmp_path: Path, keys: Path, store: OllamaStore, tiny_model: Path) -> None:
    _, digest = store.add("tiny", "latest", tiny_model)
    (store.path / "blobs" / f"sha256-{digest}").unlink()
    out = tmp_path / "bundle"
    result = create(out, keys, store, "--model", "ollama://tiny")
    assert result.exit_code == 3, result.output
    assert f"sha256-{digest}" in result.output and "is missing from the Ollama store" in result.output
    assert not (out / "manifest.json").exists()


def test_create_refuses_a_model_blob_whose_bytes_do_not_match_its_digest(
    tmp_path: Path, keys: Path, store: OllamaStore, tiny_model: Path
) -> None:
    _, digest = store.add("tiny", "latest", tiny_model)
    blob = store.path / "blobs" / f"sha256-{digest}"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last tensor: the header still reads as GGUF, the size is unchanged
    blob.write_bytes(bytes(data))
    out = tmp_path / "bundle"
    result = create(out, keys, store, "--model", "ollama://tiny")
    assert result.exit_code == 3, result.output
    assert f"not the {digest}" in result.output and "corrupt" in result.output
    assert not (out / "manifest.json").exists()
    assert not [p for p in (out / BLOB_DIR).iterdir() if p.stat().st_size == len(data)]  # the bad bytes did not stay


def test_create_refuses_a_metadata_layer_whose_bytes_do_not_match_its_digest(
    store: OllamaStore, tiny_model: Path
) -> None:
    manifest, _ = store.add("tiny", "latest", tiny_model)
    layer = json.loads(manifest.read_text())["layers"][3]  # the license
    (store.path / "blobs" / f"sha256-{layer['digest'][7:]}").write_text("Proprietary: all rights reserved\n")
    with pytest.raises(InputError, match="license layer .* does not match its digest"):
        resolve_ollama_model("ollama://tiny", store=store.path)


def test_create_refuses_a_fifo_where_the_manifest_belongs(store: OllamaStore, tiny_model: Path) -> None:
    manifest, _ = store.add("tiny", "latest", tiny_model)
    manifest.unlink()
    os.mkfifo(manifest)  # opened non-blocking and refused: a FIFO would otherwise hang the create
    with pytest.raises(InputError, match="not a regular file"):
        resolve_ollama_model("ollama://tiny", store=store.path)


def test_create_refuses_a_symlink_where_the_model_blob_belongs(
    tmp_path: Path, store: OllamaStore, tiny_model: Path
) -> None:
    _, digest = store.add("tiny", "latest", tiny_model)
    blob = store.path / "blobs" / f"sha256-{digest}"
    elsewhere = tmp_path / "elsewhere.gguf"
    shutil.move(blob, elsewhere)
    blob.symlink_to(elsewhere)
    with pytest.raises(InputError, match="not a regular file"):
        resolve_ollama_model("ollama://tiny", store=store.path)


def test_create_refuses_a_store_without_manifests(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no Ollama store"):
        resolve_ollama_model("ollama://tiny", store=tmp_path / "empty")


def test_create_reads_the_store_named_by_ollama_models_option(
    tmp_path: Path, keys: Path, store: OllamaStore, tiny_model: Path
) -> None:
    _, digest = store.add("tiny", "latest", tiny_model)
    out = tmp_path / "bundle"
    args = ["bundle", "create", "--name", "demo", "--version", "1", "--out", str(out), "--sign-key",
            str(keys / "alice.key"), "--model", "ollama://tiny", "--ollama-models", str(store.path), "--json"]  # fmt: skip
    result = runner.invoke(app, args, env={"OLLAMA_MODELS": str(tmp_path / "elsewhere")})
    assert result.exit_code == 0, result.output
    assert signed_manifest(out).entries("model")[0].sha256 == digest
