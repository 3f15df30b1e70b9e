"""Untrusted weight folders: shard indexes confined to their folder, odd entries named, weights that
are not files, integer weights, shapes refused from the header alone, loads in parallel threads."""

import json
import os
import shutil
import struct
import threading

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from runtime.weights import WeightLoadError, load_components
from tests.model_factory import save_diffusers_folder, save_single_file, single_file_state_dict
from tests.opened_files import outside, recording

SHARD = "diffusion_pytorch_model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    return save_diffusers_folder(tmp_path_factory.mktemp("weights") / "sd1", "sd1")


@pytest.fixture
def sharded(sd1_folder, tmp_path):
    """A copy of the sd1 folder whose UNet is one shard plus an index; returns (folder, write_index, keys)."""
    folder = shutil.copytree(sd1_folder, tmp_path / "model" / "sd1")
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / SHARD)
    with safetensors.safe_open(str(unet / SHARD), framework="pt") as handle:
        keys = list(handle.keys())

    def write_index(weight_map):
        (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )

    write_index(dict.fromkeys(keys, SHARD))
    return folder, write_index, keys


def test_sharded_folder_still_loads(sharded):
    folder, _, _ = sharded
    assert load_components(folder).unet is not None


@pytest.mark.parametrize("escape", ["../../victim.safetensors", "ABSOLUTE", "sub/../../victim.safetensors"])
def test_shard_names_cannot_leave_the_folder(sharded, tmp_path, escape):
    folder, write_index, keys = sharded
    victim = tmp_path / "victim.safetensors"
    shutil.copy(folder / "unet" / SHARD, victim)  # a readable file outside: it must not be opened
    name = str(victim) if escape == "ABSOLUTE" else escape
    write_index({**dict.fromkeys(keys[1:], SHARD), keys[0]: name})
    with recording() as opened, pytest.raises(WeightLoadError, match="not a plain file name.*refusing to read"):
        load_components(folder)
    assert not outside(opened, tmp_path / "model"), outside(opened, tmp_path / "model")


@pytest.mark.parametrize("value", [None, [SHARD], 7])
def test_shard_entries_that_are_not_names(sharded, value):
    folder, write_index, keys = sharded
    write_index({**dict.fromkeys(keys[1:], SHARD), keys[0]: value})
    with pytest.raises(WeightLoadError, match=rf"'weight_map' entry '{keys[0]}' is .*expected the name of a shard"):
        load_components(folder)


def test_weights_path_that_is_a_directory_or_a_link_loop(sd1_folder, tmp_path):
    folder = shutil.copytree(sd1_folder, tmp_path / "sd1")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    weights.mkdir()
    with pytest.raises(WeightLoadError, match=r"diffusion_pytorch_model\.safetensors is a directory"):
        load_components(folder)
    weights.rmdir()
    os.symlink("loop_b", folder / "vae" / "loop_a")
    os.symlink("loop_a", folder / "vae" / "loop_b")
    os.symlink("loop_a", weights)
    with pytest.raises(
        WeightLoadError,
        match=r"diffusion_pytorch_model\.safetensors is a symlink that leads to "
        r"no file",
    ):
        load_components(folder)
    os.symlink("self", tmp_path / "self")
    with pytest.raises(WeightLoadError, match=r"self is a symlink that leads nowhere"):
        load_components(tmp_path / "self")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_weights_are_named(sd1_folder, tmp_path, dtype):
    folder = shutil.copytree(sd1_folder, tmp_path / "sd1")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["conv_in.weight"] = torch.ones_like(state["conv_in.weight"], dtype=dtype)
    save_file(state, path)
    with pytest.raises(WeightLoadError, match=r"1 weight\(s\) stored as integers or bools.*conv_in\.weight"):
        load_components(folder)


def test_wrong_shape_in_a_huge_sparse_file_is_refused_from_the_header(tmp_path):
    """A 40 GB (sparse) file of the wrong shape: named from the header, no mapping, no data read."""
    state = single_file_state_dict("sd1")
    header = {}
    offset = 0
    wrong = "first_stage_model.decoder.conv_out.weight"
    for key, tensor in state.items():
        shape = list(tensor.shape)
        if key == wrong:  # the last dimension grown to make the file 40 GB
            shape[-1] = (40 << 30) // (4 * shape[0] * shape[1] * shape[2])
        size = 4 * int(torch.tensor(shape).prod())
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)  # sparse: no blocks written
    assert path.stat().st_size > 40 << 30
    with (
        recording() as opened,
        pytest.raises(
            WeightLoadError,
            match=r"1 shape mismatch\(es\): first_stage_model\.decoder\.conv_out\.weight: "
            r"file \[3, \d+, 3, \d+\] vs config \[3, \d+, 3, 3\]",
        ),
    ):
        load_components(path)
    assert opened.count(str(path)) == 1  # the header only; safetensors never mapped it


def test_truncated_file_named_from_its_header(sd1_folder, tmp_path):
    path = save_single_file(tmp_path / "sd1.safetensors", "sd1")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightLoadError, match=r"truncated or corrupt.*holds only \d+ bytes of data"):
        load_components(path)


def test_one_dimensional_cross_attention_weight_in_a_single_file(tmp_path):
    state = single_file_state_dict("sd1")
    key = next(k for k in sorted(state) if k.endswith("attn2.to_k.weight"))
    state[key] = state[key].flatten()
    path = tmp_path / "bad.safetensors"
    save_file(state, path)
    with pytest.raises(
        WeightLoadError,
        match=r"attn2\.to_k\.weight' has shape \[\d+\]; a cross-attention key "
        r"projection is 2-D",
    ):
        load_components(path)


def test_loads_in_parallel_threads_do_not_disturb_each_other(sd1_folder):
    """Three loads at once, while a fourth thread builds ordinary modules: every load gives real
    weights, and no module built elsewhere lands on meta (the old loader patched torch globally)."""
    results, errors, stop = [], [], threading.Event()

    def load():
        try:
            results.append(load_components(sd1_folder))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def build_elsewhere():
        while not stop.is_set():
            if torch.nn.Linear(8, 8).weight.is_meta:
                errors.append(AssertionError("a module built outside the loader is on meta"))
                return

    other = threading.Thread(target=build_elsewhere)
    other.start()
    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    other.join()
    assert not errors, errors
    assert len(results) == 3
    reference = dict(results[0].unet.state_dict())
    for components in results:
        assert not any(p.is_meta for p in components.unet.parameters())
        for key, value in components.unet.state_dict().items():
            assert torch.equal(value, reference[key])
    assert not torch.nn.Linear(2, 2).weight.is_meta
