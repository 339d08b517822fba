"""The house's shape as a specification: one `sealbox` import namespace, imports that run one way only."""

from __future__ import annotations

import ast
import subprocess
import tomllib
import sys
import zipfile
from pathlib import Path

import pytest

from sealbox.bundler.sources.wheels import build_sealbox_wheel

REPO = Path(__file__).resolve().parents[1]
WINGS = {"bundler": REPO / "bundler", "runtime": REPO / "runtime", "sealbox": REPO / "sealbox"}


def _imports(path: Path) -> set[str]:
    """Every module name `path` imports, absolute, at any depth (function-local imports count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _sources(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*.py") if "__pycache__" not in path.parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    return build_sealbox_wheel(work / "source", work / "out")


def test_the_wheel_holds_nothing_outside_the_sealbox_namespace(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/", 1)[0] for name in archive.namelist()}
    assert tops == {"sealbox", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}


def test_installing_the_wheel_leaves_no_top_level_bundler_runtime_or_policies_module(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True)  # fmt: skip
    top_level = sorted(path.name for path in Path(site).iterdir() if not path.name.endswith(".dist-info"))
    assert top_level == ["sealbox"]
    probe = "import importlib.util as u; print([n for n in ('bundler', 'runtime', 'policies') if u.find_spec(n)])"
    found = subprocess.run([str(python), "-I", "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert found.stdout.strip() == "[]"
    assert (Path(site) / "sealbox" / "policies" / "default.toml").is_file()
    assert (Path(site) / "sealbox" / "runtime" / "server" / "startup.py").is_file()


def test_every_source_folder_is_a_package_the_wheel_carries() -> None:
    """The package list in pyproject.toml is explicit (package-dir maps the folders into the namespace): a new folder
    left out of it would be missing from every installed release."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    mapped = {folder: name for name, folder in config["package-dir"].items()}
    folders = {path.parent for wing in ("bundler", "runtime", "sealbox") for path in (REPO / wing).rglob("*.py")}
    expected = set()
    for folder in folders:
        top, *rest = folder.relative_to(REPO).parts
        expected.add(".".join([mapped[top], *rest]))
    assert expected <= set(config["packages"])


@pytest.mark.parametrize("path", _sources(REPO / "runtime"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_runtime_never_imports_the_bundle_side(path: Path) -> None:
    assert not {name for name in _imports(path) if name.startswith("sealbox.bundler")}


@pytest.mark.parametrize("path", _sources(REPO / "runtime" / "engine"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_engine_knows_nothing_of_the_server_or_the_audit_log(path: Path) -> None:
    assert not {name for name in _imports(path) if name.startswith(("sealbox.runtime.server", "sealbox.runtime.audit"))}


ENGINE_SEAM = {"sealbox.runtime.engine", "sealbox.runtime.engine.base"}
"""What the server may import of the engine: the package (`Engine`, its requests, events and errors, `open_engine`)
and the module that defines them; never a backend's own modules (`llama_batch`, `llama_backend`, the scheduler)."""


@pytest.mark.parametrize("path", _sources(REPO / "runtime" / "server"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_server_reaches_the_engine_only_through_its_seam(path: Path) -> None:
    engine_imports = {name for name in _imports(path) if name.startswith("sealbox.runtime.engine")}
    assert engine_imports <= ENGINE_SEAM


def test_the_seam_names_everything_the_server_needs_without_loading_llama_cpp() -> None:
    probe = ("import sys, sealbox.runtime.engine as seam; "
             "names = ('Engine', 'InvalidRequest', 'EngineLoadError', 'open_engine', 'GenerationRequest', 'TokenLogprob'); "
             "assert all(hasattr(seam, n) for n in names); assert 'llama_cpp' not in sys.modules; "
             "assert hasattr(seam.Engine, 'detokenize')")  # fmt: skip
    subprocess.run([sys.executable, "-P", "-c", probe], check=True, cwd=REPO)


@pytest.mark.parametrize("path", _sources(REPO / "bundler") + _sources(REPO / "runtime") + _sources(REPO / "tests"),
                         ids=lambda p: str(p.relative_to(REPO)))  # fmt: skip
def test_nothing_imports_the_old_top_level_names_or_the_scripts_folder(path: Path) -> None:
    stale = {name for name in _imports(path) if name.split(".")[0] in ("bundler", "runtime", "policies", "scripts")}
    assert not stale
