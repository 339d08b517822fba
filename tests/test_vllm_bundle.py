"""A bundle for the vLLM engine kind: vLLM's wheels resolved for a Linux CUDA target of another Python, and a
safetensors model directory from `hf://owner/repo@<commit>`, each file a signed, verified blob.

Real parts, small: pip itself resolves and downloads (no index, only a wheelhouse of tiny real wheels written here,
standing in for vLLM, torch, Ray and the CUDA runtime); the model comes from the hub stand-in on loopback
(tests/hf_hub_support.py) through `huggingface_hub`; safetensors files are written byte for byte to the format.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from hf_hub_support import Hub, serving
from install_support import app, runner, trust
from sealbox.bundler.keys import generate_key_pair
from sealbox.bundler.manifest import BLOB_DIR, Manifest
from sealbox.runtime.vllm.front import model_dir_digest, release_model_files

REPO_ID = "sealbox-tests/standin-7b"
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
TARGET = ["--python", "3.12", "--platform", "manylinux_2_28_x86_64"]
LINUX = "cp312-cp312-manylinux_2_28_x86_64"


def safetensors(tensors: dict[str, tuple[str, list[int]]], *, cut: int = 0) -> bytes:
    """A safetensors file: 8-byte little-endian header length, the JSON header, the tensors' bytes (zeros)."""
    sizes = {"F32": 4, "BF16": 2, "F16": 2}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape) in tensors.items():
        count = 1
        for dimension in shape:
            count *= dimension
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + count * sizes[dtype]]}
        offset += count * sizes[dtype]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = struct.pack("<Q", len(text)) + text + bytes(offset)
    return data[: len(data) - cut]


def model_files() -> dict[str, bytes]:
    return {
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}).encode(),
        "tokenizer.json": b'{"model": {"type": "BPE", "vocab": {}}}',
        "model-00001-of-00002.safetensors": safetensors({"embed.weight": ("BF16", [16, 8])}),
        "model-00002-of-00002.safetensors": safetensors({"lm_head.weight": ("F32", [16, 8]), "norm": ("F32", [8])}),
        "model.safetensors.index.json": b'{"weight_map": {}}',
        "pytorch_model.bin": b"PK\x03\x04 a pickle: loading it would run code",
        "README.md": b"# standin\n",
    }


