"""Where `bundle create` gets wheels and hf:// models, and the SBOM that lists them: real pip, real wheels, a real hub.

pip runs offline here: no config file, no index, only the test's wheelhouses (`offline_pip`). The test projects build
with a ten-line PEP 517 backend inside each project, so `pip wheel` needs nothing from any index either. The "hub" is
a stand-in of the Hugging Face API on 127.0.0.1 that answers what `huggingface_hub` asks: the model info of a revision
(its commit and files) and `HEAD`/`GET` of a file at a revision, with `X-Repo-Commit`, `ETag`, `Content-Length` and the
`X-Error-Code` the client turns into its typed errors.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import tarfile
from collections.abc import Iterator
from datetime import datetime, timezone
from email.parser import Parser
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from hf_hub_support import Hub, serving
from sealbox.bundler.cli.bundle import bundle_app
from sealbox.bundler.errors import InputError
from sealbox.bundler.keys import generate_key_pair
from sealbox.bundler.manifest import BLOB_DIR, Manifest, Target
from sealbox.bundler.sbom import build_sbom
from sealbox.bundler.sources import Artifact
from sealbox.bundler.sources.huggingface import parse_hf_reference, resolve_hf_model
from sealbox.bundler.sources.wheels import collect_wheels, copy_source_tree, host_stands_in_for, wheel_license

app = typer.Typer()
app.add_typer(bundle_app, name="bundle")
runner = CliRunner(env={"COLUMNS": "400"})
REPO = Path(__file__).resolve().parents[1]
HOST_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
OTHER_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor - 1}"

BACKEND = r'''"""A PEP 517 backend of a few lines: builds this project's wheel from project.json, with no package index."""
import base64, hashlib, json, pathlib, zipfile


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    project = json.loads(pathlib.Path("project.json").read_text())
    dist, version = project["name"].replace("-", "_"), project["version"]
    info = f"{dist}-{version}.dist-info"
    headers = ["Metadata-Version: 2.4", f"Name: {project['name']}", f"Version: {version}", *project["headers"]]
    files = {
        f"{dist}/__init__.py": b"VALUE = 1\n",
        f"{info}/METADATA": ("\n".join(headers) + "\n").encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: sealbox-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    digest = lambda data: base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record = [f"{name},sha256={digest(data)},{len(data)}" for name, data in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    name = f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(pathlib.Path(wheel_directory) / name, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    return name
'''

PYPROJECT = """[build-system]
requires = []
build-backend = "backend"
backend-path = ["."]
"""


@pytest.fixture(scope="module", autouse=True)
def offline_pip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """pip with no configuration and no index: only what a test hands it, and no traffic off this host."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("PIP_")]:
            patch.delenv(name)
        patch.setenv("PIP_CONFIG_FILE", os.devnull)
        patch.setenv("PIP_NO_INDEX", "1")
        patch.setenv("PIP_CACHE_DIR", str(tmp_path_factory.mktemp("pip-cache")))
        yield


def make_project(folder: Path, name: str, *headers: str, version: str = "1.0") -> Path:
    project = folder / f"{name}-{version}"
    project.mkdir(parents=True)
    (project / "pyproject.toml").write_text(PYPROJECT)
    (project / "backend.py").write_text(BACKEND)
    (project / "project.json").write_text(json.dumps({"name": name, "version": version, "headers": list(headers)}))
    return project


def pip_wheel(project: Path, out: Path) -> Path:
    """A real wheel, built by `pip wheel` from a generated project."""
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(project)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    name = json.loads((project / "project.json").read_text())["name"].replace("-", "_")
    (wheel,) = out.glob(f"{name}-*.whl")
    return wheel


def make_sdist(project: Path, out: Path) -> Path:
    """`name-version.tar.gz` with the project at `name-version/`: the only distribution such a package publishes."""
    out.mkdir(parents=True, exist_ok=True)
    sdist = out / f"{project.name}.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        archive.add(project, arcname=project.name)
    return sdist


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    generate_key_pair("alice", folder, passphrase=None)
    return folder


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tinypkg` (MIT, pure Python) and `needs-backport`, which needs `backport` only below this host's Python."""
    projects = tmp_path_factory.mktemp("projects")
    house = tmp_path_factory.mktemp("wheelhouse")
    pip_wheel(make_project(projects, "tinypkg", "License-Expression: MIT"), house)
    marker = f'Requires-Dist: backport; python_version < "{HOST_PYTHON}"'
    pip_wheel(make_project(projects, "needs-backport", marker, "Classifier: License :: OSI Approved :: BSD License"), house)
    pip_wheel(make_project(projects, "backport"), house)
    return house


def create(out: Path, keys: Path, *inputs: str):
    args = ["bundle", "create", "--name", "demo", "--version", "1", "--out", str(out)]
    return runner.invoke(app, [*args, "--sign-key", str(keys / "alice.key"), "--json", *inputs])


def signed_manifest(bundle: Path) -> Manifest:
    envelope = json.loads((bundle / "manifest.json").read_bytes())
    return Manifest.from_bytes(base64.b64decode(envelope["payload"]))


def target(python: str) -> Target:
    host = Target.host()
    return Target(python=python, implementation="cp", abi=f"cp{python.replace('.', '')}", platforms=host.platforms)


# --- wheels -------------------------------------------------------------------------------------------------------


def test_a_wheel_from_a_wheelhouse_is_bundled_with_its_sha256_and_license(
    tmp_path: Path, keys: Path, wheelhouse: Path
) -> None:
    out = tmp_path / "bundle"
    result = create(out, keys, "--wheelhouse", str(wheelhouse), "--wheel", "tinypkg==1.0", "--no-sealbox-wheel")
    assert result.exit_code == 0, result.output
    (entry,) = signed_manifest(out).entries("wheel")
    wheel = wheelhouse / "tinypkg-1.0-py3-none-any.whl"
    assert entry.path == f"wheels/{wheel.name}"
    assert entry.sha256 == sha256(wheel) == sha256(out / BLOB_DIR / entry.sha256)
    assert entry.meta == {"name": "tinypkg", "version": "1.0", "license": "MIT"}
    assert entry.provenance == str(wheel.absolute())
    verified = runner.invoke(app, ["bundle", "verify", str(out), "--trust", str(keys / "alice.pub")])
    assert verified.exit_code == 0, verified.output


def test_dependencies_follow_the_targets_markers_not_this_hosts(tmp_path: Path, wheelhouse: Path) -> None:
    def names(python: str) -> list[str]:
        artifacts = collect_wheels(
            requirements=[], wheels=["needs-backport==1.0"], wheelhouses=[wheelhouse], target=target(python),
            work_dir=tmp_path / python, include_sealbox=False,
        )  # fmt: skip
        return [artifact.meta["name"] for artifact in artifacts]

    assert names(OTHER_PYTHON) == ["backport", "needs-backport"]
    assert names(HOST_PYTHON) == ["needs-backport"]


def test_requirements_files_are_resolved_for_the_target(tmp_path: Path, wheelhouse: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("tinypkg==1.0\nneeds-backport==1.0\n")
    artifacts = collect_wheels(
        requirements=[requirements], wheels=[], wheelhouses=[wheelhouse], target=target(OTHER_PYTHON),
        work_dir=tmp_path / "work", include_sealbox=False,
    )  # fmt: skip
    assert [a.path for a in artifacts] == [
        "wheels/backport-1.0-py3-none-any.whl",
        "wheels/needs_backport-1.0-py3-none-any.whl",
        "wheels/tinypkg-1.0-py3-none-any.whl",
    ]
    assert {a.role for a in artifacts} == {"wheel"}
    assert artifacts[1].meta["license"] == "BSD License"


def test_a_wheelhouse_alone_carries_every_wheel_in_it(tmp_path: Path, wheelhouse: Path) -> None:
    artifacts = collect_wheels(
        requirements=[], wheels=[], wheelhouses=[wheelhouse], target=Target.host(), work_dir=tmp_path / "work",
        include_sealbox=False,
    )  # fmt: skip
    assert sorted(a.file.name for a in artifacts) == sorted(path.name for path in wheelhouse.glob("*.whl"))


def test_leftovers_of_an_interrupted_run_do_not_join_the_next(tmp_path: Path, wheelhouse: Path) -> None:
    work = tmp_path / "work"
    (work / "download").mkdir(parents=True)
    (work / "download" / "stale-9.9-py3-none-any.whl").write_bytes(b"from a run with other inputs")
    artifacts = collect_wheels(
        requirements=[], wheels=["tinypkg==1.0"], wheelhouses=[wheelhouse], target=Target.host(), work_dir=work,
        include_sealbox=False,
    )  # fmt: skip
    assert [a.file.name for a in artifacts] == ["tinypkg-1.0-py3-none-any.whl"]


@pytest.fixture(scope="module")
def sdist_house(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheelhouse holding only the sdist of `onlysdist` (as PyPI holds only llama-cpp-python's)."""
    project = make_project(tmp_path_factory.mktemp("sdist-project"), "onlysdist", "License-Expression: Apache-2.0")
    house = tmp_path_factory.mktemp("sdist-house")
    make_sdist(project, house)
    return house


def test_an_sdist_only_package_is_built_here_when_this_host_matches_the_target(tmp_path: Path, sdist_house: Path) -> None:
    assert host_stands_in_for(Target.host()) is None
    (artifact,) = collect_wheels(
        requirements=[], wheels=["onlysdist==1.0"], wheelhouses=[sdist_house], target=Target.host(),
        work_dir=tmp_path / "work", include_sealbox=False,
    )  # fmt: skip
    assert artifact.path == "wheels/onlysdist-1.0-py3-none-any.whl"
    assert artifact.meta == {"name": "onlysdist", "version": "1.0", "license": "Apache-2.0", "built_here": True}
    assert artifact.provenance == f"{(sdist_house / 'onlysdist-1.0.tar.gz').absolute()} (sdist, built on this host)"


def test_an_sdist_only_package_for_another_python_is_refused_naming_it_and_why(tmp_path: Path, sdist_house: Path) -> None:
    with pytest.raises(InputError) as refused:
        collect_wheels(
            requirements=[], wheels=["onlysdist==1.0"], wheelhouses=[sdist_house], target=target(OTHER_PYTHON),
            work_dir=tmp_path / "work", include_sealbox=False,
        )  # fmt: skip
    message = str(refused.value)
    assert message.startswith(f"onlysdist==1.0: no wheel for Python {OTHER_PYTHON}")
    assert f"this host runs Python {HOST_PYTHON}, the target {OTHER_PYTHON}" in message
    assert "--wheelhouse" in message


def test_a_wheel_from_a_wheelhouse_serves_a_target_this_host_cannot_build_for(
    tmp_path: Path, sdist_house: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # What the refusal above asks for: the wheel built "on a host like the target", handed over in a wheelhouse.
    house = tmp_path_factory.mktemp("prebuilt")
    with tarfile.open(sdist_house / "onlysdist-1.0.tar.gz") as archive:
        archive.extractall(tmp_path / "src", filter="data")
    wheel = pip_wheel(tmp_path / "src" / "onlysdist-1.0", house)
    (artifact,) = collect_wheels(
        requirements=[], wheels=["onlysdist==1.0"], wheelhouses=[sdist_house, house], target=target(OTHER_PYTHON),
        work_dir=tmp_path / "work", include_sealbox=False,
    )  # fmt: skip
    assert artifact.provenance == str(wheel.absolute())
    assert "built_here" not in artifact.meta


def test_a_package_pip_cannot_find_is_refused_with_pips_own_words(tmp_path: Path, keys: Path, wheelhouse: Path) -> None:
    out = tmp_path / "bundle"
    result = create(out, keys, "--wheelhouse", str(wheelhouse), "--wheel", "absent-package==1.0", "--no-sealbox-wheel")
    assert result.exit_code == InputError.exit_code, result.output
    assert "absent-package==1.0: no wheel for Python" in result.stderr
    assert "No matching distribution found for absent-package==1.0" in result.stderr
    assert not (out / "manifest.json").exists()


def test_a_missing_wheelhouse_is_refused_before_pip_runs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--wheelhouse is not a directory"):
        collect_wheels(
            requirements=[], wheels=["tinypkg"], wheelhouses=[tmp_path / "nowhere"], target=Target.host(),
            work_dir=tmp_path / "work", include_sealbox=False,
        )  # fmt: skip


def test_the_sealbox_wheel_is_built_from_a_copy_holding_only_what_the_build_reads(tmp_path: Path) -> None:
    copy = copy_source_tree(REPO, tmp_path / "source")
    assert (copy / "pyproject.toml").is_file() and (copy / "README.md").is_file()
    assert (copy / "bundler" / "sources" / "wheels.py").is_file()
    assert (copy / "runtime" / "__init__.py").is_file()
    assert (copy / "policies" / "default.toml").is_file()
    assert (copy / "sealbox" / "cli.py").is_file()
    for absent in ("tests", "scripts", ".venv", ".git", "sealbox.egg-info"):
        assert not (copy / absent).exists(), absent
    assert not list(copy.rglob("__pycache__"))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ("License-Expression: Apache-2.0 OR MIT\nLicense: ignored\n", "Apache-2.0 OR MIT"),
        ("License: BSD-3-Clause\n", "BSD-3-Clause"),
        ("License: UNKNOWN\nClassifier: License :: OSI Approved :: MIT License\n", "MIT License"),
        ("License: " + "Permission is hereby granted " * 10 + "\nClassifier: License :: OSI Approved :: ISC License\n",
         "ISC License"),
        ("Classifier: Programming Language :: Python\n", None),
    ],
)  # fmt: skip
def test_a_wheels_license_is_read_from_its_metadata(headers: str, expected: str | None) -> None:
    assert wheel_license(Parser().parsestr(f"Metadata-Version: 2.4\nName: x\nVersion: 1\n{headers}\n")) == expected


# --- hf:// --------------------------------------------------------------------------------------------------------

OWNER_REPO = "sealbox-tests/tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def hub(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    """A stand-in hub on loopback holding `tiny.gguf` at two commits (`main` is the newer), set as HF_ENDPOINT."""
    model = tiny_model.read_bytes()
    files = {"tiny.gguf": model, "README.md": b"# tiny\n", "fake.gguf": b"PK\x03\x04 a zip, not a model" * 64}
    repos = {
        OWNER_REPO: {
            "refs": {"main": COMMIT, "v1": OLD_COMMIT},
            "files": {COMMIT: files, OLD_COMMIT: {"tiny.gguf": model}},
            "license": "apache-2.0",
        }
    }
    with serving(repos, monkeypatch) as server:
        yield server


def stop(hub: Hub) -> None:
    """The hub goes away (the network is down); HF_ENDPOINT still names its closed port."""
    hub.shutdown()
    hub.server_close()


def test_hf_model_revision_is_resolved_to_a_commit_and_recorded(
    tmp_path: Path, keys: Path, hub: Hub, tiny_model: Path
) -> None:
    out = tmp_path / "bundle"
    ref = f"hf://{OWNER_REPO}/tiny.gguf"
    result = create(out, keys, "--model", ref, "--hf-cache", str(tmp_path / "hf-cache"))
    assert result.exit_code == 0, result.output
    (entry,) = signed_manifest(out).entries("model")
    assert entry.path == "models/tiny.gguf"
    assert entry.provenance == f"hf://{OWNER_REPO}/tiny.gguf@{COMMIT}"
    assert entry.sha256 == sha256(tiny_model)
    assert (entry.meta["hf_revision"], entry.meta["hf_commit"], entry.meta["hf_license"]) == ("main", COMMIT, "apache-2.0")
    assert entry.meta["architecture"] == "llama"
    # The bytes were fetched at the commit `main` pointed at, never at the moving branch name.
    downloads = [path for method, path in hub.requests if "/resolve/" in path]
    assert downloads and all(f"/resolve/{COMMIT}/tiny.gguf" in path for path in downloads)


def test_hf_model_at_a_tag_records_the_tags_commit(tmp_path: Path, hub: Hub) -> None:
    artifact = resolve_hf_model(f"hf://{OWNER_REPO}/tiny.gguf@v1", cache_dir=tmp_path)
    assert artifact.provenance == f"hf://{OWNER_REPO}/tiny.gguf@{OLD_COMMIT}"
    assert artifact.meta["hf_revision"] == "v1"


def test_hf_model_pinned_to_a_commit_resolves_from_the_cache_without_the_hub(
    tmp_path: Path, hub: Hub, tiny_model: Path
) -> None:
    first = resolve_hf_model(f"hf://{OWNER_REPO}/tiny.gguf", cache_dir=tmp_path)
    stop(hub)
    pinned = resolve_hf_model(f"hf://{OWNER_REPO}/tiny.gguf@{COMMIT}", cache_dir=tmp_path)
    assert pinned.provenance == first.provenance
    assert pinned.file.read_bytes() == tiny_model.read_bytes()
    with pytest.raises(InputError) as refused:
        resolve_hf_model(f"hf://{OWNER_REPO}/tiny.gguf", cache_dir=tmp_path)
    message = str(refused.value)
    assert message.startswith(f"hf://{OWNER_REPO}/tiny.gguf: cannot reach {hub.url} to resolve 'main'")
    assert "pin one" in message


def test_hf_unknown_file_is_refused_naming_the_reference_and_the_files_there(
    tmp_path: Path, keys: Path, hub: Hub
) -> None:
    out = tmp_path / "bundle"
    ref = f"hf://{OWNER_REPO}/q4/absent.gguf"
    result = create(out, keys, "--model", ref, "--hf-cache", str(tmp_path / "hf-cache"))
    assert result.exit_code == InputError.exit_code
    assert f"{ref}: {OWNER_REPO} has no file 'q4/absent.gguf' at main" in result.stderr
    assert "its .gguf files: fake.gguf, tiny.gguf" in result.stderr
    assert not out.exists()


def test_hf_unknown_file_at_a_pinned_commit_is_refused_too(tmp_path: Path, hub: Hub) -> None:
    ref = f"hf://{OWNER_REPO}/absent.gguf@{COMMIT}"
    with pytest.raises(InputError, match=f"^{ref}: {OWNER_REPO} has no file 'absent.gguf'"):
        resolve_hf_model(ref, cache_dir=tmp_path)


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("hf://sealbox-tests/absent/tiny.gguf", "no model repository sealbox-tests/absent"),
        (f"hf://{OWNER_REPO}/tiny.gguf@no-such-branch", "has no revision 'no-such-branch'"),
    ],
)
def test_hf_unknown_repository_or_revision_is_refused_clearly(tmp_path: Path, hub: Hub, ref: str, expected: str) -> None:
    with pytest.raises(InputError) as refused:
        resolve_hf_model(ref, cache_dir=tmp_path)
    assert str(refused.value).startswith(f"{ref}: ")
    assert expected in str(refused.value)


def test_hf_download_that_is_not_gguf_is_refused(tmp_path: Path, hub: Hub) -> None:
    ref = f"hf://{OWNER_REPO}/fake.gguf"
    with pytest.raises(InputError, match=f"^{ref}: the downloaded file is not a GGUF model"):
        resolve_hf_model(ref, cache_dir=tmp_path)


@pytest.mark.parametrize(
    "ref",
    [
        "hf://owner/repo",
        "hf://owner/repo/",
        "hf://owner//model.gguf",
        "hf://owner/repo/../escape.gguf",
        "hf://owner/repo/model.safetensors",
        "hf://owner/repo/model.gguf@",
        "hf://-owner/repo/model.gguf",
    ],
)
def test_hf_references_that_cannot_name_one_gguf_file_are_refused(ref: str) -> None:
    with pytest.raises(InputError, match=f"^{ref.replace('.', '[.]')}: "):
        parse_hf_reference(ref)


def test_hf_reference_keeps_the_path_inside_the_repository_and_defaults_to_main() -> None:
    parsed = parse_hf_reference("hf://owner/repo/Q4_K_M/model.gguf")
    assert (parsed.repo_id, parsed.filename, parsed.revision) == ("owner/repo", "Q4_K_M/model.gguf", "main")
    assert parse_hf_reference("hf://owner/repo/model.gguf@refs/pr/1").revision == "refs/pr/1"


# --- SBOM ---------------------------------------------------------------------------------------------------------


def read_sbom(bundle: Path) -> dict[str, Any]:
    (entry,) = signed_manifest(bundle).entries("sbom")
    return json.loads((bundle / BLOB_DIR / entry.sha256).read_bytes())


def test_the_sbom_of_a_created_bundle_lists_the_model_with_its_facts_and_the_wheel_with_its_hash(
    tmp_path: Path, keys: Path, wheelhouse: Path, tiny_model: Path
) -> None:
    out = tmp_path / "bundle"
    inputs = ["--model", str(tiny_model), "--wheelhouse", str(wheelhouse), "--wheel", "tinypkg==1.0", "--no-sealbox-wheel"]
    result = create(out, keys, *inputs)
    assert result.exit_code == 0, result.output
    manifest = signed_manifest(out)
    sbom = read_sbom(out)
    assert (sbom["bomFormat"], sbom["specVersion"]) == ("CycloneDX", "1.6")
    assert sbom["metadata"]["component"]["name"] == "demo"
    assert sbom["metadata"]["timestamp"].startswith(manifest.created.strftime("%Y-%m-%dT%H:%M:%S"))
    components = {component["bom-ref"]: component for component in sbom["components"]}
    assert set(components) == {"models/tiny.gguf", "wheels/tinypkg-1.0-py3-none-any.whl"}

    model = components["models/tiny.gguf"]
    properties = {item["name"]: item["value"] for item in model["properties"]}
    assert model["type"] == "machine-learning-model"
    assert model["hashes"] == [{"alg": "SHA-256", "content": sha256(tiny_model)}]
    assert properties["sealbox:gguf:architecture"] == "llama"
    assert properties["sealbox:gguf:context_length"] == str(manifest.entries("model")[0].meta["context_length"])
    assert properties["sealbox:provenance"] == str(tiny_model.absolute())

    wheel = components["wheels/tinypkg-1.0-py3-none-any.whl"]
    assert wheel["type"] == "library"
    assert wheel["purl"] == "pkg:pypi/tinypkg@1.0"
    assert wheel["hashes"] == [{"alg": "SHA-256", "content": manifest.entries("wheel")[0].sha256}]
    assert wheel["licenses"] == [{"license": {"id": "MIT"}}]
    root = [dep for dep in sbom["dependencies"] if dep["ref"] == sbom["metadata"]["component"]["bom-ref"]]
    assert sorted(root[0]["dependsOn"]) == sorted(components)


def test_the_sbom_is_the_same_bytes_for_the_same_contents(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    artifacts = [Artifact(role="file", path="files/notes.txt", file=notes, provenance=str(notes))]
    created = datetime(2030, 1, 31, 12, 0, tzinfo=timezone.utc)
    once = build_sbom(artifacts, bundle_name="demo", version=2, created=created)
    assert build_sbom(artifacts, bundle_name="demo", version=2, created=created) == once
    assert json.loads(once)["metadata"]["timestamp"].startswith("2030-01-31T12:00:00")
    assert "timestamp" not in json.loads(build_sbom(artifacts, bundle_name="demo", version=2))["metadata"]
    notes.write_text("changed\n")
    changed = json.loads(build_sbom(artifacts, bundle_name="demo", version=2, created=created))
    assert changed["serialNumber"] != json.loads(once)["serialNumber"]
    assert changed["components"][0]["hashes"][0]["content"] == sha256(notes)
