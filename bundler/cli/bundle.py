"""`sealbox bundle create | verify | sign | inspect`: thin shells around `bundler.create`, `verify`, `cosign`.

Each refusal prints one line naming the file, part or field, and exits with the code of its error class
(`bundler.errors`); `--json` puts a machine-readable result (or refusal) on stdout. Install commands join this app
from their own module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import typer

from sealbox.bundler.blobs import DEFAULT_MAX_PART_SIZE
from sealbox.bundler.cli.keys import open_signer
from sealbox.bundler.cli.progress import stderr_progress
from sealbox.bundler.errors import BundleError, InputError, KeyFileError
from sealbox.bundler.keys import load_public_key
from sealbox.bundler.manifest import Target, format_time
from sealbox.bundler.signing import check_signatures
from sealbox.bundler.verify import failure_to_dict, read_unverified, verify_bundle
from sealbox.runtime.cli.lazy_group import lazy_group
from sealbox.runtime.cli.refusal import refuse
from sealbox.runtime.exit_codes import ExitCode
from sealbox.runtime.sizes import HELP as SIZE_HELP
from sealbox.runtime.sizes import format_size, parse_size

INSTALLER_COMMANDS = {
    name: f"sealbox.bundler.cli.install:{function}"
    for name, function in (("install", "install"), ("list", "list_releases"), ("rollback", "rollback"), ("gc", "gc"))
}
"""The isolated host's side of `bundle`: imported only when named (the publisher's commands never need the installer)."""

bundle_app = typer.Typer(
    help="Create, verify, co-sign and inspect signed offline bundles; install, list, roll back and collect them.",
    no_args_is_help=True,
    cls=lazy_group(INSTALLER_COMMANDS),
)


@contextmanager
def _refusals(as_json: bool = False) -> Iterator[None]:
    """Turn the library's typed errors into one line on stderr (and JSON on stdout) plus the class's exit code."""
    try:
        yield
    except BundleError as exc:
        if as_json:
            typer.echo(json.dumps(failure_to_dict(exc)))
        raise refuse(exc) from exc
    except (InputError, KeyFileError) as exc:
        if as_json:
            typer.echo(json.dumps({"ok": False, "error": type(exc).__name__, "exit_code": exc.exit_code, "message": str(exc)}))
        raise refuse(exc) from exc
    except OSError as exc:
        if as_json:
            typer.echo(json.dumps({"ok": False, "error": "OSError", "exit_code": 1, "message": str(exc)}))
        raise refuse(exc, ExitCode.FAILED) from exc


def _size_option(text: str | int) -> int:
    if isinstance(text, int):  # the default arrives already parsed
        return text
    try:
        return parse_size(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _target(python: str | None, platforms: list[str]) -> Target:
    host = Target.host()
    if python is None and not platforms:
        return host
    version = python or host.python
    if not version.replace(".", "").isdigit() or version.count(".") != 1:
        raise typer.BadParameter(f"--python {version!r} must look like 3.11")
    return Target(
        python=version,
        implementation="cp",
        abi=f"cp{version.replace('.', '')}",
        platforms=tuple(platforms) or host.platforms,
    )


def _trusted(paths: list[Path]) -> list[Any]:
    return [load_public_key(path) for path in paths]


def _check_threshold(trusted: list[Any], threshold: int) -> None:
    distinct = len({key.keyid for key in trusted})
    if not 1 <= threshold <= distinct:
        raise typer.BadParameter(
            f"{threshold} must be between 1 and the number of distinct trusted keys ({distinct})",
            param_hint="--threshold",
        )


@bundle_app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="Bundle name (a release is NAME-VERSION on the host).")],
    version: Annotated[int, typer.Option("--version", help="Integer version; must grow for each bundle of NAME.")],
    out: Annotated[Path, typer.Option("--out", help="New directory for the bundle (or an interrupted one, to resume).")],
    sign_key: Annotated[list[Path], typer.Option("--sign-key", help="Private key (.key) to sign with; repeatable.")],
    model: Annotated[list[str], typer.Option("--model", help="A local .gguf, hf://owner/repo/file.gguf[@rev] or ollama://NAME[:TAG].")] = [],
    policy: Annotated[list[Path], typer.Option("--policy", help="Policy TOML to carry (validated).")] = [],
    file: Annotated[list[Path], typer.Option("--file", help="Any other file to carry.")] = [],
    requirements: Annotated[list[Path], typer.Option("--requirements", help="requirements.txt for the target.")] = [],
    wheel: Annotated[list[str], typer.Option("--wheel", help="A requirement like PKG==VER for the target.")] = [],
    wheelhouse: Annotated[list[Path], typer.Option("--wheelhouse", help="Directory of prebuilt wheels.")] = [],
    python: Annotated[str | None, typer.Option("--python", help="Target Python, e.g. 3.11 (default: this one).")] = None,
    platform: Annotated[
        list[str], typer.Option("--platform", help="Target platform tag, e.g. manylinux_2_28_x86_64; repeatable.")
    ] = [],
    accelerator: Annotated[
        str, typer.Option("--accelerator", help="Engine build the target runs: cpu, or cuda (NVIDIA; the target needs only the driver).")
    ] = "cpu",
    cuda_version: Annotated[str, typer.Option("--cuda-version", help="CUDA major (or major.minor) to build with.")] = "12",
    cuda_archs: Annotated[
        str, typer.Option("--cuda-archs", help="GPU architectures, e.g. 80,86,89,90 (Ampere, Ada, Hopper; the default).")
    ] = "80,86,89,90",
    vllm: Annotated[
        str | None, typer.Option("--vllm", help="Carry vLLM at this version (e.g. 0.9.0) and its CUDA wheels for the target.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With --accelerator cuda: print the engine's build inputs; with --vllm: "
                           "print the wheels pip resolves for the target (nothing downloaded). Then stop.")
    ] = False,
    sealbox_wheel: Annotated[
        bool | None,
        typer.Option("--sealbox-wheel/--no-sealbox-wheel", help="Carry sealbox's own wheel (default: with any wheels)."),
    ] = None,
    expires: Annotated[str, typer.Option("--expires", help="Validity: 90d, 12h, 2w, or a UTC date 2030-01-31.")] = "90d",
    max_part_size: Annotated[
        int,
        typer.Option(
            "--max-part-size",
            parser=_size_option,
            metavar="SIZE",
            help=f"Split blobs above this size, e.g. 512M ({SIZE_HELP}; default 4 GiB - 1 byte, the FAT32 limit).",
        ),
    ] = DEFAULT_MAX_PART_SIZE,
    hf_cache: Annotated[Path | None, typer.Option("--hf-cache", help="Hugging Face cache directory.")] = None,
    ollama_models: Annotated[
        Path | None, typer.Option("--ollama-models", help="Ollama store (default: $OLLAMA_MODELS, ~/.ollama/models).")
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option("--base", help="Earlier manifest.json (or bundle dir): make a delta carrying only new blobs."),
    ] = None,
    eval_suite: Annotated[
        Path | None, typer.Option("--eval-suite", help="Evaluation suite (TOML/JSON) that gates the install.")
    ] = None,
    record_expected: Annotated[
        bool, typer.Option("--record-expected", help="Record the suite's exact greedy outputs by serving the models here.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Pack models, wheels, policies and files into a signed, content-addressed bundle directory."""
    from sealbox.bundler.create import CreateRequest, create_bundle, parse_expiry  # deferred: verify starts faster without
    from sealbox.bundler.delta import BaseManifest, create_delta

    cuda = _cuda_spec(accelerator, cuda_version, cuda_archs, as_json)
    vllm_spec = _vllm_spec(vllm, as_json)
    if dry_run and vllm_spec is not None:
        _print_vllm_resolution(vllm_spec, _target(python, platform), wheelhouse, as_json)
        return
    if dry_run:
        _print_dry_run(cuda, out, wheelhouse)
        return
    now = datetime.now(timezone.utc).replace(microsecond=0)
    try:
        expiry = parse_expiry(expires, now)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--expires") from exc
    with _refusals(as_json):
        signers = [open_signer(path) for path in sign_key]
        request = CreateRequest(
            name=name,
            version=version,
            out=out,
            signers=signers,
            models=model,
            policies=policy,
            files=file,
            requirements=requirements,
            wheels=wheel,
            wheelhouses=wheelhouse,
            target=_target(python, platform),
            include_sealbox=sealbox_wheel,
            expires=expiry,
            max_part_size=max_part_size,
            hf_cache=hf_cache,
            ollama_store=ollama_models,
            eval_suite=eval_suite,
            record_expected=record_expected,
            now=now,
            cuda=cuda,
            vllm=vllm_spec,
        )
        base_manifest = BaseManifest.load(base) if base is not None else None
        with stderr_progress() as progress:
            if base_manifest is not None:
                result = create_delta(request, base_manifest, progress)
            else:
                result = create_bundle(request, progress)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    written, reused = format_size(result.bytes_written), format_size(result.bytes_reused)
    typer.echo(f"created {result.directory}: {name} version {version}, {len(result.manifest.blobs)} blobs")
    typer.echo(f"  written {written}, reused {reused} in {result.seconds:.1f} s")
    typer.echo(f"  manifest sha256 {result.manifest_sha256}, signed by {', '.join(result.signed_by)}")