@pytest.fixture(autouse=True)
def offline_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip with no configuration and no index: only the test's wheelhouse, no traffic off this host."""
    for name in [name for name in os.environ if name.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    repos = {REPO_ID: {"refs": {"main": COMMIT}, "files": {COMMIT: model_files()}, "license": "llama3.1"}}
    with serving(repos, monkeypatch) as server:
        yield server


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    generate_key_pair("alice", folder, passphrase=None)
    return folder


def write_wheel(folder: Path, name: str, version: str, tag: str, requires: tuple[str, ...] = ()) -> Path:
    """A real (tiny) wheel: dist-info with METADATA, WHEEL and RECORD (with hashes), as pip reads them."""
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nLicense-Expression: Apache-2.0\n"
    metadata += "".join(f"Requires-Dist: {item}\n" for item in requires)
    files = {f"{name}/__init__.py": b"", f"{info}/METADATA": metadata.encode(),
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: sealbox-tests\nRoot-Is-Purelib: false\nTag: {tag}\n".encode()}  # fmt: skip

    def digest(data: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{path},sha256={digest(data)},{len(data)}\n" for path, data in files.items()) + f"{info}/RECORD,,\n"
    files[f"{info}/RECORD"] = record.encode()
    wheel = folder / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


@pytest.fixture
def house(tmp_path: Path) -> Path:
    """vLLM 0.9.0 for Linux cp312 (and a newer macOS-only one), its stack, and a backport only Python < 3.12 needs."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    write_wheel(folder, "vllm", "0.9.0", LINUX, ("ray>=2.40", "torch==2.7.0", 'backport; python_version < "3.12"'))
    write_wheel(folder, "vllm", "0.9.1", "cp312-cp312-macosx_11_0_arm64", ("ray>=2.40",))
    write_wheel(folder, "ray", "2.44.0", LINUX)
    write_wheel(folder, "torch", "2.7.0", LINUX, ('nvidia_cublas_cu12==12.6.4.1; platform_system == "Linux"',))
    write_wheel(folder, "nvidia_cublas_cu12", "12.6.4.1", "py3-none-manylinux_2_28_x86_64")
    write_wheel(folder, "backport", "1.0", "py3-none-any")
    return folder


def create(out: Path, keys: Path, *inputs: str):  # type: ignore[no-untyped-def]
    args = ["bundle", "create", "--name", "llm", "--version", "1", "--out", str(out), "--sign-key", str(keys / "alice.key")]
    return runner.invoke(app, [*args, "--json", *inputs])


def signed_manifest(bundle: Path) -> Manifest:
    envelope = json.loads((bundle / "manifest.json").read_bytes())
    return Manifest.from_bytes(base64.b64decode(envelope["payload"]))


def vllm_policy(tmp_path: Path) -> Path:
    policy = tmp_path / "policy.toml"
    policy.write_text('[egress]\nallow_ports = [8080, 8000]\n\n[vllm]\nmodel_dir = "models/standin-7b"\n'
                      'served_name = "standin-7b"\n')  # fmt: skip
    return policy


# --- vLLM's wheels ------------------------------------------------------------------------------------------------


def test_create_carries_vllm_and_its_stack_resolved_for_a_linux_cuda_target_of_another_python(
    tmp_path: Path, keys: Path, house: Path
) -> None:
    out = tmp_path / "bundle"
    result = create(out, keys, "--vllm", "0.9.0", *TARGET, "--wheelhouse", str(house), "--no-sealbox-wheel")
    assert result.exit_code == 0, result.output
    manifest = signed_manifest(out)
    wheels = {canonicalize_name(e.meta["name"]): e for e in manifest.entries("wheel")}
    # Python 3.12's markers, not this host's: no backport; the Linux wheels, not the newer macOS-only vLLM.
    assert {name: e.meta["version"] for name, e in wheels.items()} == {
        "vllm": "0.9.0", "ray": "2.44.0", "torch": "2.7.0", "nvidia-cublas-cu12": "12.6.4.1"}
    assert wheels["vllm"].path == f"wheels/vllm-0.9.0-{LINUX}.whl" and wheels["vllm"].meta["engine"] == "vllm"
    assert wheels["torch"].sha256 == hashlib.sha256((house / f"torch-2.7.0-{LINUX}.whl").read_bytes()).hexdigest()
    assert manifest.target.python == "3.12" and manifest.target.platforms == ("manylinux_2_28_x86_64",)
    assert manifest.target.accelerator == {"accelerator": "cuda", "engine": "vllm==0.9.0", "stack": {
        "nvidia-cublas-cu12": "12.6.4.1", "ray": "2.44.0", "torch": "2.7.0", "vllm": "0.9.0"}}
    verified = runner.invoke(app, ["bundle", "verify", str(out), "--trust", str(keys / "alice.pub")])
    assert verified.exit_code == 0, verified.output


def test_dry_run_prints_what_pip_resolves_for_the_target_and_writes_nothing(
    tmp_path: Path, keys: Path, house: Path
) -> None:
    out = tmp_path / "bundle"
    result = create(out, keys, "--vllm", "vllm==0.9.0", "--dry-run", *TARGET, "--wheelhouse", str(house))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["engine"] == "vllm==0.9.0" and report["python"] == "3.12"
    assert sorted(canonicalize_name(w["name"]) for w in report["wheels"]) == ["nvidia-cublas-cu12", "ray", "torch", "vllm"]
    assert all(w["url"].startswith("file://") for w in report["wheels"])
    assert not out.exists()


def test_a_stack_missing_a_wheel_for_the_target_is_refused_before_any_model_is_fetched(
    tmp_path: Path, keys: Path, house: Path, hub: Hub
) -> None:
    (house / "nvidia_cublas_cu12-12.6.4.1-py3-none-manylinux_2_28_x86_64.whl").unlink()
    result = create(tmp_path / "bundle", keys, "--vllm", "0.9.0", *TARGET, "--wheelhouse", str(house),
                    "--model", f"hf://{REPO_ID}@{COMMIT}", "--hf-cache", str(tmp_path / "cache"))  # fmt: skip
    assert result.exit_code != 0
    assert "nvidia" in result.output and "cublas" in result.output, result.output
    assert hub.requests == []  # refused by the seconds-long resolution, before the model's gigabytes


@pytest.mark.parametrize(("version", "platform", "expected"), [
    (">=0.9", "manylinux_2_28_x86_64", "exact vLLM version"),
    ("torch==2.7.0", "manylinux_2_28_x86_64", "exact vLLM version"),
    ("0.9.0", "macosx_11_0_arm64", "Linux"),
])  # fmt: skip
def test_vllm_must_be_one_exact_version_for_a_linux_target(
    tmp_path: Path, keys: Path, house: Path, version: str, platform: str, expected: str
) -> None:
    result = create(tmp_path / "bundle", keys, "--vllm", version, "--python", "3.12", "--platform", platform,
                    "--wheelhouse", str(house), "--no-sealbox-wheel")  # fmt: skip
    assert result.exit_code != 0 and expected in result.output, result.output
    assert not (tmp_path / "bundle" / "manifest.json").exists()


# --- the safetensors model ----------------------------------------------------------------------------------------


def test_a_safetensors_model_is_carried_file_by_file_from_its_pinned_commit(
    tmp_path: Path, keys: Path, hub: Hub
) -> None:
    out = tmp_path / "bundle"
    result = create(out, keys, "--model", f"hf://{REPO_ID}@{COMMIT}", "--hf-cache", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    entries = {e.path: e for e in signed_manifest(out).entries("model")}
    files = model_files()
    carried = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
               "model.safetensors.index.json", "tokenizer.json"]  # fmt: skip
    assert sorted(entries) == [f"models/standin-7b/{name}" for name in carried]  # no pickle, no README
    for name in carried:
        entry = entries[f"models/standin-7b/{name}"]
        assert entry.sha256 == hashlib.sha256(files[name]).hexdigest()
        assert (out / BLOB_DIR / entry.sha256).read_bytes() == files[name]
        assert entry.provenance == f"hf://{REPO_ID}/{name}@{COMMIT}"
        assert entry.meta["format"] == "safetensors" and entry.meta["hf_license"] == "llama3.1"
    shard = entries["models/standin-7b/model-00002-of-00002.safetensors"].meta
    assert (shard["tensors"], shard["parameter_count"], shard["dtypes"]) == (2, 136, ["F32"])
    downloads = [path for _, path in hub.requests if "/resolve/" in path]
    assert downloads and all(f"/resolve/{COMMIT}/" in path for path in downloads)


@pytest.mark.parametrize("revision", ["", "@main", "@fedcba9", "@FEDCBA9876543210FEDCBA9876543210FEDCBA98"])
def test_a_safetensors_model_not_pinned_to_a_full_commit_is_refused_without_asking_the_hub(
    tmp_path: Path, keys: Path, hub: Hub, revision: str
) -> None:
    result = create(tmp_path / "bundle", keys, "--model", f"hf://{REPO_ID}{revision}", "--hf-cache", str(tmp_path))
    assert result.exit_code != 0 and "full 40-hex commit" in result.output, result.output
    assert hub.requests == []


def test_a_weight_file_that_is_not_what_the_hubs_lfs_pointer_names_is_refused(
    tmp_path: Path, keys: Path, hub: Hub
) -> None:
    hub.repos[REPO_ID]["lfs"] = {"model-00002-of-00002.safetensors": "0" * 64}
    out = tmp_path / "bundle"
    result = create(out, keys, "--model", f"hf://{REPO_ID}@{COMMIT}", "--hf-cache", str(tmp_path / "cache"))
    assert result.exit_code != 0 and "0000000000000000" in result.output, result.output
    assert not (out / "manifest.json").exists()


def test_a_truncated_safetensors_file_is_refused_naming_it(tmp_path: Path, keys: Path, hub: Hub) -> None:
    files = hub.repos[REPO_ID]["files"][COMMIT]
    files["model-00001-of-00002.safetensors"] = safetensors({"embed.weight": ("BF16", [16, 8])}, cut=3)
    result = create(tmp_path / "bundle", keys, "--model", f"hf://{REPO_ID}@{COMMIT}", "--hf-cache", str(tmp_path))
    assert result.exit_code != 0, result.output
    assert "model-00001-of-00002.safetensors" in result.output and "truncated" in result.output


def test_a_repository_without_safetensors_weights_is_refused(tmp_path: Path, keys: Path, hub: Hub) -> None:
    files = hub.repos[REPO_ID]["files"][COMMIT]
    for name in [name for name in files if name.endswith(".safetensors")]:
        del files[name]
    result = create(tmp_path / "bundle", keys, "--model", f"hf://{REPO_ID}@{COMMIT}", "--hf-cache", str(tmp_path))
    assert result.exit_code != 0 and "not a safetensors model directory" in result.output, result.output


# --- install ------------------------------------------------------------------------------------------------------


def install(root: Path, bundle: Path):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["bundle", "install", str(bundle), "--root", str(root), "--json"])


def installed_vllm_bundle(tmp_path: Path, keys: Path):  # type: ignore[no-untyped-def]
    """The stand-in repository bundled with a vLLM policy, installed on a host that trusts its signer: that host."""
    bundle = tmp_path / "bundle"
    result = create(bundle, keys, "--model", f"hf://{REPO_ID}@{COMMIT}", "--policy", str(vllm_policy(tmp_path)),
                    "--hf-cache", str(tmp_path / "cache"))  # fmt: skip
    assert result.exit_code == 0, result.output
    host = trust(tmp_path / "root", keys / "alice.pub")
    installed = install(host.path, bundle)
    assert installed.exit_code == 0, installed.output
    return host


def test_install_lays_out_the_model_directory_and_the_front_digests_it_from_the_signed_manifest(
    tmp_path: Path, keys: Path, hub: Hub
) -> None:
    host = installed_vllm_bundle(tmp_path, keys)
    release = host.current.resolve()
    directory = release / "models" / "standin-7b"
    files = model_files()
    for name in ("config.json", "model-00001-of-00002.safetensors", "tokenizer.json"):
        assert (directory / name).is_symlink() and (directory / name).read_bytes() == files[name]
    assert not (directory / "pytorch_model.bin").exists()
    expected = {name: hashlib.sha256(files[name]).hexdigest() for name in files if name.endswith((".json", ".safetensors"))}
    assert release_model_files(release, "models/standin-7b") == expected
    assert model_dir_digest(expected) == hashlib.sha256("".join(
        f"{expected[name]}  {name}\n" for name in sorted(expected)).encode()).hexdigest()


def test_install_refuses_a_bundle_whose_weight_shard_has_one_flipped_byte(
    tmp_path: Path, keys: Path, hub: Hub
) -> None:
    bundle = tmp_path / "bundle"
    result = create(bundle, keys, "--model", f"hf://{REPO_ID}@{COMMIT}", "--hf-cache", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    shard = hashlib.sha256(model_files()["model-00002-of-00002.safetensors"]).hexdigest()
    blob = bundle / BLOB_DIR / shard
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    host = trust(tmp_path / "root", keys / "alice.pub")
    refused = install(host.path, bundle)
    assert refused.exit_code != 0
    assert shard[:12] in refused.output or "model-00002-of-00002.safetensors" in refused.output, refused.output
    assert not host.current.exists() and not host.current.is_symlink()
    shutil.rmtree(bundle)


def test_the_doctor_checks_every_file_of_an_installed_model_directory_and_names_a_tampered_shard(
    tmp_path: Path, keys: Path, hub: Hub
) -> None:
    from sealbox.runtime.doctor import Appliance, CheckStatus, check_models, check_release_files

    host = installed_vllm_bundle(tmp_path, keys)
    assert check_models(Appliance(host)).status == CheckStatus.PASS
    clean = check_release_files(Appliance(host))
    assert (clean.status, clean.summary) == (CheckStatus.PASS, "7 file(s) (model, policy, sbom) match the signed manifest")
    shard = host.store / hashlib.sha256(model_files()["model-00001-of-00002.safetensors"]).hexdigest()
    os.chmod(shard, 0o644)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    tampered = check_release_files(Appliance(host))
    assert tampered.status == CheckStatus.FAIL
    assert any("models/standin-7b/model-00001-of-00002.safetensors" in line for line in tampered.details), tampered.details


def test_an_evaluation_suite_cannot_gate_a_vllm_model_and_is_refused_before_any_download(
    tmp_path: Path, keys: Path, hub: Hub
) -> None:
    suite = tmp_path / "suite.toml"
    suite.write_text('[[cases]]\nname = "hello"\nprompt = "Hello"\n')
    result = create(tmp_path / "bundle", keys, "--model", f"hf://{REPO_ID}@{COMMIT}", "--eval-suite", str(suite),
                    "--hf-cache", str(tmp_path / "cache"))  # fmt: skip
    assert result.exit_code != 0 and "cannot be gated" in result.output, result.output
    assert hub.requests == []


def test_the_sbom_names_a_safetensors_files_facts_as_safetensors(tmp_path: Path, keys: Path, hub: Hub) -> None:
    out = tmp_path / "bundle"
    assert create(out, keys, "--model", f"hf://{REPO_ID}@{COMMIT}", "--hf-cache", str(tmp_path / "c")).exit_code == 0
    sbom_entry = next(e for e in signed_manifest(out).blobs if e.role == "sbom")
    sbom = json.loads((out / BLOB_DIR / sbom_entry.sha256).read_bytes())
    shard = next(c for c in sbom["components"] if c["name"] == "model-00002-of-00002.safetensors")
    properties = {p["name"]: p["value"] for p in shard.get("properties", [])}
    assert properties["sealbox:safetensors:parameter_count"] == "136"
    assert not any(k.startswith("sealbox:gguf:") for k in properties)
    assert shard["purl"] == f"pkg:huggingface/sealbox-tests/standin-7b@{COMMIT}"
