"""load_components: diffusers folders and single files load to exactly the reference weights,
in the requested dtype, one tensor at a time; every kind of bad input gets a clear error."""

import json
import shutil
import weakref

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from runtime import weights
from runtime.default_configs import default_configs
from runtime.single_file import to_original_layout
from runtime.weights import WeightLoadError, load_components
from tests.model_factory import (
    KINDS,
    build_reference_models,
    full_size_meta_models,
    reference_state_dict,
    save_diffusers_folder,
    save_single_file,
    single_file_state_dict,
)

NETWORKS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (diffusers folder, single file), the same seed-0 weights in both (fp32)."""
    root = tmp_path_factory.mktemp("weights")
    return {
        kind: (save_diffusers_folder(root / kind, kind), save_single_file(root / f"{kind}.safetensors", kind))
        for kind in KINDS
    }


@pytest.fixture
def folder_copy(saved, tmp_path):
    """A writable copy of the sd1 folder, for tests that damage it."""
    return shutil.copytree(saved["sd1"][0], tmp_path / "sd1")


def assert_matches_reference(components, kind, seed=0, dtype=torch.float32):
    for name in NETWORKS:
        loaded, expected = getattr(components, name).state_dict(), reference_state_dict(kind, name, seed)
        assert set(loaded) == set(expected), f"{name}: {sorted(set(loaded) ^ set(expected))[:5]}"
        for key, tensor in expected.items():
            assert loaded[key].dtype == dtype, (name, key, loaded[key].dtype)
            assert torch.equal(loaded[key].cpu(), tensor.to(dtype)), (name, key)


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("kind", KINDS)
def test_folder_and_single_file_load_identical_reference_weights(saved, kind):
    folder, single = saved[kind]
    from_folder, from_single = load_components(folder), load_components(single)
    assert_matches_reference(from_folder, kind)
    assert_matches_reference(from_single, kind)
    assert from_folder.kind == from_single.kind == kind
    for name in NETWORKS:
        module = getattr(from_single, name)
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    pad = "<|endoftext|>" if kind == "sd1" else "!"
    assert (
        from_single.tokenizer.pad_token_id
        == from_folder.tokenizer.pad_token_id
        == from_folder.tokenizer._tokenizer.token_to_id(pad)
    )
    assert from_folder.scheduler_config["prediction_type"] == ("epsilon" if kind == "sd1" else "v_prediction")
    assert from_single.scheduler_config["prediction_type"] == ("epsilon" if kind == "sd1" else "v_prediction")


def test_loaded_models_compute_like_the_references(saved):
    """The weights land where they belong: outputs equal the diffusers / transformers references."""
    components = load_components(saved["sd2"][1])
    reference = build_reference_models("sd2")
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 49408, (2, 77), generator=generator)
    context = components.text_encoder(ids)
    torch.testing.assert_close(context, reference["text_encoder"](ids).last_hidden_state, rtol=1e-4, atol=1e-5)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    torch.testing.assert_close(
        components.unet(latents, torch.tensor([10, 900]), context),
        reference["unet"](latents, torch.tensor([10, 900]), context).sample,
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("dtype,expected", [("fp16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_dtype_is_honoured(saved, dtype, expected):
    components = load_components(saved["sd1"][1], dtype=dtype)
    assert_matches_reference(components, "sd1", dtype=expected)


def test_dtype_names():
    assert weights.resolve_dtype(torch.float16) is torch.float16
    assert weights.resolve_dtype("half") is torch.float16
    assert weights.resolve_dtype("torch.bfloat16") is torch.bfloat16
    assert weights.resolve_dtype("FP32") is torch.float32


def test_tensors_are_cast_one_at_a_time(saved, monkeypatch):
    """Loading fp32 files as fp16 never holds more than one fp32 tensor: each is cast and dropped
    before the next is read (no full-precision copy of the model)."""
    live = {"bytes": 0, "peak": 0, "largest": 0}
    real_safe_open = safetensors.safe_open

    def released(size):
        live["bytes"] -= size

    class TrackingHandle:
        def __init__(self, handle):
            self._handle = handle

        def __getattr__(self, name):
            return getattr(self._handle, name)

        def get_tensor(self, key):
            tensor = self._handle.get_tensor(key)
            size = tensor.numel() * tensor.element_size()
            live["bytes"] += size
            live["peak"] = max(live["peak"], live["bytes"])
            live["largest"] = max(live["largest"], size)
            weakref.finalize(tensor, released, size)
            return tensor

    class TrackingOpen:
        def __init__(self, *args, **kwargs):
            self._context = real_safe_open(*args, **kwargs)

        def __enter__(self):
            return TrackingHandle(self._context.__enter__())

        def __exit__(self, *exc):
            return self._context.__exit__(*exc)

    monkeypatch.setattr(safetensors, "safe_open", TrackingOpen)
    for source in (saved["sd2"][0], saved["sd2"][1]):
        components = load_components(source, dtype="fp16")
        assert live["largest"] > 0
        assert live["peak"] <= live["largest"], live
        assert live["bytes"] == 0
        assert all(p.dtype == torch.float16 for p in components.unet.parameters())


def test_text_encoder_key_forms(saved, tmp_path):
    """transformers 5.x (no prefix), 4.x ("text_model." prefix) and old 4.x (plus position_ids) files."""
    source = saved["sd1"][0]
    plain = load_file(source / "text_encoder" / "model.safetensors")
    prefixed = {"text_model." + k: v for k, v in plain.items()}
    with_ids = {**prefixed, "text_model.embeddings.position_ids": torch.arange(77)[None]}
    for name, state in {"prefixed": prefixed, "with_ids": with_ids, "plain": plain}.items():
        folder = shutil.copytree(source, tmp_path / name)
        save_file(state, folder / "text_encoder" / "model.safetensors")
        assert_matches_reference(load_components(folder), "sd1")


@pytest.mark.parametrize("as_conv", [False, True])
def test_legacy_vae_attention_keys(folder_copy, as_conv):
    """diffusers < 0.14 VAE attention names (query/key/value/proj_attn), as linear or 1x1-conv weights."""
    path = folder_copy / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    renamed = {}
    for key, value in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in key:
                key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
                if as_conv and key.endswith("weight"):
                    value = value[:, :, None, None]
        renamed[key] = value
    assert any(".query.weight" in k for k in renamed)
    save_file(renamed, path)
    assert_matches_reference(load_components(folder_copy), "sd1")


def test_variant_and_shards(tmp_path):
    """Plain fp32 files (seed 0) beside sharded fp16 variant files (seed 1): each picked as asked;
    a folder holding only the variant uses it without being asked."""
    both = save_diffusers_folder(tmp_path / "both", "sd1", seed=0)
    save_diffusers_folder(both, "sd1", dtype=torch.float16, variant="fp16", shards=True, seed=1)
    assert len(list((both / "unet").glob("diffusion_pytorch_model.fp16-*.safetensors"))) > 1
    assert_matches_reference(load_components(both), "sd1", seed=0)
    variant = load_components(both, variant="fp16", dtype="fp16")
    reference = reference_state_dict("sd1", "unet", seed=1)
    loaded = variant.unet.state_dict()
    assert all(torch.equal(loaded[k], v.half()) for k, v in reference.items())

    only_variant = save_diffusers_folder(tmp_path / "only", "sd1", dtype=torch.float16, variant="fp16", seed=1)
    assert_matches_reference(load_components(only_variant, dtype="fp16"), "sd1", seed=1, dtype=torch.float16)

    sharded = save_diffusers_folder(tmp_path / "sharded", "sd2", shards=True)
    assert_matches_reference(load_components(sharded), "sd2")


@pytest.mark.parametrize("kind", KINDS)
def test_full_size_files_match_our_models(kind):
    """At the real SD 1.5 / 2.1 sizes (headers only, meta tensors): a single file and a folder written
    by transformers 4.x map onto our models with every name and shape right."""
    models = full_size_meta_models(kind)
    original = to_original_layout(**{name: m.state_dict() for name, m in models.items()}, kind=kind)
    store = weights.TensorStore(f"{kind}-full.safetensors")
    store.add_dict(original)
    layout, configs = weights._single_file_configs(store, store.label)
    assert layout.kind == kind and configs["unet"]["block_out_channels"] == [320, 640, 1280, 1280]
    for job in weights._single_file_jobs(store, layout, configs):
        job.check()
    for name, (model_cls, config_cls) in weights._model_classes().items():
        state = models[name].state_dict()
        if name == "text_encoder":
            state = {"text_model." + k: v for k, v in state.items()}
        store = weights.TensorStore(f"{kind}/{name}")
        store.add_dict(state)
        ours = weights._build(name, model_cls, config_cls, default_configs(kind)[name], "the defaults")
        plan, unexpected = weights._folder_plan(name, ours, store)
        weights._Job(name, ours, plan, store, unexpected, "the defaults").check()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_load_allocates_only_the_fp16_model(saved):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    components = load_components(saved["sd1"][1], device="cuda", dtype="fp16")
    tensors = [t for name in NETWORKS for t in getattr(components, name).state_dict().values()]
    assert all(t.is_cuda and t.dtype == torch.float16 for t in tensors)
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    largest_fp32 = max(t.numel() for t in tensors) * 4
    # 512-byte allocator granularity per tensor, plus at most one full-precision tensor in flight.
    slack = 512 * len(tensors) + largest_fp32
    assert torch.cuda.max_memory_allocated() - before <= model_bytes + slack
    assert_matches_reference(components, "sd1", dtype=torch.float16)


def test_pickle_refused_unless_allowed(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": single_file_state_dict("sd1"), "global_step": 5}, path)
    with pytest.raises(WeightLoadError, match=r"model\.ckpt.*pickle.*allow_pickle=True"):
        load_components(path)
    assert_matches_reference(load_components(path, allow_pickle=True), "sd1")


class _NotATensor:
    """An object that a weights-only unpickler must refuse to rebuild."""


def test_allowed_pickle_is_still_read_weights_only(tmp_path):
    path = tmp_path / "payload.ckpt"
    torch.save({"state_dict": single_file_state_dict("sd1"), "payload": _NotATensor()}, path)
    with pytest.raises(
        WeightLoadError, match=r"payload\.ckpt: could not be read with torch\.load\(weights_only=True\)"
    ):
        load_components(path, allow_pickle=True)


def test_overrides(saved):
    components = load_components(
        saved["sd2"][1], prediction_type="epsilon", tokenizer_path=saved["sd1"][0] / "tokenizer"
    )
    assert components.scheduler_config["prediction_type"] == "epsilon"
    assert components.tokenizer.pad_token_id == 49407  # SD 1.x's pad, from the folder given


def test_parameters_on_meta_keeps_buffers_real():
    class WithBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 4)
            self.register_buffer("ids", torch.arange(5), persistent=False)

    with weights._parameters_on_meta():
        module = WithBuffer()
    assert module.linear.weight.is_meta and isinstance(module.linear.weight, torch.nn.Parameter)
    assert torch.equal(module.ids, torch.arange(5))
    assert not torch.nn.Linear(2, 2).weight.is_meta  # the patch is gone after the block


# ----------------------------------------------------------------------------- errors


def test_bad_arguments(saved, tmp_path):
    folder = saved["sd1"][0]
    with pytest.raises(WeightLoadError, match=r"'fp8'.*fp16.*bf16"):
        load_components(folder, dtype="fp8")
    with pytest.raises(WeightLoadError, match="not supported"):
        load_components(folder, dtype=torch.int8)
    with pytest.raises(WeightLoadError, match="'nonsense'"):
        load_components(folder, device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(WeightLoadError, match="CUDA is not available"):
            load_components(folder, device="cuda")
    with pytest.raises(WeightLoadError, match="prediction_type"):
        load_components(folder, prediction_type="x0")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_components(tmp_path / "nowhere")
    text = tmp_path / "model.txt"
    text.write_text("hello")
    with pytest.raises(WeightLoadError, match=r"model\.txt.*'\.txt'"):
        load_components(text)
    with pytest.raises(WeightLoadError, match="variant"):
        load_components(saved["sd1"][1], variant="fp16")


def test_missing_model_index_and_component(folder_copy):
    (folder_copy / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"model_index\.json.*unet/, vae/"):
        load_components(folder_copy)
    with pytest.raises(FileNotFoundError, match="one component folder"):
        load_components(folder_copy / "unet")


def test_missing_component_folder(folder_copy):
    shutil.rmtree(folder_copy / "vae")
    with pytest.raises(FileNotFoundError, match="vae/ is missing"):
        load_components(folder_copy)


def test_missing_variant_falls_back_to_plain_files_or_lists_files(folder_copy):
    with pytest.warns(UserWarning) as record:
        assert_matches_reference(load_components(folder_copy, variant="fp16"), "sd1")
    messages = sorted(str(w.message) for w in record)
    assert (
        len(messages) == 3 and "vae: no 'fp16' variant of the vae weights; using diffusion_pytorch_model" in messages[2]
    ), messages
    (folder_copy / "vae" / "diffusion_pytorch_model.safetensors").rename(folder_copy / "vae" / "weights.safetensors")
    with (
        pytest.raises(
            FileNotFoundError,
            match=r"vae: no variant 'fp16' weights.*folder holds: config\.json, "
            r"weights\.safetensors",
        ),
        pytest.warns(UserWarning, match="unet"),
    ):
        load_components(folder_copy, variant="fp16")


def test_several_variants_and_no_plain_files(folder_copy):
    unet = folder_copy / "unet"
    shutil.copy(unet / "diffusion_pytorch_model.safetensors", unet / "diffusion_pytorch_model.ema.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(WeightLoadError, match=r"unet: no plain diffusion_pytorch_model weights.*\['ema', 'fp16'\]"):
        load_components(folder_copy)
    with pytest.warns(UserWarning, match="no 'ema' variant of the (vae|text_encoder) weights"):
        assert_matches_reference(load_components(folder_copy, variant="ema"), "sd1")


def test_pickle_bin_in_folder(folder_copy):
    unet = folder_copy / "unet"
    torch.save(load_file(unet / "diffusion_pytorch_model.safetensors"), unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightLoadError, match=r"diffusion_pytorch_model\.bin is a pickle file.*allow_pickle=True"):
        load_components(folder_copy)
    assert_matches_reference(load_components(folder_copy, allow_pickle=True), "sd1")


def test_missing_or_broken_config_files_named(folder_copy):
    config = folder_copy / "unet" / "config.json"
    text = config.read_text()
    config.unlink()
    with pytest.raises(FileNotFoundError, match=r"unet.config\.json not found: expected the unet config"):
        load_components(folder_copy)
    config.write_text(text)
    scheduler = folder_copy / "scheduler" / "scheduler_config.json"
    scheduler.write_text('{"prediction_type": ')
    with pytest.raises(WeightLoadError, match=r"scheduler_config\.json: not valid JSON"):
        load_components(folder_copy)
    scheduler.write_text("[1, 2]")
    with pytest.raises(WeightLoadError, match=r"scheduler_config\.json: expected a JSON object, found list"):
        load_components(folder_copy)


def test_bad_shard_index_named(folder_copy):
    unet = folder_copy / "unet"
    shard = "diffusion_pytorch_model-00001-of-00001.safetensors"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / shard)
    with safetensors.safe_open(str(unet / shard), framework="pt") as handle:
        keys = list(handle.keys())
    index = unet / "diffusion_pytorch_model.safetensors.index.json"

    def write_index(weight_map):
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    write_index({})
    with pytest.raises(WeightLoadError, match=r"index\.json: field 'weight_map' is missing or empty"):
        load_components(folder_copy)
    write_index({**dict.fromkeys(keys, shard), "extra.weight": shard})
    with pytest.raises(
        WeightLoadError,
        match=r"index\.json: the index maps 1 key\(s\) to "
        r"diffusion_pytorch_model-00001-of-00001\.safetensors that the file "
        r"does not hold: extra\.weight",
    ):
        load_components(folder_copy)
    write_index(dict.fromkeys(keys, "diffusion_pytorch_model-00002-of-00002.safetensors"))
    with pytest.raises(
        FileNotFoundError,
        match=r"index\.json: shard 'diffusion_pytorch_model-00002-of-00002"
        r"\.safetensors' listed in 'weight_map' does not exist",
    ):
        load_components(folder_copy)


def test_truncated_safetensors(folder_copy):
    path = folder_copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match=r"unet.diffusion_pytorch_model\.safetensors.*truncated or corrupt"):
        load_components(folder_copy)


def _edit_unet(folder, edit):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_missing_and_unexpected_keys_named(folder_copy):
    def edit(state):
        del state["conv_in.bias"]
        state["mystery.weight"] = torch.randn(3)

    _edit_unet(folder_copy, edit)
    with pytest.raises(
        WeightLoadError,
        match=r"unet weights in .*diffusion_pytorch_model\.safetensors.*"
        r"missing key\(s\): conv_in\.bias.*unexpected key\(s\): mystery\.weight",
    ):
        load_components(folder_copy)


def test_all_headers_checked_before_any_tensor_is_read(folder_copy, monkeypatch):
    """A bad text-encoder file (the last network loaded) fails before UNet or VAE data is read."""
    path = folder_copy / "text_encoder" / "model.safetensors"
    state = load_file(path)
    state["final_layer_norm.bias"] = torch.randn(3)
    save_file(state, path)
    reads = []
    real_read = weights.TensorStore.read
    monkeypatch.setattr(weights.TensorStore, "read", lambda self, key: reads.append(key) or real_read(self, key))
    with pytest.raises(
        WeightLoadError,
        match=r"text_encoder weights in .*model\.safetensors.*"
        r"final_layer_norm\.bias: file \[3\] vs config \[64\]",
    ):
        load_components(folder_copy)
    assert reads == []


def test_mis_shaped_key_shows_both_shapes(folder_copy):
    _edit_unet(folder_copy, lambda state: state.update({"conv_out.bias": torch.randn(5)}))
    with pytest.raises(WeightLoadError, match=r"conv_out\.bias: file \[5\] vs config \[4\]"):
        load_components(folder_copy)


def test_config_contradicting_weights(folder_copy):
    config_path = folder_copy / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 32
    config_path.write_text(json.dumps(config))
    with pytest.raises(WeightLoadError, match=r"cross_attention_dim=32.*hidden_size=64"):
        load_components(folder_copy)

    text_path = folder_copy / "text_encoder" / "config.json"
    text_path.write_text(json.dumps({**json.loads(text_path.read_text()), "hidden_size": 32}))
    with pytest.raises(
        WeightLoadError,
        match=r"attn2\.to_k\.weight: file \[32, 64\] vs config \[32, 32\].*"
        r"check config field cross_attention_dim",
    ):
        load_components(folder_copy)

    text_path.write_text(json.dumps({**json.loads(text_path.read_text()), "hidden_size": 64}))
    config["cross_attention_dim"] = 64
    config["block_out_channels"] = [32, 32]
    config_path.write_text(json.dumps(config))
    with pytest.raises(WeightLoadError, match=r"unet.config\.json.*shape mismatch.*file \[64.*vs config \[32"):
        load_components(folder_copy)


def test_unsupported_config_field_named(folder_copy):
    config_path = folder_copy / "vae" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "shift_factor": 0.5}))
    with pytest.raises(WeightLoadError, match=r"vae.config\.json.*shift_factor"):
        load_components(folder_copy)


def test_single_file_errors(tmp_path, monkeypatch):
    state = single_file_state_dict("sd1")
    unknown = tmp_path / "other.safetensors"
    save_file({"lm_head.weight": torch.randn(2, 2)}, unknown)
    with pytest.raises(WeightLoadError, match=r"other\.safetensors.*not a Stable Diffusion"):
        load_components(unknown)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(WeightLoadError, match=r"garbage\.safetensors: not a readable \.safetensors file"):
        load_components(garbage)

    broken = dict(state)
    broken["model.diffusion_model.out.2.bias"] = torch.randn(7)
    path = tmp_path / "broken.safetensors"
    save_file(broken, path)
    with pytest.raises(WeightLoadError, match=r"out\.2\.bias: file \[7\] vs config \[4\]"):
        load_components(path)

    damaged = dict(state)
    del damaged["first_stage_model.decoder.mid.attn_1.q.bias"]
    damaged["first_stage_model.decoder.mystery.weight"] = torch.randn(3)
    path = tmp_path / "damaged.safetensors"
    save_file(damaged, path)
    with pytest.raises(
        WeightLoadError,
        match=r"vae weights in .*damaged\.safetensors.*1 missing key\(s\): "
        r"first_stage_model\.decoder\.mid\.attn_1\.q\.bias; 1 unexpected "
        r"key\(s\): first_stage_model\.decoder\.mystery\.weight",
    ):
        load_components(path)

    no_text = tmp_path / "unet_vae_only.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}, no_text)
    with pytest.raises(WeightLoadError, match="no text encoder"):
        load_components(no_text)

    from runtime.tokenizer import CLIPTokenizer

    def unavailable(*args, **kwargs):
        raise FileNotFoundError("open_clip is not installed")

    monkeypatch.setattr(CLIPTokenizer, "from_open_clip_bpe", unavailable)
    good = save_single_file(tmp_path / "good.safetensors", "sd1")
    with pytest.raises(FileNotFoundError, match=r"good\.safetensors.*no tokenizer.*tokenizer_path"):
        load_components(good)