def _cuda_spec(accelerator: str, cuda_version: str, cuda_archs: str, as_json: bool) -> Any:
    if accelerator not in ("cpu", "cuda"):
        raise typer.BadParameter(f"{accelerator!r} is not cpu or cuda", param_hint="--accelerator")
    if accelerator == "cpu":
        return None
    from sealbox.bundler.sources.cuda_engine import CudaEngineSpec

    with _refusals(as_json):
        return CudaEngineSpec.parse(cuda_version=cuda_version, archs=cuda_archs)


def _vllm_spec(text: str | None, as_json: bool) -> Any:
    if text is None:
        return None
    from sealbox.bundler.sources.vllm_stack import VllmSpec

    with _refusals(as_json):
        return VllmSpec.parse(text)


def _print_vllm_resolution(spec: Any, target: Target, wheelhouses: list[Path], as_json: bool) -> None:
    from sealbox.bundler.sources.vllm_stack import resolve_stack

    with _refusals(as_json):
        resolved = resolve_stack(spec, target, wheelhouses)
    if as_json:
        typer.echo(json.dumps({"engine": spec.requirement, "python": target.python, "platforms": list(target.platforms),
                               "wheels": [{"name": r.name, "version": r.version, "url": r.url} for r in resolved]}))
        return
    typer.echo(f"{spec.requirement} for Python {target.python} on {', '.join(target.platforms)}: {len(resolved)} wheels")
    for item in resolved:
        typer.echo(f"  {item.name}=={item.version}  {item.url}")


