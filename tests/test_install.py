"""`sealbox bundle install | list | rollback | gc`: verified bundles become releases; refusals change nothing."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from sealbox.bundler.errors import (
    DigestMismatchError,
    ExpiredError,
    SignatureError,
    SizeMismatchError,
    ThresholdError,
    UntrustedSignerError,
)
from sealbox.bundler.install import DowngradeDeclinedError, InstallRequest, RollbackError, install_bundle
from sealbox.bundler.manifest import MANIFEST_FILE
from sealbox.bundler.releases import Releases
from sealbox.bundler.trust import TrustStore
from install_support import Item, Publisher, app, audit_events, make_keys, model_item, runner, snapshot, trust, write_gguf
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.policy import default_policy_text



@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keys(tmp_path_factory.mktemp("keys"), "alice", "bob", "mallory")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {name: write_gguf(folder / f"{name}.gguf", seed=seed) for seed, name in enumerate(("alpha", "beta", "gamma"))}


@pytest.fixture
def publisher(keys: Path) -> Publisher:
    return Publisher(keys)


@pytest.fixture
def host(tmp_path: Path, keys: Path) -> HostRoot:
    return trust(tmp_path / "root", keys / "alice.pub")


def cli(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def install(host: HostRoot, bundle: Path, *extra: str, input: str | None = None):
    return cli("bundle", "install", str(bundle), "--root", str(host.path), "--json", *extra, input=input)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def current_label(host: HostRoot) -> str:
    return Path(os.readlink(host.current)).name


def publish_alpha_and(publisher: Publisher, models: dict[str, Path], tmp_path: Path, item: Item,
                      text: str) -> tuple[Path, Path]:  # fmt: skip
    """Version 1 of the bundle: the alpha model and `item`, whose source file is written with `text` first; returns the
    bundle and that source file."""
    item.file.write_text(text)
    return publisher.publish(tmp_path / "b1", [model_item(models["alpha"]), item], version=1), item.file


def test_install_builds_the_release_the_server_reads_and_makes_it_current(
    host: HostRoot, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    notes = Item("file", "files/notes.txt", tmp_path / "notes.txt")
    bundle, _ = publish_alpha_and(publisher, models, tmp_path, notes, "read me\n")
    result = install(host, bundle)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["release"], summary["activated"], summary["blobs_copied"]) == ("demo-1", True, 2)

    assert os.readlink(host.current) == "releases/demo-1"
    release = host.releases / "demo-1"
    assert json.loads((release / "release.json").read_text()) == {
        "name": "demo",
        "version": 1,
        "models": [{"name": "alpha", "path": "models/alpha.gguf", "sha256": sha256(models["alpha"]),
                    "origin": str(models["alpha"])}],  # the manifest's provenance travels with the model
        "policy": "policy.toml",
    }
    link = release / "models" / "alpha.gguf"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve() == host.store / sha256(models["alpha"])
    assert (host.current / "models" / "alpha.gguf").read_bytes() == models["alpha"].read_bytes()
    assert (release / "files" / "notes.txt").read_text() == "read me\n"
    assert (release / "manifest.json").read_bytes() == (bundle / MANIFEST_FILE).read_bytes()
    assert (release / "policy.toml").read_text() == default_policy_text()
    assert (release / "service" / "sealbox.service").read_text().count("IPAddressDeny=any") == 1
    assert 'oifname "lo" meta l4proto { tcp, udp } th dport { 8080 } accept' in (release / "service" / "sealbox-egress.nft").read_text()
    assert (release / "service" / "resolv.conf").is_file() and (release / "service" / "hosts").is_file()
    assert not (host.path / "staging").exists()
    assert "no virtualenv was built" in " ".join(summary["notes"])

    events = [event for event, _ in audit_events(host.path)]
    assert events[-2:] == ["bundle.install", "bundle.activate"]
    install_fields = audit_events(host.path)[-2][1]
    assert install_fields["manifest_sha256"] == summary["manifest_sha256"]
    assert (install_fields["name"], install_fields["version"]) == ("demo", 1)


def test_the_release_keeps_the_bundle_policy_in_force(
    host: HostRoot, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    site = Item("policy", "policies/site.toml", tmp_path / "site.toml")
    policy_text = '[service]\nuser = "llm"\nclient_networks = ["10.20.0.0/16"]\ngpu_devices = []\n'
    bundle, policy = publish_alpha_and(publisher, models, tmp_path, site, policy_text)
    assert install(host, bundle).exit_code == 0
    release = host.releases / "demo-1"
    assert (release / "policy.toml").read_text() == policy.read_text()
    unit = (release / "service" / "sealbox.service").read_text()
    assert "User=llm" in unit and "IPAddressAllow=localhost 10.20.0.0/16" in unit and "PrivateDevices=yes" in unit


def test_a_new_version_copies_only_new_blobs_and_switches_current(
    host: HostRoot, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    assert install(host, publisher.publish(tmp_path / "b1", [model_item(models["alpha"])], version=1)).exit_code == 0
    alpha = host.store / sha256(models["alpha"])
    inode = alpha.stat().st_ino
    b2 = publisher.publish(tmp_path / "b2", [model_item(models["alpha"]), model_item(models["beta"])], version=2)
    summary = json.loads(install(host, b2).stdout)
    assert (summary["blobs_copied"], summary["blobs_present"], summary["previous"]) == (1, 1, "demo-1")
    assert alpha.stat().st_ino == inode, "a blob already in the store is not copied again"
    assert current_label(host) == "demo-2"
    assert [m.name for m in Releases(host).current().release.models] == ["alpha", "beta"]


def test_list_shows_every_release_and_marks_the_current_one(
    host: HostRoot, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    for version, model in ((1, "alpha"), (2, "beta")):
        bundle = publisher.publish(tmp_path / f"b{version}", [model_item(models[model])], version=version)
        assert install(host, bundle).exit_code == 0
    listing = json.loads(cli("bundle", "list", "--root", str(host.path), "--json").stdout)
    assert listing["current"] == "demo-2"
    assert [(r["release"], r["current"], r["models"][0]["name"]) for r in listing["releases"]] == [
        ("demo-1", False, "alpha"),
        ("demo-2", True, "beta"),
    ]


def test_rollback_switches_current_back_and_is_recorded(
    host: HostRoot, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    for version, model in ((1, "alpha"), (2, "beta")):
        assert install(host, publisher.publish(tmp_path / f"b{version}", [model_item(models[model])], version=version)).exit_code == 0
    result = cli("bundle", "rollback", "--root", str(host.path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"ok": True, "from": "demo-2", "to": "demo-1"}
    assert current_label(host) == "demo-1"
    event, fields = audit_events(host.path)[-1]
    assert (event, fields["from"], fields["to"]) == ("bundle.rollback", "demo-2", "demo-1")
    again = cli("bundle", "rollback", "--root", str(host.path))
    assert again.exit_code == 23 and "oldest installed release" in again.output


def test_install_keeps_the_last_n_releases_and_drops_blobs_only_they_used(
    host: HostRoot, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    policy = tmp_path / "keep2.toml"
    policy.write_text("[releases]\nkeep = 2\n")
    for version, model in enumerate(("alpha", "beta", "gamma"), start=1):
        items = [model_item(models[model]), Item("policy", "policies/keep2.toml", policy)]
        summary = json.loads(install(host, publisher.publish(tmp_path / f"b{version}", items, version=version)).stdout)
    assert summary["gc"]["releases_removed"] == ["demo-1"]
    assert summary["gc"]["blobs_removed"] == [sha256(models["alpha"])]
    assert sorted(p.name for p in host.releases.iterdir() if not p.name.startswith(".")) == ["demo-2", "demo-3"]
    assert (host.store / sha256(models["beta"])).exists() and (host.store / sha256(models["gamma"])).exists()
    assert (host.store / sha256(policy)).exists(), "a blob every kept release uses stays"


def test_gc_never_removes_the_current_release(
    host: HostRoot, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    for version, model in enumerate(("alpha", "beta", "gamma"), start=1):
        assert install(host, publisher.publish(tmp_path / f"b{version}", [model_item(models[model])], version=version)).exit_code == 0
    assert cli("bundle", "rollback", "demo-1", "--root", str(host.path)).exit_code == 0
    result = json.loads(cli("bundle", "gc", "--keep", "1", "--root", str(host.path), "--json").stdout)
    assert result["releases_removed"] == ["demo-2"]
    assert sorted(result["blobs_removed"]) == sorted([sha256(models["beta"])])
    assert current_label(host) == "demo-1"
    assert (host.current / "models" / "alpha.gguf").read_bytes() == models["alpha"].read_bytes()
    assert {r.label for r in Releases(host).all()} == {"demo-1", "demo-3"}


def test_installing_the_current_bundle_again_checks_it_and_changes_nothing(
    host: HostRoot, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    bundle = publisher.publish(tmp_path / "b1", [model_item(models["alpha"])], version=1)
    assert install(host, bundle).exit_code == 0
    before = snapshot(host.path)
    summary = json.loads(install(host, bundle).stdout)
    assert (summary["activated"], summary["resumed"], summary["blobs_copied"]) == (False, True, 0)
    assert snapshot(host.path) == before


def test_allow_downgrade_installs_an_older_version_once_confirmed_and_records_it(
    host: HostRoot, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    assert install(host, publisher.publish(tmp_path / "b5", [model_item(models["beta"])], version=5)).exit_code == 0
    older = publisher.publish(tmp_path / "b4", [model_item(models["alpha"])], version=4)
    result = install(host, older, "--allow-downgrade", input="y\n")
    assert result.exit_code == 0, result.output
    assert "not above version 5" in result.output  # the question the operator answered
    assert json.loads(result.stdout.splitlines()[-1])["downgrade"] is True
    assert current_label(host) == "demo-4"
    assert Releases(host).current().install.downgrade is True
    install_event = [f for e, f in audit_events(host.path) if e == "bundle.install"][-1]
    assert install_event["downgrade"] is True and install_event["version"] == 4
    # The floor stays at 5: version 4.5 does not exist, but a version 5 re-signed differently is still refused.
    assert Releases(host).highest("demo") == 5


def test_a_two_person_threshold_needs_both_signatures(
    host: HostRoot, publisher: Publisher, models: dict[str, Path], tmp_path: Path, keys: Path
) -> None:
    store = TrustStore(host)
    store.add(keys / "bob.pub")
    store.set_threshold(2)
    bundle = publisher.publish(tmp_path / "b1", [model_item(models["alpha"])], version=1, signers=("alice", "bob"))
    assert install(host, bundle).exit_code == 0


# -- refusals: each one leaves <root> byte-identical apart from the audit log -----------------------------------


def _edit_manifest(bundle: Path) -> None:
    envelope = json.loads((bundle / MANIFEST_FILE).read_bytes())
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["version"] = 99
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    (bundle / MANIFEST_FILE).write_text(json.dumps(envelope))


def _flip_byte(bundle: Path, digest: str) -> None:
    parts = sorted((bundle / "blobs" / "sha256").glob(f"{digest}*"))
    data = bytearray(parts[-1].read_bytes())
    data[len(data) // 2] ^= 0x01
    parts[-1].write_bytes(bytes(data))


def _truncate(bundle: Path, digest: str) -> None:
    part = sorted((bundle / "blobs" / "sha256").glob(f"{digest}*"))[0]
    part.write_bytes(part.read_bytes()[:-10])


REFUSALS = {
    "bad-signature": (SignatureError, "does not match the manifest"),
    "untrusted-key": (UntrustedSignerError, "no signature by a trusted key"),
    "below-threshold": (ThresholdError, "signed by 1 of the 2 required"),
    "downgrade": (RollbackError, "rollback protection"),
    "downgrade-declined": (DowngradeDeclinedError, "was not confirmed"),
    "same-version-other-content": (RollbackError, "already holds a different bundle"),
    "expired": (ExpiredError, "expired at"),
    "tampered-new-blob": (DigestMismatchError, "is not the signed"),
    "tampered-blob-in-store": (DigestMismatchError, "is corrupt"),
    "truncated-part": (SizeMismatchError, "(truncated)"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_refused_bundle_leaves_the_root_byte_identical_apart_from_the_audit_log(
    case: str, host: HostRoot, publisher: Publisher, models: dict[str, Path], tmp_path: Path, keys: Path
) -> None:
    assert install(host, publisher.publish(tmp_path / "b3", [model_item(models["alpha"])], version=3)).exit_code == 0
    new_model = models["beta"]
    items = [model_item(models["alpha"]), model_item(new_model)]
    extra: tuple[str, ...] = ()
    answer = None
    version, signers, created = 4, ("alice",), None
    if case == "untrusted-key":
        signers = ("mallory",)
    elif case == "below-threshold":
        TrustStore(host).add(keys / "bob.pub")
        TrustStore(host).set_threshold(2)
    elif case == "downgrade":
        version = 2
    elif case == "downgrade-declined":
        version, extra, answer = 2, ("--allow-downgrade",), "n\n"
    elif case == "same-version-other-content":
        version = 3
    elif case == "expired":
        created = datetime.now(timezone.utc) - timedelta(days=40)
    bundle = publisher.publish(
        tmp_path / "candidate", items, version=version, signers=signers, created=created, max_part_size=1024
    )
    if case == "bad-signature":
        _edit_manifest(bundle)
    elif case == "tampered-new-blob":
        _flip_byte(bundle, sha256(new_model))
    elif case == "tampered-blob-in-store":
        _flip_byte(bundle, sha256(models["alpha"]))
    elif case == "truncated-part":
        _truncate(bundle, sha256(new_model))
    before = snapshot(host.path)
    events_before = len(audit_events(host.path))

    result = install(host, bundle, *extra, input=answer)

    error, fragment = REFUSALS[case]
    assert result.exit_code == error.exit_code, result.output
    refusal = json.loads(result.stdout.splitlines()[-1])
    assert refusal["ok"] is False and refusal["error"] == error.__name__
    assert fragment in refusal["message"]
    assert snapshot(host.path) == before
    events = audit_events(host.path)
    assert len(events) == events_before + 1
    event, fields = events[-1]
    assert event == "bundle.refused" and fields["error"] == error.__name__ and fragment in str(fields["reason"])
    assert current_label(host) == "demo-3"


def test_install_refuses_when_no_key_is_trusted(publisher: Publisher, models: dict[str, Path], tmp_path: Path) -> None:
    bundle = publisher.publish(tmp_path / "b1", [model_item(models["alpha"])], version=1)
    host = HostRoot(tmp_path / "empty-root")
    result = install(host, bundle)
    assert result.exit_code == 22 and "holds no key" in result.output
    assert snapshot(host.path) == {}


def test_the_api_refuses_a_downgrade_nobody_could_confirm(
    host: HostRoot, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    install_bundle(InstallRequest(bundle=publisher.publish(tmp_path / "b2", [model_item(models["beta"])], version=2), root=host))
    older = publisher.publish(tmp_path / "b1", [model_item(models["alpha"])], version=1)
    with pytest.raises(DowngradeDeclinedError):
        install_bundle(InstallRequest(bundle=older, root=host, allow_downgrade=True))
