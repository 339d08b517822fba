"""`sealbox keys mesh`: the mutual-TLS keys of a gateway and its engine hosts (see bundler/mesh_keys.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sealbox.bundler.mesh_keys import HOST_DAYS, create_mesh_keys, install_mesh_keys
from sealbox.bundler.releases import policy_in_force
from sealbox.runtime.cli.refusal import refuse
from sealbox.runtime.exit_codes import ExitCode
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.mesh.host_identity import MeshIdentityError
from sealbox.runtime.policy import Policy, PolicyError

mesh_app = typer.Typer(help="Mutual-TLS keys of a gateway and its engine hosts ([mesh] in the policy).",
                       no_args_is_help=True)  # fmt: skip


@mesh_app.command("create")
def create(
    policy: Annotated[
        Path, typer.Option("--policy", help="The bundle's policy, whose [mesh] names the hosts; the CA pin goes in.")
    ],
    ca_dir: Annotated[
        Path, typer.Option("--ca-dir", help="Where the mesh CA's key lives (made once, reused; stays on this host).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory for the key packages: OUT/<host>/, one per host.")],
    days: Annotated[int, typer.Option("--days", min=1, help="Validity of the host certificates.")] = HOST_DAYS,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Make the mesh CA (or reuse it), a certificate and key per host, and pin the CA in the policy."""
    try:
        created = create_mesh_keys(policy, ca_dir=ca_dir, out=out, days=days)
    except PolicyError as exc:
        raise refuse(exc, ExitCode.USAGE) from exc
    except (MeshIdentityError, OSError) as exc:
        raise refuse(exc, ExitCode.MESH_KEYS) from exc
    if as_json:
        typer.echo(json.dumps({"ca_sha256": created.ca_sha256, "ca_created": created.ca_created,
                               "packages": {name: str(path) for name, path in created.packages.items()}}))  # fmt: skip
        return
    typer.echo(f"mesh CA {created.ca_sha256} ({'new' if created.ca_created else 'reused'}), pinned in {policy}")
    for name, path in created.packages.items():
        typer.echo(f"  {name}: {path}  (carry to {name} only; it holds the host's private key)")


@mesh_app.command("install")
def install(
    package: Annotated[Path, typer.Argument(help="This host's key package (OUT/<host>/ from `keys mesh create`).")],
    host: Annotated[str, typer.Option("--host", help="This host's name in the policy's [mesh].")],
    root: Annotated[
        Path | None, typer.Option("--root", help="Appliance root (its live release's policy is used).")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="Use this policy instead of the live release's.")
    ] = None,
) -> None:
    """Check this host's key package against the policy's mesh CA and install it for the service user."""
    try:
        in_force = Policy.load(policy) if policy is not None else policy_in_force(HostRoot.resolve(root))
        written = install_mesh_keys(package, in_force, host)
    except PolicyError as exc:
        raise refuse(exc, ExitCode.USAGE) from exc
    except (MeshIdentityError, OSError) as exc:
        raise refuse(exc, ExitCode.MESH_KEYS) from exc
    for path in written:
        typer.echo(f"installed {path}")