def _print_dry_run(cuda: Any, out: Path, wheelhouses: list[Path]) -> None:
    if cuda is None:
        from sealbox.bundler.sources.cuda_engine import ENGINE_PROJECT, engine_version

        typer.echo("accelerator: cpu")
        typer.echo(f"engine: {ENGINE_PROJECT}=={engine_version()} (sdist built by pip for this host's CPU)")
        return
    from sealbox.bundler.create import WORK_DIR
    from sealbox.bundler.sources.cuda_engine import CudaEngineRecipe

    recipe = CudaEngineRecipe(cuda, work=out / WORK_DIR / "cuda-engine", wheelhouses=wheelhouses)
    for line in recipe.dry_run():
        typer.echo(line)


@bundle_app.command("verify")
def verify(
    directory: Annotated[Path, typer.Argument(help="The bundle directory.")],
    trust: Annotated[list[Path], typer.Option("--trust", help="Trusted public key (.pub); repeatable.")],
    threshold: Annotated[int, typer.Option("--threshold", help="Distinct trusted keys that must have signed.")] = 1,
    full_digests: Annotated[
        bool, typer.Option("--full-digests", help="Also re-hash each split blob whole (slower: one stream per blob).")
    ] = False,
    workers: Annotated[int | None, typer.Option("--workers", help="Hashing threads (default: CPU count).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result or the refusal as JSON on stdout.")] = False,
) -> None:
    """Check signatures (M of N), expiry, paths, files, and every byte of every part. Exit 0 only if all hold."""
    with _refusals(as_json):
        trusted = _trusted(trust)
        _check_threshold(trusted, threshold)
        progress = stderr_progress()
        with progress:
            total = _carried_bytes(directory)
            with progress.bytes("verifying", total) as advance:
                result = verify_bundle(
                    directory,
                    trusted=trusted,
                    threshold=threshold,
                    workers=workers,
                    full_digests=full_digests,
                    on_bytes=advance,
                )
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    rate = result.bytes_checked / result.seconds / 1e9 if result.seconds else 0.0
    typer.echo(
        f"OK {result.manifest.name} version {result.manifest.version}: signed by {', '.join(result.signed_by)} "
        f"({len(result.signed_by)} of {threshold} required); {result.files_checked} files, "
        f"{format_size(result.bytes_checked)} checked in {result.seconds:.2f} s ({rate:.2f} GB/s); "
        f"expires {format_time(result.manifest.expires)}"
    )


