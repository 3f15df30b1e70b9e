"""A whole request from CUDA graphs (runtime/graph_calls.py): the text encoder(s) and the VAE decode replay
like the denoising steps. Images equal eager bit for bit (SD 1.5 tiny, SDXL tiny), one capture per shape,
reused; a new prompt length / batch / image size captures anew; a LoRA merged after capture reaches the
replay without a capture; weights moved to new memory (.to(), a fused weight stacked again, an assigned
.data) drop the graphs; the cache is a bounded LRU. On the CPU with tests/fake_cuda_graphs.py: SD 1.5 tiny
in fp32 (fast on a CPU), SDXL tiny in fp16 (its VAE's upcast to fp32 must key the graph).
"""

import copy
import dataclasses
import logging

import numpy as np
import pytest
import torch

import runtime
from runtime.bench.presets import write_random_model
from runtime.graph_calls import CudaGraphCall
from runtime.pipeline import Pipeline
from tests.fake_cuda_graphs import FakeCudaGraphs

RUN = dict(
    steps=1, scheduler="euler", seed=3, width=32, height=32, negative_prompt="blurry", guidance=7.3, progress=False
)
LONG_PROMPT = "a red fox " * 55  # 165 tokens: three 77-token chunks (A1111 syntax)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """name -> the components of a tiny CPU model (SDXL: fp16), loaded once."""
    loaded = {}

    def get(name):
        if name not in loaded:
            folder = write_random_model(name, tmp_path_factory.mktemp(name) / "model")
            loaded[name] = runtime.load(
                folder, backend="torch", device="cpu", dtype="fp16" if "sdxl" in name else "fp32"
            ).components
        return loaded[name]

    return get


def _pipelines(components):
    fake = FakeCudaGraphs()
    graphed = Pipeline(components, backend="torch", cuda_graphs=True, graph_api=fake)
    return graphed, Pipeline(components, backend="torch", cuda_graphs=False), fake


def _image(pipe, prompt="a red fox", **options):
    return np.stack([np.asarray(image) for image in pipe.generate(prompt, **{**RUN, **options})])


def _assert_same(graphed, eager, what):
    assert graphed.shape == eager.shape, what
    assert eager.std() > 1, f"{what}: the eager image is flat"
    assert (graphed != eager).sum() == 0, f"{what}: {(graphed != eager).sum()} pixel values differ from eager"


def _keys(pipe):
    """Cached keys of each encoder / VAE runner."""
    runners = [r for encoder in pipe.text_encoder_graphs for r in encoder.runners()] + [pipe.vae_graphs]
    return {runner.name: runner.keys() for runner in runners}


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_a_whole_request_replays_and_equals_eager(components, model):
    graphed, eager, fake = _pipelines(components(model))
    expected = _image(eager)
    _assert_same(_image(graphed), expected, f"{model}, first run (captures)")
    captures = fake.captures
    _assert_same(_image(graphed), expected, f"{model}, second run (replays)")
    assert fake.captures == captures, "a second identical request must not capture"
    keys = _keys(graphed)
    encoder_calls = "text encoder" if model == "tiny" else "(penultimate and pooled)"
    used = {name: k for name, k in keys.items() if k}
    assert all(len(k) == 1 for k in used.values()), used
    assert any(encoder_calls in name for name in used) and "VAE decode" in used
    if model == "tiny-sdxl":  # both encoders, and the fp16 VAE upcast (force_upcast) keys an fp32 graph
        assert {"text encoder (penultimate and pooled)", "text encoder 2 (penultimate and pooled)"} <= set(used)
        (vae_key,) = used["VAE decode"]
        assert vae_key.inputs[0][1] == torch.float32 and vae_key.extra == (torch.float32,)
        assert next(graphed.vae.parameters()).dtype == torch.float32, "the graphed upcast VAE stays fp32"


def _encode(pipe, prompts, negatives):
    return pipe.encode_prompt(prompts, negatives, guidance=7.3)


