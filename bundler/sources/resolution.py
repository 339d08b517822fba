"""What pip would install for the TARGET, without downloading a byte of it: `pip install --dry-run --report`.

For a stack as large as vLLM (CUDA wheels of several GiB), a bundle author first asks what the target would get:
pip resolves for the target's Python, ABI and platform (`--only-binary=:all:`, `--python-version`, `--platform`,
`--ignore-installed`) and writes its JSON installation report, which names every wheel, its version and URL. No
wheel is fetched beyond its metadata; with `--no-index` and local `--find-links` (as the tests run it) nothing
leaves the machine at all.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sealbox.bundler.errors import InputError
from sealbox.bundler.manifest import Target
from sealbox.bundler.sources.wheels import _target_args

VLLM_REQUIREMENT = "vllm"


@dataclass(frozen=True)
class Resolved:
    name: str
    version: str
    url: str
    """Where pip found the wheel (an index URL, or a `file://` under a --find-links folder)."""


def resolution_command(specs: list[str], target: Target, report: Path, *, find_links: list[Path] = (),
                       no_index: bool = False) -> list[str]:  # fmt: skip
    """The pip command that resolves `specs` for `target` and writes the report, downloading nothing."""
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
               str(report), "--disable-pip-version-check", "--progress-bar", "off",
               *_target_args(target, list(target.platforms))]  # fmt: skip
    if no_index:
        command.append("--no-index")
    for folder in find_links:
        command += ["--find-links", str(folder.absolute())]
    return command + list(specs)


def resolve(specs: list[str], target: Target, *, find_links: list[Path] = (), no_index: bool = False) -> list[Resolved]:
    """Every wheel the target would install for `specs`, as pip resolved it.

    Raises:
        InputError: pip cannot resolve (a missing wheel for the target's platform, a conflict): its message says why.
    """
    with tempfile.TemporaryDirectory(prefix="sealbox-resolve-") as scratch:
        report = Path(scratch) / "report.json"
        result = subprocess.run(resolution_command(specs, target, report, find_links=find_links, no_index=no_index),
                                capture_output=True, text=True, timeout=600)  # fmt: skip
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-6:])
            raise InputError(f"pip cannot resolve {' '.join(specs)} for {target.python}/{list(target.platforms)}:\n{tail}")
        data = json.loads(report.read_text())
    return [Resolved(name=item["metadata"]["name"], version=item["metadata"]["version"],
                     url=item["download_info"]["url"]) for item in data.get("install", [])]  # fmt: skip
