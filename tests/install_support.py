"""What the install tests share: a publisher that signs real bundles, tiny GGUF files, root snapshots, audit events.

The publisher packs with `bundle create`'s own blob writer and signs a real DSSE envelope with Ed25519 keys, but
takes the manifest's fields directly, so a test can make the bundles a publisher could make on purpose or by
mistake (an old version, an expired one, a delta) without going through `create`'s input checks.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import typer
from typer.testing import CliRunner

import sealbox.bundler.cli.install  # noqa: F401  (adds install, list, rollback, gc to bundle_app)
from sealbox.bundler.blobs import BlobWriter
from sealbox.bundler.cli.bundle import bundle_app
from sealbox.bundler.cli.trust import trust_app
from sealbox.bundler.keys import generate_key_pair, load_signer
from sealbox.bundler.manifest import MANIFEST_FILE, Base, BlobEntry, Manifest, Target
from sealbox.bundler.signing import envelope_bytes, new_envelope, sign
from sealbox.runtime.durable_file import write_atomically
from sealbox.runtime.hostroot import HostRoot

REPO = Path(__file__).resolve().parents[1]

app = typer.Typer()
"""`sealbox bundle …` and `sealbox trust …` in this process, for `runner.invoke(app, [...])`."""
app.add_typer(bundle_app, name="bundle")
app.add_typer(trust_app, name="trust")
runner = CliRunner(env={"COLUMNS": "400"})  # no wrapping inside rich error panels


def write_gguf(path: Path, *, seed: int, values: int = 1000) -> Path:
    """A small, real GGUF file (llama architecture, one f32 tensor of seeded random values)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    writer.add_tensor("weights", np.random.default_rng(seed).standard_normal(values).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_keys(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        generate_key_pair(name, folder, passphrase=None)
    return folder


@dataclass
class Item:
    role: str
    path: str
    file: Path
    in_base: bool = False
    meta: dict[str, object] = field(default_factory=dict)


@dataclass
class Publisher:
    """Signs bundles with the keys in `keys` (files `<name>.key`)."""

    keys: Path

    def publish(
        self,
        out: Path,
        items: list[Item],
        *,
        name: str = "demo",
        version: int,
        signers: tuple[str, ...] = ("alice",),
        created: datetime | None = None,
        lifetime: timedelta = timedelta(days=30),
        max_part_size: int = 1 << 30,
        base: Base | None = None,
    ) -> Path:
        created = (created or datetime.now(timezone.utc)).replace(microsecond=0)
        work = out.parent / f".{out.name}.work"
        writer = BlobWriter(out, work_dir=work, max_part_size=max_part_size, durable=False)
        entries = []
        for item in items:
            blob = writer.write(item.file)
            entries.append(
                BlobEntry(
                    role=item.role,  # type: ignore[arg-type]
                    path=item.path,
                    size=blob.size,
                    sha256=blob.sha256,
                    parts=blob.parts,
                    meta=dict(item.meta),
                    provenance=str(item.file),
                    in_base=item.in_base,
                )
            )
        for entry in entries:
            if entry.in_base and not any(e.sha256 == entry.sha256 and not e.in_base for e in entries):
                for part in entry.part_files():
                    (out / part).unlink()
        manifest = Manifest(name, version, created, created + lifetime, Target.host(), tuple(entries), base)
        envelope = new_envelope(manifest.canonical_bytes())
        for signer in signers:
            sign(envelope, load_signer(self.keys / f"{signer}.key", passphrase=None))
        write_atomically(out / MANIFEST_FILE, envelope_bytes(envelope), mode=0o644)
        shutil.rmtree(work)
        return out


def model_item(path: Path, **kw: object) -> Item:
    return Item("model", f"models/{path.name}", path, **kw)  # type: ignore[arg-type]


def snapshot(root: Path, *, skip: tuple[str, ...] = ("audit",)) -> dict[str, tuple[str, int, bytes | str]]:
    """Every path under `root` (but `skip`) with its type, mode and bytes (or link target): equal means identical."""
    found: dict[str, tuple[str, int, bytes | str]] = {}
    if not root.exists():
        return found
    for directory, dirs, files in os.walk(root):
        rel_dir = Path(directory).relative_to(root)
        if rel_dir.parts and rel_dir.parts[0] in skip:
            continue
        for name in sorted(dirs + files):
            path = Path(directory) / name
            rel = str(rel_dir / name)
            if rel in skip:
                continue
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                found[rel] = ("link", stat.S_IMODE(info.st_mode), os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                found[rel] = ("dir", stat.S_IMODE(info.st_mode), b"")
            else:
                found[rel] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
    return found


def audit_events(root: Path) -> list[tuple[str, dict[str, object]]]:
    """(event, fields) of every record in `<root>/audit/`, in chain order."""
    records = []
    for segment in sorted((root / "audit").glob("segment-*.jsonl")):
        for line in segment.read_bytes().splitlines():
            data = json.loads(line)
            records.append((data["event"], data["fields"]))
    return records


def trust(root: Path, *public_keys: Path) -> HostRoot:
    from sealbox.bundler.trust import TrustStore

    host = HostRoot(root)
    store = TrustStore(host)
    for key in public_keys:
        store.add(key)
    return host