def test_new_prompt_length_batch_or_size_captures_anew(components):
    graphed, eager, fake = _pipelines(components("tiny"))
    cases = {  # what -> (prompts, negatives, latents shape)
        "the first request": (["a red fox"], ["blurry"], (1, 4, 4, 4)),
        "two prompts": (["a red fox", "a boat"], ["blurry", ""], (2, 4, 4, 4)),
        "a longer prompt (three chunks)": ([LONG_PROMPT], ["blurry"], (1, 4, 4, 4)),
        "another image size": (["a cat"], ["dark"], (1, 4, 6, 4)),
    }
    expected_keys = {  # what -> (text encoder ids shape, VAE latents shape) captured by it, or None
        "the first request": ((2, 77), (1, 4, 4, 4)),
        "two prompts": ((4, 77), (2, 4, 4, 4)),
        "a longer prompt (three chunks)": ((6, 77), None),
        "another image size": (None, (1, 4, 6, 4)),
    }
    encoder, vae = graphed.text_encoder_graphs[0].forward_graphs, graphed.vae_graphs
    for what, (prompts, negatives, shape) in cases.items():
        encoder_before, vae_before = encoder.keys(), vae.keys()
        context = _encode(graphed, prompts, negatives)
        assert torch.equal(context, _encode(eager, prompts, negatives)), what
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(len(what)))
        assert torch.equal(graphed.decode_latents(latents), eager.decode_latents(latents)), what
        encoder_after, vae_after = encoder.keys(), vae.keys()
        new_encoder = [k.inputs[0][0] for k in encoder_after if k not in encoder_before]
        new_vae = [k.inputs[0][0] for k in vae_after if k not in vae_before]
        ids, latent = expected_keys[what]
        assert new_encoder == ([] if ids is None else [ids]), f"{what}: text encoder captured {new_encoder}"
        assert new_vae == ([] if latent is None else [latent]), f"{what}: VAE captured {new_vae}"
    captures = fake.captures
    for prompts, negatives, shape in cases.values():
        _encode(graphed, prompts, negatives)
        graphed.decode_latents(torch.randn(shape))
    assert fake.captures == captures, "shapes seen before replay from the cache"


def _text_encoder_lora(text_encoder, path, seed=5):
    """A kohya LoRA on every q_proj / v_proj of the (SD 1.x) text encoder."""
    from safetensors.torch import save_file

    tensors, generator = {}, torch.Generator().manual_seed(seed)
    for key, weight in text_encoder.state_dict().items():
        if key.endswith(("q_proj.weight", "v_proj.weight")):
            stem = key.removeprefix("text_model.").removesuffix(".weight").replace(".", "_")
            name = "lora_te_text_model_" + stem
            tensors[name + ".lora_down.weight"] = 0.5 * torch.randn((2, weight.shape[1]), generator=generator)
            tensors[name + ".lora_up.weight"] = 0.5 * torch.randn((weight.shape[0], 2), generator=generator)
    assert tensors
    save_file(tensors, str(path))
    return path


def test_a_text_encoder_lora_after_capture_reaches_the_replay(components, tmp_path):
    graphed, eager, fake = _pipelines(components("tiny"))
    prompts = (["a red fox"], ["blurry"])
    base = _encode(graphed, *prompts)
    captures = fake.captures
    graphed.load_lora(_text_encoder_lora(graphed.text_encoder, tmp_path / "te.safetensors"))
    try:
        with_lora = _encode(graphed, *prompts)
        assert fake.captures == captures, "a LoRA merge writes in place: no capture"
        assert not torch.equal(with_lora, base), "the LoRA must reach the text encoder graph"
        assert torch.equal(with_lora, _encode(eager, *prompts)), "with the LoRA (eager shares the weights)"
    finally:
        graphed.unload_lora()
    assert torch.equal(_encode(graphed, *prompts), base), "after unloading"
    assert fake.captures == captures


def test_weights_in_new_memory_drop_the_graphs(components):
    graphed, eager, fake = _pipelines(components("tiny"))
    latents = torch.randn(1, 4, 4, 4)
    conv_out = graphed.vae.decoder.conv_out
    stages = {
        "the text encoder cast away and back (.to)": (
            lambda: graphed.text_encoder.to(torch.float16).to(torch.float32),
            lambda pipe: _encode(pipe, ["a red fox"], ["blurry"]),
        ),
        "a VAE weight given new memory (.data)": (
            lambda: setattr(conv_out.weight, "data", conv_out.weight.data.clone()),
            lambda pipe: pipe.decode_latents(latents),
        ),
        "the UNet cast away and back (.to)": (
            lambda: graphed.unet.to(torch.float16).to(torch.float32),
            lambda pipe: _image(pipe),
        ),
    }
    for what, (move, stage) in stages.items():
        stage(graphed)
        captures = fake.captures
        move()
        result = stage(graphed)
        assert fake.captures == captures + 1, f"{what}: a capture must follow"
        expected = stage(eager)
        assert (result == expected).all(), f"{what}: differs from eager"
        stage(graphed)
        assert fake.captures == captures + 1, f"{what}: the new graphs are reused"


