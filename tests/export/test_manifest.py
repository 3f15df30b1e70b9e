"""The artifact manifest: hashing, reuse / rebuild decisions, damaged files, foreign directories."""

import json

import pytest

from export.manifest import MANIFEST_NAME, ArtifactError, Manifest, hash_tree, sha256_file, weights_digests

FIELDS = {"weights": "abc", "dtype": "fp32", "opset": 17}


def _built(tmp_path, fields=FIELDS, payload=b"graph bytes \x01\x02" * 100, name="out"):
    manifest = Manifest.open(tmp_path / name)
    (manifest.out_dir / "unet.onnx").write_bytes(payload)
    manifest.record("unet.onnx", ["unet.onnx"], fields, info={"network": "unet"})
    return manifest


def test_weights_digests_change_with_content_of_one_component(tmp_path):
    model = tmp_path / "model"
    for component in ("unet", "vae", "text_encoder"):
        (model / component).mkdir(parents=True)
        (model / component / "config.json").write_text(json.dumps({"name": component}))
        (model / component / "weights.safetensors").write_bytes(component.encode() * 1000)
    before = weights_digests(model)
    (model / "vae" / "weights.safetensors").write_bytes(b"vae" * 999 + b"VAE")  # same size, new bytes
    after = weights_digests(model)
    assert before["vae"] != after["vae"]
    assert before["unet"] == after["unet"] and before["text_encoder"] == after["text_encoder"]


def test_single_file_digest_is_shared_and_missing_paths_are_named(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights" * 100)
    digests = weights_digests(checkpoint)
    assert set(digests.values()) == {sha256_file(checkpoint)} and len(digests) == 3
    with pytest.raises(FileNotFoundError, match="nowhere"):
        weights_digests(tmp_path / "nowhere")
    (tmp_path / "folder" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no text_encoder/ subfolder"):
        weights_digests(tmp_path / "folder")


def test_hash_tree_sees_renames(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"123")
    first = hash_tree(tmp_path / "a")
    (tmp_path / "a" / "x.bin").rename(tmp_path / "a" / "y.bin")
    assert hash_tree(tmp_path / "a") != first


def test_reuse_when_nothing_changed(tmp_path):
    _built(tmp_path)
    manifest = Manifest.open(tmp_path / "out")
    decision = manifest.decide("unet.onnx", dict(FIELDS))
    assert decision.reuse and decision.reason == "up to date"
    data = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert data["artifacts"]["unet.onnx"]["files"]["unet.onnx"]["size"] == 1400
    # Readable by the user a deployment runs as, not only by whoever exported.
    assert (tmp_path / "out" / MANIFEST_NAME).stat().st_mode & 0o777 == 0o644


def test_changed_fields_rebuild_and_are_named(tmp_path):
    manifest = _built(tmp_path)
    decision = manifest.decide("unet.onnx", {**FIELDS, "weights": "def", "dtype": "fp16"})
    assert not decision.reuse and decision.reason == "stale: dtype, weights changed"
    assert manifest.decide("vae_decoder.onnx", FIELDS).reason == "not built yet"


def test_missing_file_is_rebuilt(tmp_path):
    manifest = _built(tmp_path)
    (manifest.out_dir / "unet.onnx").unlink()
    decision = manifest.decide("unet.onnx", FIELDS)
    assert not decision.reuse and "unet.onnx missing" in decision.reason


def test_truncated_file_is_an_error_naming_it(tmp_path):
    manifest = _built(tmp_path)
    path = manifest.out_dir / "unet.onnx"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"unet.onnx is 100 bytes but manifest.json says 1400 \(truncated"):
        manifest.decide("unet.onnx", FIELDS)


def test_replaced_file_of_same_size_is_an_error(tmp_path):
    manifest = _built(tmp_path)
    path = manifest.out_dir / "unet.onnx"
    path.write_bytes(b"another model!" * 100)
    with pytest.raises(ArtifactError, match="unet.onnx content hash .* differs .*another model"):
        manifest.verify("unet.onnx")


def test_foreign_files_are_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ArtifactError, match=r"refusing to write into .*holiday.jpg.*no manifest.json of ours"):
        Manifest.open(out)
    manifest = _built(tmp_path, name="ours")
    (manifest.out_dir / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="notes.txt.*manifest.json does not list them"):
        Manifest.open(manifest.out_dir)


def test_someone_elses_manifest_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_NAME).write_text(json.dumps({"name": "my web app"}))
    with pytest.raises(ArtifactError, match="not a manifest written by this exporter"):
        Manifest.open(out)
    (out / MANIFEST_NAME).write_text("{broken")
    with pytest.raises(ArtifactError, match="not a readable manifest"):
        Manifest.open(out)


def test_out_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is a file, not a directory"):
        Manifest.open(tmp_path / "file")


def test_forget_deletes_only_listed_files(tmp_path):
    manifest = _built(tmp_path)
    (manifest.out_dir / ".sdrt-tmp-1-unet.onnx").write_bytes(b"partial")
    manifest.forget("unet.onnx")
    assert not (manifest.out_dir / "unet.onnx").exists()
    assert (manifest.out_dir / ".sdrt-tmp-1-unet.onnx").exists()
    assert Manifest.open(manifest.out_dir).artifacts == {}
