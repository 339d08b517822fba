"""A real model's license and origin travel with it: Gemma 3 270M (its GGUF header says `gemma`) into the signed
manifest and the CycloneDX SBOM, with Gemma's terms of use carried beside it."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from sealbox.bundler.cli.bundle import bundle_app
from sealbox.bundler.manifest import BLOB_DIR, Manifest
from tests.install_support import make_keys
from tests.real_model import GEMMA_SHA256, gemma_model, gemma_terms  # noqa: F401 - gemma_model is a fixture

app = typer.Typer()
app.add_typer(bundle_app, name="bundle")


def test_gemma_bundle_states_its_license_and_origin_in_the_manifest_and_the_sbom(
    tmp_path: Path, gemma_model: Path  # noqa: F811
) -> None:
    keys = make_keys(tmp_path / "keys", "alice")
    out = tmp_path / "bundle"
    args = ["bundle", "create", "--name", "gemma", "--version", "1", "--out", str(out), "--sign-key",
            str(keys / "alice.key"), "--model", str(gemma_model), "--file", str(gemma_terms()), "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = Manifest.from_bytes(base64.b64decode(json.loads((out / "manifest.json").read_bytes())["payload"]))
    [model] = manifest.entries("model")
    assert (model.sha256, model.meta["license"], model.meta["architecture"]) == (GEMMA_SHA256, "gemma", "gemma3")
    assert model.provenance == str(gemma_model)
    assert [entry.path for entry in manifest.entries("file")] == ["files/GEMMA_TERMS.html"]
    sbom = json.loads((out / BLOB_DIR / manifest.entries("sbom")[0].sha256).read_bytes())
    [component] = [c for c in sbom["components"] if c["type"] == "machine-learning-model"]
    assert component["licenses"] == [{"license": {"name": "gemma"}}]
    assert component["externalReferences"] == [
        {"type": "distribution", "url": gemma_model.as_uri(), "comment": "origin of the model's bytes"}
    ]
