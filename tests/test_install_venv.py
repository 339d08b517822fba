"""The release's offline virtualenv: built only from the bundled wheels, pinned by hash, scripts pointing at the release."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import sealbox.bundler.cli.install  # noqa: F401
from sealbox.bundler.cli.bundle import bundle_app
from sealbox.bundler.install import InstallRequest, install_bundle
from sealbox.bundler.offline_venv import VenvError
from install_support import REPO, Item, Publisher, audit_events, make_keys, model_item, snapshot, trust, write_gguf

app = typer.Typer()
app.add_typer(bundle_app, name="bundle")
runner = CliRunner(env={"COLUMNS": "400"})

PROJECT = """
[build-system]
requires = ["setuptools==80.9.0"]
build-backend = "setuptools.build_meta"
[project]
name = "{name}"
version = "1.0"
dependencies = {dependencies}
[project.scripts]
{name} = "{module}:main"
"""


def build_wheel(folder: Path, name: str, dependencies: list[str]) -> Path:
    """A real wheel, built by `pip wheel` from a one-module project with a console script."""
    module = name.replace("-", "_")
    project = folder / name
    (project / module).mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        PROJECT.format(name=name, module=module, dependencies=json.dumps(dependencies))
    )
    (project / module / "__init__.py").write_text(f"def main():\n    print('hello from {name}')\n")
    out = folder / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(project)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"pip wheel could not build a test wheel (is PyPI reachable for setuptools?): {result.stderr[-300:]}")
    (wheel,) = out.glob(f"{module}-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("wheels")
    return {
        "hello": build_wheel(folder, "hello-sealbox", []),
        "needy": build_wheel(folder, "needy-sealbox", ["absent-dependency==1.0"]),
    }


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keys(tmp_path_factory.mktemp("keys"), "alice")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("models") / "alpha.gguf", seed=1)


def wheel_item(wheel: Path) -> Item:
    return Item("wheel", f"wheels/{wheel.name}", wheel)


def test_bundled_wheels_become_an_offline_venv_whose_scripts_point_at_the_release(
    tmp_path: Path, keys: Path, wheels: dict[str, Path], model: Path
) -> None:
    host = trust(tmp_path / "root", keys / "alice.pub")
    bundle = Publisher(keys).publish(tmp_path / "b1", [model_item(model), wheel_item(wheels["hello"])], version=1)
    result = install_bundle(InstallRequest(bundle=bundle, root=host))
    assert result.venv and result.release.install.venv
    venv = host.releases / "demo-1" / "venv"
    script = venv / "bin" / "hello-sealbox"
    assert script.read_text().splitlines()[0] == f"#!{venv}/bin/python"
    ran = subprocess.run([str(script)], capture_output=True, text=True, check=True)
    assert ran.stdout == "hello from hello-sealbox\n"
    assert not (venv / "bin" / "pip").exists(), "the release environment has no installer of its own"
    for item in (venv / "bin").iterdir():
        if item.is_file() and not item.is_symlink():
            assert b"staging" not in item.read_bytes(), item
    assert f"ExecStart={venv}/bin/sealbox serve" in (host.current / "service" / "sealbox.service").read_text()


def test_a_wheel_whose_dependency_is_not_in_the_bundle_is_refused_and_nothing_changes(
    tmp_path: Path, keys: Path, wheels: dict[str, Path], model: Path
) -> None:
    host = trust(tmp_path / "root", keys / "alice.pub")
    publisher = Publisher(keys)
    assert install_bundle(InstallRequest(bundle=publisher.publish(tmp_path / "b1", [model_item(model)], version=1), root=host))
    bundle = publisher.publish(tmp_path / "b2", [model_item(model), wheel_item(wheels["needy"])], version=2)
    before = snapshot(host.path)
    result = runner.invoke(app, ["bundle", "install", str(bundle), "--root", str(host.path), "--json"])
    assert result.exit_code == VenvError.exit_code, result.output
    message = json.loads(result.stdout)["message"]
    assert "--no-index" in message and "absent-dependency" in message
    assert snapshot(host.path) == before
    assert audit_events(host.path)[-1][0] == "bundle.refused"


def test_a_crash_after_the_venv_is_built_leaves_the_previous_release_live_and_a_rerun_completes(
    tmp_path: Path, keys: Path, wheels: dict[str, Path], model: Path
) -> None:
    host = trust(tmp_path / "root", keys / "alice.pub")
    publisher = Publisher(keys)
    install_bundle(InstallRequest(bundle=publisher.publish(tmp_path / "b1", [model_item(model)], version=1), root=host))
    bundle = publisher.publish(tmp_path / "b2", [model_item(model), wheel_item(wheels["hello"])], version=2)
    arguments = ["bundle", "install", str(bundle), "--root", str(host.path)]
    launcher = Path(__file__).with_name("crash_launcher.py")
    crashed = subprocess.run([sys.executable, str(launcher), "venv-built", *arguments], cwd=REPO, check=False)
    assert crashed.returncode == -signal.SIGKILL
    assert os.readlink(host.current) == "releases/demo-1"
    assert not (host.releases / "demo-2").exists()
    command = [sys.executable, "-c", "import sys; from sealbox.cli import main; sys.argv[0] = 'sealbox'; main()"]
    rerun = subprocess.run([*command, *arguments], cwd=REPO, check=False)
    assert rerun.returncode == 0
    assert os.readlink(host.current) == "releases/demo-2"
    assert subprocess.run([str(host.current / "venv" / "bin" / "hello-sealbox")], capture_output=True, check=True).returncode == 0
