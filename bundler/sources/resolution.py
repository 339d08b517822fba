"""What pip would install for the TARGET, without downloading a byte of it: `pip install --dry-run --report`.

For a stack as large as vLLM (CUDA wheels of several GiB), a bundle author first asks what the target would get:
pip resolves for the target's Python, ABI and platform (`--only-binary=:all:`, `--python-version`, `--platform`,
`--ignore-installed`) and writes its JSON installation report, which names every wheel, its version and URL. No
wheel is fetched beyond its metadata; with `--no-index` and local `--find-links` (as the tests run it) nothing
leaves the machine at all.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sealbox.bundler.errors import InputError
from sealbox.bundler.manifest import Target
from sealbox.bundler.sources.wheels import _host_marker_environment, _pip, _tail, _target_args, marker_environment

VLLM_PROJECT = "vllm"


@dataclass(frozen=True)
class Resolved:
    name: str
    version: str
    url: str
    """Where pip found the wheel (an index URL, or a `file://` under a --find-links folder)."""


def resolution_arguments(specs: Sequence[str], target: Target, report: Path, *, find_links: Sequence[Path] = (),
                         no_index: bool = False) -> list[str]:  # fmt: skip
    """pip's arguments that resolve `specs` for `target` and write the report, downloading nothing."""
    args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
            "--progress-bar", "off", *_target_args(target, list(target.platforms))]  # fmt: skip
    if no_index:
        args.append("--no-index")
    for folder in find_links:
        args += ["--find-links", str(folder.absolute())]
    return args + list(specs)


def resolve(specs: Sequence[str], target: Target, *, find_links: Sequence[Path] = (),
            no_index: bool = False) -> list[Resolved]:  # fmt: skip
    """Every wheel the target would install for `specs`, as pip resolved it, environment markers evaluated for the
    target (the same shim as `pip download` for wheels: pip alone would evaluate them for this host).

    Raises:
        InputError: pip cannot resolve (a missing wheel for the target's platform, a conflict): its message says why.
    """
    markers = marker_environment(target)
    host = _host_marker_environment()
    differs = any(host.get(key) != value for key, value in markers.items())
    with tempfile.TemporaryDirectory(prefix="sealbox-resolve-") as scratch:
        report = Path(scratch) / "report.json"
        args = resolution_arguments(specs, target, report, find_links=find_links, no_index=no_index)
        result = _pip(args, "pip install --dry-run", markers=markers if differs else None)
        if result.returncode != 0:
            raise InputError(f"pip cannot resolve {' '.join(specs)} for Python {target.python} "
                             f"{list(target.platforms)}:\n{_tail(result.stderr)}")  # fmt: skip
        data = json.loads(report.read_text())
    return [Resolved(name=item["metadata"]["name"], version=item["metadata"]["version"],
                     url=item["download_info"]["url"]) for item in data.get("install", [])]  # fmt: skip
