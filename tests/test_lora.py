"""LoRA (runtime/lora.py): kohya and diffusers/peft files equal diffusers' load_lora_weights images, unloading
restores the base bit for bit, a swap under CUDA graphs (the CPU fake) needs no new capture, bad input is
refused by name before any weight changes."""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import runtime
from runtime.bench.presets import write_random_model
from runtime.images import psnr
from runtime.lora import LoraError
from runtime.pipeline import Pipeline
from tests.fake_cuda_graphs import FakeCudaGraphs
from tests.lora_factory import write_kohya_unet_lora
from tests.model_factory import build_reference_models, save_diffusers_folder

MIN_PSNR_DB = 35.0
RANK = 4
# Attention projections, the feed-forward out, the 1x1 proj convs and the 3x3 resnet convs (LoCon).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RUN = dict(steps=3, seed=5, guidance=7.5, width=32, height=32, progress=False)


def peft_lora(module: torch.nn.Module, targets, seed: int, magnitude: float = 0.15) -> dict[str, torch.Tensor]:
    """A random LoRA for `module` made by peft ({path}.lora_A.weight / .lora_B.weight, alpha == rank);
    lora_B is drawn too (peft starts it at zero, which would be no LoRA at all)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model = inject_adapter_in_model(
        LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets), copy.deepcopy(module), adapter_name="default"
    )
    tensors = get_peft_model_state_dict(model, adapter_name="default")
    generator = torch.Generator().manual_seed(seed)
    return {k: magnitude * torch.randn(v.shape, generator=generator) for k, v in sorted(tensors.items())}


def to_kohya(tensors: dict[str, torch.Tensor], prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """The same factors under kohya's names, with an alpha; up is multiplied by rank/alpha so the
    product alpha/rank * up @ down is the peft file's."""
    out = {}
    for key, value in tensors.items():
        path, role = key.rsplit(".lora_", 1)
        name = prefix + path.replace(".", "_")
        if role == "A.weight":
            out[name + ".lora_down.weight"] = value
            out[name + ".alpha"] = torch.tensor(alpha)
        else:
            out[name + ".lora_up.weight"] = value * (RANK / alpha)
    return out


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    return save_diffusers_folder(tmp_path_factory.mktemp("sd1") / "model", kind="sd1", seed=0)


@pytest.fixture(scope="module")
def lora_tensors():
    """{"unet": peft tensors, "text_encoder": peft tensors} for the SD1 reference models."""
    models = build_reference_models("sd1", seed=0)
    return {
        "unet": peft_lora(models["unet"], UNET_TARGETS, seed=1),
        "text_encoder": peft_lora(models["text_encoder"], TEXT_TARGETS, seed=2, magnitude=0.4),
        "second": peft_lora(models["unet"], ["to_k", "to_v", "conv2"], seed=3),
    }


