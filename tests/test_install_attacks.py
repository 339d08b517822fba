"""Releases under attack, played through the real `sealbox` command in a child process: only what was signed goes live.

The attacker is a local user who can write the appliance's files, or who hands the operator a stale bundle: an older
bundle under another name, a flipped byte in a store blob, a release only a since-removed key signed, signed JSON with
a repeated key, a FIFO where a file belongs, a umask of 000. Each test fails when the check it names is removed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from install_support import Item, Publisher, audit_events, make_keys, model_item, write_gguf
from sealbox.bundler.manifest import MANIFEST_FILE, Base, canonical_json
from sealbox.bundler.keys import load_signer
from sealbox.bundler.signing import envelope_bytes, new_envelope, sign
from sealbox.runtime.policy import default_policy_text

REPO = Path(__file__).resolve().parents[1]
SEALBOX = [sys.executable, "-c", "import sys; from sealbox.cli import main; sys.argv[0] = 'sealbox'; main()"]
TIMEOUT = 60
"""A FIFO opened with a blocking `open` would hang the command: the timeout turns that into a failure."""
OPEN_EGRESS = default_policy_text().replace('allow = ["127.0.0.0/8", "::1/128"]', 'allow = ["0.0.0.0/0", "::/0"]')


def sealbox(*args: str, stdin: str | None = None, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run `sealbox ARGS` in a child; stdin is empty (no terminal, nothing to answer with) unless given."""
    env = {k: v for k, v in os.environ.items() if k != "SEALBOX_ROOT"} | {"COLUMNS": "400"}
    return subprocess.run(
        [*SEALBOX, *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        env=env,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
        check=False,
    )


def install(root: Path, bundle: Path, *extra: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return sealbox("bundle", "install", str(bundle), "--root", str(root), "--json", *extra, stdin=stdin)


def refusal(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_refused_and_recorded(root: Path, result: subprocess.CompletedProcess[str], error: str, exit_code: int) -> None:
    """The install was refused with `error` and its own exit code, and the audit log's last event says so."""
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert refusal(result)["error"] == error
    event, fields = audit_events(root)[-1]
    assert event == "bundle.refused" and fields["error"] == error and fields["exit_code"] == exit_code


def current(root: Path) -> str:
    return Path(os.readlink(root / "current")).name


def flip_byte(path: Path) -> None:
    """Flip one byte in place, same size (a store blob is 0444: the attacker owns the file or is root)."""
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def digest_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_keys(tmp_path_factory.mktemp("keys"), "alice", "bob")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {name: write_gguf(folder / f"{name}.gguf", seed=seed) for seed, name in enumerate(("alpha", "beta", "gamma"))}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "policy.toml").write_text(default_policy_text(), encoding="utf-8")
    (folder / "open.toml").write_text(OPEN_EGRESS, encoding="utf-8")
    (folder / "notes.txt").write_text("what the operator reads before serving\n" * 20, encoding="utf-8")
    return {path.stem: path for path in folder.iterdir()}


@pytest.fixture
def publisher(keys: Path) -> Publisher:
    return Publisher(keys)


@pytest.fixture
def root(tmp_path: Path, keys: Path) -> Path:
    path = tmp_path / "root"
    assert sealbox("trust", "add", str(keys / "alice.pub"), "--root", str(path)).returncode == 0
    return path


# -- 1. rollback protection is appliance-wide ------------------------------------------------------------------


def test_an_older_bundle_under_another_name_that_opens_egress_never_becomes_current(
    root: Path, publisher: Publisher, models: dict[str, Path], files: dict[str, Path], tmp_path: Path
) -> None:
    assert install(root, publisher.publish(tmp_path / "demo5", [model_item(models["alpha"])], version=5)).returncode == 0
    stale = publisher.publish(
        tmp_path / "stale", [model_item(models["beta"]), Item("policy", "policy.toml", files["open"])], name="other", version=1
    )
    result = install(root, stale)
    assert_refused_and_recorded(root, result, "NameChangeError", 20)
    assert "runs bundles named demo" in result.stderr
    assert current(root) == "demo-5" and not (root / "releases" / "other-1").exists()


def test_replacing_the_bundle_name_is_refused_without_a_terminal_to_confirm_it_and_recorded(
    root: Path, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    assert install(root, publisher.publish(tmp_path / "demo1", [model_item(models["alpha"])], version=1)).returncode == 0
    other = publisher.publish(tmp_path / "other", [model_item(models["beta"])], name="other", version=9)
    result = install(root, other, "--replace-name", "--yes")  # --yes answers a downgrade, never a name change
    assert_refused_and_recorded(root, result, "NameChangeDeclinedError", 28)
    assert current(root) == "demo-1"


def test_a_confirmed_name_replacement_is_recorded_and_the_old_name_cannot_come_back_as_a_side_effect(
    root: Path, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    assert install(root, publisher.publish(tmp_path / "demo3", [model_item(models["alpha"])], version=3)).returncode == 0
    other = publisher.publish(tmp_path / "other", [model_item(models["beta"])], name="other", version=1)
    result = install(root, other, "--replace-name", stdin="y\n")
    assert result.returncode == 0, result.stderr
    assert current(root) == "other-1"
    replaced = [fields for event, fields in audit_events(root) if event == "bundle.replace_name"]
    assert replaced == [{"from": "demo", "to": "other", "version": 1, "manifest_sha256": refusal(result)["manifest_sha256"]}]
    # The old name, even at a newer version, is again a replacement: asked, not installed on the side.
    back = install(root, publisher.publish(tmp_path / "demo4", [model_item(models["gamma"])], version=4))
    assert back.returncode == 20 and refusal(back)["error"] == "NameChangeError"
    # And its own floor still holds: demo version 2 is below the demo 3 this appliance once ran.
    older = install(root, publisher.publish(tmp_path / "demo2", [model_item(models["gamma"])], version=2),
                    "--replace-name", stdin="y\n")  # fmt: skip
    assert older.returncode == 20 and "not above version 3" in older.stderr
    assert current(root) == "other-1"


def test_a_declined_downgrade_exits_with_its_own_code_and_is_recorded(
    root: Path, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    assert install(root, publisher.publish(tmp_path / "b2", [model_item(models["alpha"])], version=2)).returncode == 0
    result = install(root, publisher.publish(tmp_path / "b1", [model_item(models["beta"])], version=1), "--allow-downgrade")
    assert_refused_and_recorded(root, result, "DowngradeDeclinedError", 28)
    assert "Aborted" not in result.stderr
    assert current(root) == "demo-2"


# -- 2. blobs reused from the store are re-verified ---------------------------------------------------------------


def install_model_policy_and_notes(
    root: Path, publisher: Publisher, models: dict[str, Path], files: dict[str, Path], tmp_path: Path
) -> list[Item]:
    """Release 1 (the alpha model, a policy and a notes file), installed; returns its items for the next release."""
    items = [model_item(models["alpha"]), Item("policy", "policy.toml", files["policy"]), Item("file", "notes.txt", files["notes"])]
    assert install(root, publisher.publish(tmp_path / "b1", items, version=1)).returncode == 0
    return items


def test_a_store_blob_with_one_flipped_byte_never_goes_live_in_the_next_release(
    root: Path, publisher: Publisher, models: dict[str, Path], files: dict[str, Path], tmp_path: Path
) -> None:
    items = install_model_policy_and_notes(root, publisher, models, files, tmp_path)
    store = root / "store" / "sha256"
    flip_byte(store / digest_of(files["policy"]))
    flip_byte(store / digest_of(files["notes"]))
    flip_byte(store / digest_of(models["alpha"]))
    items[0] = model_item(models["beta"])
    items.append(model_item(models["alpha"]))
    result = install(root, publisher.publish(tmp_path / "b2", items, version=2))
    assert result.returncode == 0, result.stderr
    live = root / "current"
    assert (live / "policy.toml").read_bytes() == files["policy"].read_bytes()
    assert (live / "notes.txt").read_bytes() == files["notes"].read_bytes()
    assert (live / "models" / "alpha.gguf").read_bytes() == models["alpha"].read_bytes()
    assert refusal(result)["blobs_copied"] == 4  # beta, and the three tampered blobs taken from the verified bundle


def test_a_delta_whose_base_blob_was_tampered_in_the_store_is_refused(
    root: Path, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    first = install(root, publisher.publish(tmp_path / "b1", [model_item(models["alpha"])], version=1))
    assert first.returncode == 0
    base = Base("demo", 1, refusal(first)["manifest_sha256"])
    flip_byte(root / "store" / "sha256" / digest_of(models["alpha"]))
    delta = publisher.publish(
        tmp_path / "d2", [model_item(models["alpha"], in_base=True), model_item(models["beta"])], version=2, base=base
    )
    result = install(root, delta)
    assert result.returncode == 19, result.stderr
    assert refusal(result)["error"] == "DigestMismatchError" and "the store's copy of models/alpha.gguf" in result.stderr
    assert current(root) == "demo-1"


def test_the_doctor_checks_the_policy_and_every_file_of_the_release_against_the_signed_digests(
    root: Path, publisher: Publisher, models: dict[str, Path], files: dict[str, Path], tmp_path: Path
) -> None:
    install_model_policy_and_notes(root, publisher, models, files, tmp_path)

    def release_files() -> dict[str, object]:
        done = sealbox("doctor", "--root", str(root), "--json")
        return next(c for c in json.loads(done.stdout)["checks"] if c["name"] == "release-files")

    assert release_files()["status"] == "pass"
    policy = root / "current" / "policy.toml"
    os.chmod(policy, 0o644)
    policy.write_text(policy.read_text().replace('"127.0.0.0/8", "::1/128"', '"0.0.0.0/0",  "::/0"    '))
    assert policy.stat().st_size == files["policy"].stat().st_size
    flip_byte(root / "store" / "sha256" / digest_of(files["notes"]))
    check = release_files()
    assert check["status"] == "fail"
    assert [line.split(":")[0] for line in check["details"]] == ["policy.toml", "notes.txt"]


# -- 3. rollback honours the trust store as it is now --------------------------------------------------------------


def test_rollback_refuses_a_release_only_a_removed_key_signed_unless_overridden_on_record(
    root: Path, publisher: Publisher, models: dict[str, Path], keys: Path, tmp_path: Path
) -> None:
    assert sealbox("trust", "add", str(keys / "bob.pub"), "--root", str(root)).returncode == 0
    assert install(root, publisher.publish(tmp_path / "b1", [model_item(models["alpha"])], version=1, signers=("bob",))).returncode == 0
    assert install(root, publisher.publish(tmp_path / "b2", [model_item(models["beta"])], version=2)).returncode == 0
    assert sealbox("trust", "remove", "bob", "--root", str(root)).returncode == 0

    refused = sealbox("bundle", "rollback", "--root", str(root))
    assert refused.returncode == 30, refused.stderr
    assert "demo-1 is not signed as the trust store now requires" in refused.stderr
    assert current(root) == "demo-2"

    done = sealbox("bundle", "rollback", "--root", str(root), "--allow-untrusted")
    assert done.returncode == 0, done.stderr
    assert current(root) == "demo-1"
    event, fields = audit_events(root)[-1]
    assert event == "bundle.rollback" and "no signature by a trusted key" in str(fields["untrusted_override"])


def test_rollback_to_a_release_signed_by_a_trusted_key_records_who_signed_it(
    root: Path, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    assert install(root, publisher.publish(tmp_path / "b1", [model_item(models["alpha"])], version=1)).returncode == 0
    assert install(root, publisher.publish(tmp_path / "b2", [model_item(models["beta"])], version=2)).returncode == 0
    assert sealbox("bundle", "rollback", "--root", str(root)).returncode == 0
    event, fields = audit_events(root)[-1]
    assert event == "bundle.rollback" and fields["to"] == "demo-1" and len(fields["signed_by"]) == 1
    assert fields["untrusted_override"] is None


# -- 4. duplicate keys in signed JSON ------------------------------------------------------------------------------


def _resign(bundle: Path, keys: Path, payload: bytes) -> None:
    envelope = new_envelope(payload)
    sign(envelope, load_signer(keys / "alice.key", passphrase=None))
    (bundle / MANIFEST_FILE).write_bytes(envelope_bytes(envelope))


def _payload(bundle: Path) -> dict[str, object]:
    return json.loads(base64.b64decode(json.loads((bundle / MANIFEST_FILE).read_bytes())["payload"]))


def test_a_signed_payload_that_names_a_key_twice_is_refused(
    root: Path, publisher: Publisher, models: dict[str, Path], keys: Path, tmp_path: Path
) -> None:
    bundle = publisher.publish(tmp_path / "b", [model_item(models["alpha"])], version=2)
    text = canonical_json(_payload(bundle)).decode()
    _resign(bundle, keys, text.replace('"version":2', '"version":1,"version":2').encode())  # validly signed, ambiguous
    for result in (sealbox("bundle", "verify", str(bundle), "--trust", str(keys / "alice.pub")), install(root, bundle)):
        assert result.returncode == 10, result.stderr
        assert "'version' appears twice" in result.stderr


def test_an_envelope_that_names_a_key_twice_is_refused(
    publisher: Publisher, models: dict[str, Path], keys: Path, tmp_path: Path
) -> None:
    bundle = publisher.publish(tmp_path / "b", [model_item(models["alpha"])], version=2)
    envelope = json.loads((bundle / MANIFEST_FILE).read_bytes())
    other = publisher.publish(tmp_path / "other", [model_item(models["beta"])], version=9)
    decoy = json.loads((other / MANIFEST_FILE).read_bytes())["payload"]
    text = json.dumps(envelope)
    (bundle / MANIFEST_FILE).write_text(text.replace('"payload": ', f'"payload": "{decoy}", "payload": ', 1))
    result = sealbox("bundle", "verify", str(bundle), "--trust", str(keys / "alice.pub"))
    assert result.returncode == 10 and "'payload' appears twice" in result.stderr
    envelope["signatures"] = envelope["signatures"] * 2
    (bundle / MANIFEST_FILE).write_text(json.dumps(envelope))
    result = sealbox("bundle", "verify", str(bundle), "--trust", str(keys / "alice.pub"))
    assert result.returncode == 10 and "two signatures name the same keyid" in result.stderr


# -- 5. a FIFO (or symlink) where a file belongs -------------------------------------------------------------------


def _fifo_in_place_of(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def test_verify_refuses_a_fifo_manifest_or_part_without_hanging(
    publisher: Publisher, models: dict[str, Path], keys: Path, tmp_path: Path
) -> None:
    bundle = publisher.publish(tmp_path / "b", [model_item(models["alpha"])], version=1)
    part = bundle / "blobs" / "sha256" / digest_of(models["alpha"])
    _fifo_in_place_of(part)
    result = sealbox("bundle", "verify", str(bundle), "--trust", str(keys / "alice.pub"))
    assert result.returncode == 15 and "FIFO" in result.stderr
    _fifo_in_place_of(bundle / MANIFEST_FILE)
    result = sealbox("bundle", "verify", str(bundle), "--trust", str(keys / "alice.pub"))
    assert result.returncode == 15 and "manifest.json" in result.stderr and "FIFO" in result.stderr


def test_install_refuses_a_fifo_manifest_without_hanging(
    root: Path, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    bundle = publisher.publish(tmp_path / "b", [model_item(models["alpha"])], version=1)
    _fifo_in_place_of(bundle / MANIFEST_FILE)
    result = install(root, bundle)
    assert result.returncode == 15 and "FIFO" in result.stderr
    assert not (root / "current").exists()


def test_install_with_the_root_lock_held_never_blocks_on_a_fifo_in_the_releases_or_the_store(
    root: Path, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    assert install(root, publisher.publish(tmp_path / "b1", [model_item(models["alpha"])], version=1)).returncode == 0
    decoy = root / "releases" / "demo-0"
    decoy.mkdir()
    os.mkfifo(decoy / "release.json")
    os.mkfifo(decoy / "install.json")
    store_blob = root / "store" / "sha256" / digest_of(models["alpha"])
    _fifo_in_place_of(store_blob)
    result = install(root, publisher.publish(tmp_path / "b2", [model_item(models["alpha"]), model_item(models["beta"])], version=2))
    assert result.returncode == 0, result.stderr
    assert stat.S_ISREG(store_blob.lstat().st_mode)  # replaced by the bundle's verified copy
    assert (root / "current" / "models" / "alpha.gguf").read_bytes() == models["alpha"].read_bytes()


def test_a_fifo_manifest_in_the_live_release_never_hangs_rollback_or_the_doctor(
    root: Path, publisher: Publisher, models: dict[str, Path], tmp_path: Path
) -> None:
    assert install(root, publisher.publish(tmp_path / "b1", [model_item(models["alpha"])], version=1)).returncode == 0
    assert install(root, publisher.publish(tmp_path / "b2", [model_item(models["beta"])], version=2)).returncode == 0
    manifest = root / "releases" / "demo-1" / MANIFEST_FILE
    os.chmod(manifest.parent, 0o755)
    _fifo_in_place_of(manifest)
    result = sealbox("bundle", "rollback", "--root", str(root))
    assert result.returncode == 30 and "FIFO" in result.stderr
    assert current(root) == "demo-2"


def test_trust_add_refuses_a_fifo_or_a_symlink_without_hanging(root: Path, keys: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "bob.pub"
    os.mkfifo(fifo)
    result = sealbox("trust", "add", str(fifo), "--root", str(root))
    assert result.returncode == 22 and "FIFO" in result.stderr
    link = tmp_path / "link.pub"
    link.symlink_to(keys / "bob.pub")
    result = sealbox("trust", "add", str(link), "--root", str(root))
    assert result.returncode == 22 and "symlink" in result.stderr


# -- 6. modes are set, not inherited from the umask ----------------------------------------------------------------


def _writable_by_others(path: Path) -> bool:
    return bool(stat.S_IMODE(path.lstat().st_mode) & 0o022)


def test_under_umask_000_nothing_the_appliance_trusts_is_group_or_world_writable(
    publisher: Publisher, models: dict[str, Path], files: dict[str, Path], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    generated = sealbox("keys", "generate", "carol", "--out", str(keys), "--no-encryption", umask=0)
    assert generated.returncode == 0, generated.stderr
    assert stat.S_IMODE((keys / "carol.key").stat().st_mode) == 0o600
    assert not _writable_by_others(keys) and not _writable_by_others(keys / "carol.pub")
    root = tmp_path / "root"
    assert sealbox("trust", "add", str(keys / "carol.pub"), "--root", str(root), umask=0).returncode == 0
    assert sealbox("trust", "threshold", "1", "--root", str(root), umask=0).returncode == 0
    bundle = Publisher(keys).publish(
        tmp_path / "b", [model_item(models["alpha"]), Item("policy", "policy.toml", files["policy"])], version=1, signers=("carol",)
    )
    done = sealbox("bundle", "install", str(bundle), "--root", str(root), umask=0)
    assert done.returncode == 0, done.stderr
    release = root / "releases" / "demo-1"
    checked = [root, root / "trust", *sorted((root / "trust").iterdir()), root / "releases", root / "releases" / ".highest.json",
               release, release / "policy.toml", release / "release.json", release / "install.json",
               release / "service" / "sealbox.service", root / "store" / "sha256"]  # fmt: skip
    assert (root / "trust" / "threshold") in checked
    assert [str(path) for path in checked if _writable_by_others(path)] == []


# -- 7. free space is checked before copying -----------------------------------------------------------------------


def test_install_refuses_a_bundle_larger_than_the_free_space_and_names_both_numbers(
    keys: Path, publisher: Publisher, tmp_path: Path
) -> None:
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare, "-rm", "true"], capture_output=True, check=False) if unshare else None
    if probe is None or probe.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("unshare -rm (a mount namespace for a small tmpfs) is required under CI")
        pytest.skip("cannot create a mount namespace here (unshare -rm)")
    big = write_gguf(tmp_path / "big.gguf", seed=7, values=400_000)  # 1.6 MB into a 1 MiB filesystem
    bundle = publisher.publish(tmp_path / "b", [model_item(big)], version=1)
    mount = tmp_path / "small"
    mount.mkdir()
    command = " ".join(SEALBOX[:2]) + " \"$SNIPPET\""
    script = (
        f"mount -t tmpfs -o size=1m tmpfs {mount} && "
        f"{command} trust add {keys / 'alice.pub'} --root {mount / 'root'} >/dev/null && "
        f"{command} bundle install {bundle} --root {mount / 'root'} --json"
    )
    env = os.environ | {"SNIPPET": SEALBOX[2]}
    result = subprocess.run([unshare, "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=TIMEOUT,
                            cwd=REPO, env=env, check=False)  # fmt: skip
    assert result.returncode == 29, result.stderr
    answer = refusal(result)
    assert answer["error"] == "FreeSpaceError"
    size = big.stat().st_size
    assert f"needs {size} bytes" in str(answer["message"]) and "bytes (" in str(answer["message"]).split("has ", 1)[1]