def test_a_fused_weight_stacked_again_drops_the_vae_graphs(components):
    """The triton backend's fused q/k/v keeps its [3*inner, C] weight as a plain attribute beside the
    Parameters; `.to()` concatenates it again (runtime/backends/fused_qkv.py), even a no-op `.to()`."""
    from runtime.backends.fused_qkv import fuse_qkv

    shared = components("tiny")
    vae = copy.deepcopy(shared.vae)  # fusing re-points the Parameters: never the shared VAE's
    assert fuse_qkv(vae), "the tiny VAE has a mid-block attention to fuse"
    fake = FakeCudaGraphs()
    graphed = Pipeline(dataclasses.replace(shared, vae=vae), backend="torch", cuda_graphs=True, graph_api=fake)
    latents = torch.randn(1, 4, 4, 4)
    first = graphed.decode_latents(latents)
    captures = fake.captures
    vae.to(torch.float32)  # the same dtype: every Parameter stays where it is, the fused weight is new
    again = graphed.decode_latents(latents)
    assert fake.captures == captures + 1, "the graph read the old fused weight: a capture must follow"
    assert torch.equal(first, again)


def test_the_call_cache_is_a_bounded_lru(caplog):
    fake = FakeCudaGraphs()
    weight = torch.randn(3, 3)
    runner = CudaGraphCall(lambda x: (x @ weight).relu(), "toy", max_entries=2, graph_api=fake)
    inputs = {name: torch.randn(rows, 3) for name, rows in zip("ABC", (1, 2, 3))}
    with caplog.at_level(logging.INFO, logger="runtime.graph_calls"):
        for name in "ABACA":
            out = runner(inputs[name])
            assert torch.equal(out, (inputs[name] @ weight).relu()), name
            assert len(runner) <= 2
    assert fake.captures == 3  # A, B, C; A replays twice (C evicted B, the least recently used)
    cached = runner.keys()  # least recently used first: C, then A (A's last call moved it to the end)
    assert [key.inputs[0][0] for key in cached] == [(3, 3), (1, 3)]
    assert sum("capturing a CUDA graph of the toy" in r.getMessage() for r in caplog.records) == 3
    held = runner(inputs["A"])
    runner(2 * inputs["A"])
    assert torch.equal(held, (inputs["A"] @ weight).relu()), "a result is the caller's copy, not a buffer"


def test_out_of_memory_in_a_capture_releases_the_cache():
    fake = FakeCudaGraphs()
    failing = {"now": False}

    def fn(x):
        if failing["now"]:
            raise torch.cuda.OutOfMemoryError("fake")
        return x * 2

    runner = CudaGraphCall(fn, "toy", graph_api=fake)
    runner(torch.ones(2))
    failing["now"] = True
    with pytest.raises(RuntimeError, match="out of memory capturing the toy graph for 3 float32"):
        runner(torch.ones(3))
    assert len(runner) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_on_a_gpu_a_whole_request_replays_and_equals_eager(tmp_path, model):
    """torch.cuda's graphs and the triton backend's kernels: the same bits as the same kernels eagerly."""
    folder = write_random_model(model, tmp_path / "model")
    graphed = runtime.load(folder, backend="triton", device="cuda", dtype="fp16")  # cuda_graphs by default
    assert graphed.vae_graphs is not None and graphed.text_encoder_graphs
    eager = Pipeline(graphed.components, backend="triton", cuda_graphs=False)
    expected = _image(eager)
    _assert_same(_image(graphed), expected, f"{model}, first run (captures)")
    _assert_same(_image(graphed), expected, f"{model}, second run (replays)")
    assert all(len(k) <= 1 for k in _keys(graphed).values()) and _keys(graphed)["VAE decode"]


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_textual_inversion_runs_eagerly_beside_the_graphs(components, model, tmp_path):
    """A prompt naming an embedding feeds the encoder its own inputs: the graphed pipeline runs that
    encoder call eagerly and gives eager's image."""
    from safetensors.torch import save_file

    graphed, eager, _ = _pipelines(components(model))
    encoders = graphed.conditioner.encoders if graphed.conditioner is not None else [(None, eager.text_encoder)]
    widths = [getattr(e, "text_model", e).config.hidden_size for _, e in encoders]
    generator = torch.Generator().manual_seed(5)
    parts = [torch.randn(2, width, generator=generator) for width in widths]
    tensors = dict(zip(("clip_l", "clip_g"), parts)) if len(parts) == 2 else {"emb_params": parts[0]}
    save_file(tensors, str(tmp_path / "inkstyle.safetensors"))
    for pipe in (graphed, eager):
        pipe.embeddings_dir = tmp_path
        pipe.prompt_syntax = "a1111"
    expected = _image(eager, "a photo of inkstyle")
    assert not np.array_equal(expected, _image(eager, "a photo of ink style"))
    _assert_same(_image(graphed, "a photo of inkstyle"), expected, f"{model} with an embedding")