def _carried_bytes(directory: Path) -> int:
    """Bytes to hash, from the unverified manifest, only to size a progress bar (the checks re-read it)."""
    try:
        return sum(entry.size for entry in read_unverified(directory)[1].carried())
    except (BundleError, OSError):
        return 0


@bundle_app.command("sign")
def sign(
    directory: Annotated[Path, typer.Argument(help="The bundle directory.")],
    sign_key: Annotated[list[Path], typer.Option("--sign-key", help="Private key (.key) to co-sign with; repeatable.")],
    trust: Annotated[list[Path], typer.Option("--trust", help="Also require existing signatures by these keys.")] = [],
    threshold: Annotated[int, typer.Option("--threshold", help="With --trust: distinct keys that must have signed.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Co-sign a bundle offline (two-person rule) after checking every byte of it against the manifest."""
    from sealbox.bundler.cosign import cosign_bundle

    with _refusals(as_json):
        signers = [open_signer(path) for path in sign_key]
        trusted = _trusted(trust)
        if trusted:
            _check_threshold(trusted, threshold)
        with stderr_progress() as progress:
            with progress.bytes("checking every part before signing", _carried_bytes(directory)) as advance:
                result = cosign_bundle(directory, signers, trusted=trusted, threshold=threshold, on_bytes=advance)
    if as_json:
        typer.echo(json.dumps({"ok": True, "added": list(result.added), "signed_by": list(result.signed_by)}))
        return
    typer.echo(f"signed {result.manifest.name} version {result.manifest.version} with {', '.join(result.added)}")
    typer.echo(f"  signatures now: {', '.join(result.signed_by)}")


@bundle_app.command("inspect")
def inspect(
    directory: Annotated[Path, typer.Argument(help="The bundle directory.")],
    trust: Annotated[list[Path], typer.Option("--trust", help="Show which signatures these keys verify.")] = [],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest and signatures as JSON.")] = False,
) -> None:
    """Show what a bundle holds. This reads the manifest only: it verifies nothing (use `bundle verify`)."""
    with _refusals(as_json):
        envelope, manifest = read_unverified(directory)
        trusted = _trusted(trust)
    check = check_signatures(envelope, trusted, 1) if trusted else None

    def state(keyid: str) -> str:
        if check is None:
            return "not checked"
        if keyid in check.valid:
            return "valid (trusted)"
        return "INVALID" if keyid in check.invalid else "untrusted key"

    signatures = [{"keyid": keyid, "status": state(keyid)} for keyid in sorted(envelope.signatures)]
    if as_json:
        typer.echo(json.dumps({"manifest": manifest.to_dict(), "signatures": signatures}))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    out = Console()
    target = manifest.target
    out.print(
        f"[bold]{escape(manifest.name)}[/] version {manifest.version}  created {format_time(manifest.created)}  "
        f"expires {format_time(manifest.expires)}"
    )
    out.print(f"target: Python {target.python} ({target.implementation}/{target.abi}) {', '.join(target.platforms[:3])}")
    if target.accelerator:
        archs = ", ".join(f"sm_{arch}" for arch in target.accelerator.get("cuda_archs") or [])
        engine = target.accelerator.get("engine", "")
        out.print(f"accelerator: {target.accelerator.get('accelerator')} {target.accelerator.get('cuda_version', '')} "
                  f"({archs}) {escape(str(engine))}")
    if manifest.base:
        out.print(f"delta on {manifest.base.name} version {manifest.base.version} ({manifest.base.manifest_sha256[:16]})")
    for item in signatures:
        out.print(f"signature {item['keyid']}: {item['status']}")
    table = Table("role", "path", "size", "parts", "sha256", "facts / provenance")
    for entry in manifest.blobs:
        facts = _facts(entry.role, entry.meta)
        table.add_row(
            entry.role,
            escape(entry.path) + (" (in base)" if entry.in_base else ""),
            format_size(entry.size),
            str(len(entry.parts)),
            entry.sha256[:16],
            escape(f"{facts}{' · ' if facts else ''}{entry.provenance}"),
        )
    out.print(table)


def _facts(role: str, meta: dict[str, Any]) -> str:
    keys = {
        "model": ("architecture", "parameter_count", "file_type", "context_length", "license"),
        "wheel": ("name", "version", "license"),
    }.get(role, ())
    return " ".join(f"{key}={meta[key]}" for key in keys if meta.get(key) not in (None, ""))