@pytest.fixture(scope="module")
def lora_files(lora_tensors, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    unet, text = lora_tensors["unet"], lora_tensors["text_encoder"]
    peft = {**{"unet." + k: v for k, v in unet.items()}, **{"text_encoder." + k: v for k, v in text.items()}}
    kohya = {**to_kohya(unet, "lora_unet_", alpha=2.0), **to_kohya(text, "lora_te_", alpha=2.0)}
    files = {"peft": folder / "peft.safetensors", "kohya": folder / "kohya.safetensors"}
    save_file(peft, str(files["peft"]))
    save_file(kohya, str(files["kohya"]))
    unet_only = folder / "unet_only.safetensors"
    save_file({"unet." + k: v for k, v in unet.items()}, str(unet_only))
    files["unet_only"] = unet_only
    second = folder / "second.safetensors"
    save_file({"unet." + k: v for k, v in lora_tensors["second"].items()}, str(second))
    files["second"] = second
    return files


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return runtime.load(sd1_folder, backend="torch", device="cpu", dtype=torch.float32)


def diffusers_image(folder, adapters: dict):
    """diffusers' image with the LoRA files `adapters` ({path: scale}) loaded and set as adapters."""
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    reference.set_progress_bar_config(disable=True)
    names = [f"a{i}" for i in range(len(adapters))]
    for name, path in zip(names, adapters):
        reference.load_lora_weights(str(path), adapter_name=name)
    reference.set_adapters(names, adapter_weights=list(adapters.values()))
    return reference(
        "a red fox",
        num_inference_steps=RUN["steps"],
        guidance_scale=RUN["guidance"],
        width=RUN["width"],
        height=RUN["height"],
        generator=torch.Generator().manual_seed(RUN["seed"]),
    ).images[0]


@pytest.mark.parametrize("style", ["peft", "kohya"])
def test_lora_image_matches_diffusers(pipe, sd1_folder, lora_files, style):
    base = pipe.generate("a red fox", **RUN)[0]
    name = pipe.load_lora(lora_files[style], scale=0.7)
    try:
        mine = pipe.generate("a red fox", **RUN)[0]
    finally:
        pipe.unload_lora(name)
    theirs = diffusers_image(sd1_folder, {lora_files[style]: 0.7})
    assert psnr(base, theirs) < 30, "the LoRA should change the image"
    assert psnr(mine, theirs) >= MIN_PSNR_DB, f"{style}: PSNR {psnr(mine, theirs):.1f} dB"
    if style == "peft":  # the text-encoder half matters too: the UNet half alone is not diffusers' image
        pipe.load_lora(lora_files["unet_only"], scale=0.7)
        try:
            unet_only = pipe.generate("a red fox", **RUN)[0]
        finally:
            pipe.unload_lora()
        assert psnr(unet_only, theirs) < MIN_PSNR_DB


def test_two_loras_match_diffusers_set_adapters(pipe, sd1_folder, lora_files):
    pipe.load_lora(lora_files["kohya"], scale=0.6)
    pipe.load_lora(lora_files["second"], scale=-0.8)
    try:
        mine = pipe.generate("a red fox", **RUN)[0]
    finally:
        pipe.unload_lora()
    theirs = diffusers_image(sd1_folder, {lora_files["kohya"]: 0.6, lora_files["second"]: -0.8})
    assert psnr(mine, theirs) >= MIN_PSNR_DB, f"PSNR {psnr(mine, theirs):.1f} dB"


def test_unloading_restores_the_base_bit_for_bit(pipe, lora_files):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    base = np.asarray(pipe.generate("a red fox", **RUN)[0])
    pipe.load_lora(lora_files["kohya"], scale=1.3, name="a")
    pipe.load_lora(lora_files["peft"], scale=-0.4, name="b")
    assert pipe.loras == {"a": 1.3, "b": -0.4}
    changed = sum(not torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert changed > 20
    pipe.set_lora_scale("a", 0.2)
    pipe.unload_lora("a")
    assert pipe.loras == {"b": -0.4}
    pipe.unload_lora()
    assert pipe.loras == {}
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(text_before[k], v) for k, v in pipe.text_encoder.state_dict().items())
    assert np.array_equal(np.asarray(pipe.generate("a red fox", **RUN)[0]), base)
    assert pipe._loras.base_bytes == 0  # no copy kept once nothing is applied


def test_two_loras_sum_their_scaled_deltas(pipe, lora_files):
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    base = pipe.unet.state_dict()[key].clone()
    pipe.load_lora(lora_files["peft"], scale=1.0, name="one")
    one = pipe.unet.state_dict()[key] - base
    pipe.set_lora_scale("one", 0.5)
    pipe.load_lora(lora_files["kohya"], scale=0.25, name="two")  # the same product (alpha folded in up)
    both = pipe.unet.state_dict()[key] - base
    pipe.unload_lora()
    torch.testing.assert_close(both, 0.75 * one, rtol=1e-4, atol=1e-6)
    assert one.abs().max() > 0


def test_locon_conv_delta_is_the_reshaped_product(pipe, lora_tensors, lora_files):
    key = "down_blocks.0.resnets.0.conv1"
    down, up = lora_tensors["unet"][key + ".lora_A.weight"], lora_tensors["unet"][key + ".lora_B.weight"]
    assert down.shape[-2:] == (3, 3)
    base = pipe.unet.state_dict()[key + ".weight"].clone()
    pipe.load_lora(lora_files["peft"], scale=2.0, name="c")
    delta = pipe.unet.state_dict()[key + ".weight"] - base
    pipe.unload_lora()
    expected = 2.0 * (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- CUDA graphs (the CPU fake)
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_random_model("tiny", tmp_path_factory.mktemp("tiny") / "model")


def test_a_swap_under_cuda_graphs_needs_no_new_capture(tiny_model, tmp_path):
    components = runtime.load(tiny_model, backend="torch", device="cpu", dtype="fp32").components
    fake = FakeCudaGraphs()
    graphed = Pipeline(components, backend="torch", cuda_graphs=True, graph_api=fake)
    eager = Pipeline(components, backend="torch")
    run = dict(RUN, width=32, height=48)
    base = np.asarray(graphed.generate("a cat", **run)[0])
    captures = fake.captures
    assert captures > 0
    graphed.load_lora(write_kohya_unet_lora(components.unet, tmp_path / "a.safetensors", seed=3), scale=0.8)
    with_lora = np.asarray(graphed.generate("a cat", **run)[0])
    assert fake.captures == captures, "a LoRA swap must not recapture"
    assert psnr(with_lora, base) < 40
    graphed.set_lora_scale("a", 0.3)
    rescaled = np.asarray(graphed.generate("a cat", **run)[0])
    assert np.array_equal(rescaled, np.asarray(eager.generate("a cat", **run)[0]))  # weights are shared
    graphed.unload_lora()
    assert np.array_equal(np.asarray(graphed.generate("a cat", **run)[0]), base)
    assert fake.captures == captures


# ---------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def tiny_pipe(tiny_model):
    return runtime.load(tiny_model, backend="torch", device="cpu", dtype="fp32")


def _write(path, tensors):
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    "key, variant",
    [
        ("lora_unet_conv_in.hada_w1_a", "LoHa"),
        ("lora_unet_conv_in.lokr_w1", "LoKr"),
        ("unet.conv_in.lora_magnitude_vector.dora_scale", "DoRA"),
    ],
)
def test_unsupported_variants_are_refused_by_pattern(tiny_pipe, tmp_path, key, variant):
    path = _write(tmp_path / "x.safetensors", {key: torch.ones(2, 2)})
    with pytest.raises(LoraError, match=variant) as error:
        tiny_pipe.load_lora(path)
    assert key in str(error.value)
    assert tiny_pipe.loras == {}


def test_shape_mismatch_names_the_key(tiny_pipe, tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = _write(
        tmp_path / "xl.safetensors",
        {name + ".lora_down.weight": torch.ones(4, 640), name + ".lora_up.weight": torch.ones(640, 4)},
    )
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    with pytest.raises(LoraError, match="does not fit") as error:
        tiny_pipe.load_lora(path)
    assert name in str(error.value) and "another family" in str(error.value)
    xl = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # SDXL's context is 2048 wide
    path = _write(
        tmp_path / "xl2.safetensors",
        {xl + ".lora_down.weight": torch.ones(4, 2048), xl + ".lora_up.weight": torch.ones(640, 4)},
    )
    with pytest.raises(LoraError, match="the LoRA is for sdxl.*the model is sd1") as error:
        tiny_pipe.load_lora(path)
    assert xl in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in tiny_pipe.unet.state_dict().items())


def test_keys_matching_no_layer_are_counted_and_named(tiny_pipe, tmp_path):
    tensors = {}
    for i in range(7):
        tensors[f"lora_unet_nowhere_{i}.lora_down.weight"] = torch.ones(4, 8)
        tensors[f"lora_unet_nowhere_{i}.lora_up.weight"] = torch.ones(8, 4)
    path = _write(tmp_path / "stray.safetensors", tensors)
    with pytest.raises(LoraError, match="7 key") as error:
        tiny_pipe.load_lora(path)
    assert "lora_unet_nowhere_0" in str(error.value) and "2 more" in str(error.value)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5", True])
def test_a_bad_scale_is_refused(tiny_pipe, tiny_model, tmp_path, scale):
    unet = tiny_pipe.unet
    path = write_kohya_unet_lora(unet, tmp_path / "ok.safetensors", seed=1)
    with pytest.raises(LoraError, match="finite number"):
        tiny_pipe.load_lora(path, scale=scale)
    name = tiny_pipe.load_lora(path)
    try:
        with pytest.raises(LoraError, match="finite number"):
            tiny_pipe.set_lora_scale(name, scale)
    finally:
        tiny_pipe.unload_lora()


def test_not_a_lora_pickle_corrupt_and_unknown_names(tiny_pipe, tiny_model, tmp_path):
    checkpoint = _write(tmp_path / "full.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2)})
    with pytest.raises(LoraError, match="no LoRA keys.*full checkpoint"):
        tiny_pipe.load_lora(checkpoint)
    pickle = tmp_path / "lora.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, pickle)
    with pytest.raises(LoraError, match="pickle"):
        tiny_pipe.load_lora(pickle)
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoraError, match="not a readable"):
        tiny_pipe.load_lora(corrupt)
    with pytest.raises(LoraError, match="no LoRA named 'ghost'"):
        tiny_pipe.unload_lora("ghost")
    path = write_kohya_unet_lora(tiny_pipe.unet, tmp_path / "twice.safetensors", seed=2)
    tiny_pipe.load_lora(path)
    try:
        with pytest.raises(LoraError, match="already loaded"):
            tiny_pipe.load_lora(path)
    finally:
        tiny_pipe.unload_lora()


def test_a_layer_named_twice_or_half_given_is_refused(tiny_pipe, tmp_path):
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    width = tiny_pipe.unet.state_dict()[layer + ".weight"].shape[1]
    kohya = "lora_unet_" + layer.replace(".", "_")
    twice = {
        kohya + ".lora_down.weight": torch.ones(RANK, width),
        kohya + ".lora_up.weight": torch.ones(width, RANK),
        f"unet.{layer}.lora_A.weight": torch.ones(RANK, width),
        f"unet.{layer}.lora_B.weight": torch.ones(width, RANK),
    }
    with pytest.raises(LoraError, match="both name"):
        tiny_pipe.load_lora(_write(tmp_path / "twice.safetensors", twice))
    with pytest.raises(LoraError, match=f"{kohya} has no up factor"):
        tiny_pipe.load_lora(
            _write(tmp_path / "half.safetensors", {kohya + ".lora_down.weight": torch.ones(RANK, width)})
        )
    nan = {
        kohya + ".lora_down.weight": torch.full((RANK, width), float("nan")),
        kohya + ".lora_up.weight": torch.ones(width, RANK),
    }
    with pytest.raises(LoraError, match="NaN"):
        tiny_pipe.load_lora(_write(tmp_path / "nan.safetensors", nan))
    assert tiny_pipe.loras == {}


def test_exported_backends_say_not_yet(tiny_pipe, tmp_path):
    class Exported:  # an exported network is not a torch module
        pass

    components = copy.copy(tiny_pipe.components)
    pipe = Pipeline(components)
    pipe.unet = Exported()
    pipe.backend = "onnxruntime"
    with pytest.raises(NotImplementedError, match="onnxruntime"):
        pipe.load_lora(tmp_path / "any.safetensors")


# ---------------------------------------------------------------- SDXL: two text encoders
def test_sdxl_kohya_te1_te2_and_peft_text_encoder_2_reach_their_encoders(tmp_path):
    from tests.sdxl_factory import save_sdxl_folder

    pipe = runtime.load(save_sdxl_folder(tmp_path / "xl"), backend="torch", device="cpu", dtype="fp32")
    one, two = pipe.text_encoder.state_dict(), pipe.components.text_encoder_2.state_dict()
    key_1 = next(k for k in one if k.endswith("self_attn.q_proj.weight"))
    key_2 = next(k for k in two if k.endswith("mlp.fc1.weight"))
    path_1, path_2 = key_1[: -len(".weight")], key_2[: -len(".weight")]
    if not path_1.startswith("text_model."):  # LoRA files name CLIPTextModel's layers with the prefix
        path_1 = "text_model." + path_1
    generator = torch.Generator().manual_seed(0)

    def factors(weight):
        return torch.randn(RANK, weight.shape[1], generator=generator), torch.randn(
            weight.shape[0], RANK, generator=generator
        )

    (down_1, up_1), (down_2, up_2) = factors(one[key_1]), factors(two[key_2])
    kohya = {
        "lora_te1_" + path_1.replace(".", "_") + ".lora_down.weight": down_1,
        "lora_te1_" + path_1.replace(".", "_") + ".lora_up.weight": up_1,
        "lora_te2_" + path_2.replace(".", "_") + ".lora_down.weight": down_2,
        "lora_te2_" + path_2.replace(".", "_") + ".lora_up.weight": up_2,
        "lora_te2_" + path_2.replace(".", "_") + ".alpha": torch.tensor(2.0),
    }
    peft = {f"text_encoder_2.{path_2}.lora_A.weight": down_2, f"text_encoder_2.{path_2}.lora_B.weight": up_2}
    base_1, base_2 = one[key_1].clone(), two[key_2].clone()
    pipe.load_lora(_write(tmp_path / "k.safetensors", kohya), scale=0.5)
    torch.testing.assert_close(
        pipe.text_encoder.state_dict()[key_1] - base_1, 0.5 * up_1 @ down_1, rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        pipe.components.text_encoder_2.state_dict()[key_2] - base_2,
        0.5 * 2.0 / RANK * up_2 @ down_2,
        rtol=1e-4,
        atol=1e-5,
    )
    pipe.load_lora(_write(tmp_path / "p.safetensors", peft), scale=1.0)
    torch.testing.assert_close(
        pipe.components.text_encoder_2.state_dict()[key_2] - base_2, (0.25 + 1.0) * up_2 @ down_2, rtol=1e-4, atol=1e-5
    )
    pipe.unload_lora()
    assert torch.equal(pipe.text_encoder.state_dict()[key_1], base_1)
    assert torch.equal(pipe.components.text_encoder_2.state_dict()[key_2], base_2)


def test_sd2_kohya_lora_matches_diffusers(tmp_path):
    """SD2-shaped: linear proj_in / proj_out (use_linear_projection), v-prediction, OpenCLIP-shaped text."""
    folder = save_diffusers_folder(tmp_path / "sd2", kind="sd2", seed=1)
    models = build_reference_models("sd2", seed=1)
    tensors = {
        **to_kohya(peft_lora(models["unet"], UNET_TARGETS, seed=4), "lora_unet_", alpha=8.0),
        **to_kohya(peft_lora(models["text_encoder"], TEXT_TARGETS, seed=5, magnitude=0.4), "lora_te_", alpha=8.0),
    }
    path = _write(tmp_path / "sd2_lora.safetensors", tensors)
    pipe = runtime.load(folder, backend="torch", device="cpu", dtype=torch.float32)
    base = pipe.generate("a red fox", **RUN)[0]
    pipe.load_lora(path, scale=0.9)
    mine = pipe.generate("a red fox", **RUN)[0]
    theirs = diffusers_image(folder, {path: 0.9})
    assert psnr(base, theirs) < 30, "the LoRA should change the image"
    assert psnr(mine, theirs) >= MIN_PSNR_DB, f"PSNR {psnr(mine, theirs):.1f} dB"


def test_a_lora_reaches_the_triton_backends_fused_qkv_weight(tiny_model, tmp_path):
    """The triton backend concatenates q, k, v into one weight with to_q/to_k/to_v as views of it: an
    in-place LoRA must change what the fused GEMM reads, exactly as on the unfused model."""
    from runtime.backends.fused_qkv import fuse_qkv

    plain = runtime.load(tiny_model, backend="torch", device="cpu", dtype="fp32")
    fused = runtime.load(tiny_model, backend="torch", device="cpu", dtype="fp32")
    fuse_qkv(fused.unet)
    path = write_kohya_unet_lora(plain.unet, tmp_path / "qkv.safetensors", seed=7)  # to_q, to_v, proj_out
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, plain.unet.config.in_channels, 8, 8, generator=generator)
    context = torch.randn(1, 77, plain.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        before = fused.unet(sample, torch.tensor(10), context)
        for pipe in (plain, fused):
            pipe.load_lora(path, scale=0.9)
        mine, reference = fused.unet(sample, torch.tensor(10), context), plain.unet(sample, torch.tensor(10), context)
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(mine, before, atol=1e-3)
        fused.unload_lora()
        assert torch.equal(fused.unet(sample, torch.tensor(10), context), before)
