"""A manifest is untrusted input: names that leave the directory are refused before anything is read
or deleted, and a manifest edited to claim other weights cannot make those weights run these graphs."""

import json
import os
import shutil

import pytest

from export.graph_stamp import read_stamp
from export.manifest import MANIFEST_NAME, ArtifactError, Manifest, digest_of, weights_digests
from export.onnx import ensure_onnx
from tests.export.conftest import SMALL_PROFILE
from tests.opened_files import outside, recording

FIELDS = {"weights": "abc", "dtype": "fp32", "opset": 17}


def _export_dir_listing(tmp_path, listed_name):
    """An export directory whose manifest lists `listed_name` for unet.onnx, with a stale key."""
    out = tmp_path / "engines"
    manifest = Manifest.open(out)
    (out / "unet.onnx").write_bytes(b"graph")
    manifest.record("unet.onnx", ["unet.onnx"], FIELDS)
    data = json.loads((out / MANIFEST_NAME).read_text())
    files = data["artifacts"]["unet.onnx"]["files"]
    files[listed_name] = files.pop("unet.onnx")
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    return out


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text("not yours")
    return path


@pytest.mark.parametrize("how", ["dotdot", "absolute", "nested"])
def test_names_outside_the_directory_refuse_the_whole_manifest(tmp_path, victim, how):
    name = {"dotdot": "../victim.txt", "absolute": str(victim), "nested": "sub/../../victim.txt"}[how]
    out = _export_dir_listing(tmp_path, name)
    with recording() as opened, pytest.raises(ArtifactError, match="not a plain file name inside"):
        Manifest.open(out).forget("unet.onnx")
    assert victim.read_text() == "not yours"
    assert outside(opened, out) == []


def test_symlink_out_is_neither_hashed_nor_deleted(tmp_path, victim):
    out = _export_dir_listing(tmp_path, "unet.onnx")
    (out / "unet.onnx").unlink()
    os.symlink(victim, out / "unet.onnx")
    with recording() as opened, pytest.raises(ArtifactError, match="symlink or resolves to .*outside"):
        Manifest.open(out)
    assert victim.read_text() == "not yours" and outside(opened, out) == []


def test_forget_and_verify_check_names_held_in_memory_too(tmp_path, victim):
    """The checks sit in forget() and verify() themselves, not only in the reader."""
    manifest = Manifest.open(tmp_path / "engines")
    manifest.artifacts["unet.onnx"] = {"files": {"../victim.txt": {"size": 9, "sha256": "0" * 64}}}
    with recording() as opened, pytest.raises(ArtifactError, match="not a plain file name"):
        manifest.verify("unet.onnx")
    assert outside(opened, manifest.out_dir) == []
    with pytest.raises(ArtifactError, match="not a plain file name"):
        manifest.forget("unet.onnx")
    assert victim.read_text() == "not yours"


def test_symlinked_manifest_is_refused(tmp_path, victim):
    out = tmp_path / "engines"
    out.mkdir()
    os.symlink(victim, out / MANIFEST_NAME)
    with recording() as opened, pytest.raises(ArtifactError, match="manifest.json is a symlink"):
        Manifest.open(out)
    assert outside(opened, out) == []


@pytest.mark.parametrize("entry", [{"files": None}, {"files": {"unet.onnx": {"size": "9", "sha256": "x"}}}, "text"])
def test_malformed_entries_are_named(tmp_path, entry):
    out = _export_dir_listing(tmp_path, "unet.onnx")
    data = json.loads((out / MANIFEST_NAME).read_text())
    data["artifacts"]["unet.onnx"] = entry
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"artifact 'unet.onnx'"):
        Manifest.open(out)


def test_forged_manifest_cannot_run_another_models_graph(model_folder, tmp_path):
    """Model A's graph, with the manifest edited to carry model B's digest: refused for B."""
    model_a = model_folder("sd1")
    model_b = shutil.copytree(model_a, tmp_path / "model_b")
    config = model_b / "text_encoder" / "config.json"
    config.write_text(config.read_text().replace('"layer_norm_eps": 1e-05', '"layer_norm_eps": 2e-05'))
    out = tmp_path / "engines"
    ensure_onnx(out, model_a, networks=["text_encoder"], profile=SMALL_PROFILE, progress=False)
    digest_a, digest_b = weights_digests(model_a)["text_encoder"], weights_digests(model_b)["text_encoder"]
    assert digest_a != digest_b and read_stamp(out / "text_encoder.onnx") == digest_a
    data = json.loads((out / MANIFEST_NAME).read_text())
    entry = data["artifacts"]["text_encoder.onnx"]
    entry["key_fields"]["weights"] = digest_b
    entry["key"] = digest_of(entry["key_fields"])
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(
        ArtifactError,
        match=r"text_encoder.onnx was exported from weights .* claims .*"
        r"refusing to run another model's graph",
    ):
        ensure_onnx(out, model_b, networks=["text_encoder"], profile=SMALL_PROFILE, progress=False)
    # The untouched model still reuses its graph: the stamp agrees with it.
    entry["key_fields"]["weights"] = digest_a
    entry["key"] = digest_of(entry["key_fields"])
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    ensure_onnx(out, model_a, networks=["text_encoder"], profile=SMALL_PROFILE, progress=False)
