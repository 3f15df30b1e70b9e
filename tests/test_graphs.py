"""Denoising under CUDA graphs (runtime/graphs.py): capture == replay == eager bit for bit, the cache
stays bounded (LRU), history and buffers never leak between runs, concurrent callers get their own images.

Every test of the graph logic runs twice: on the CPU with the stand-in API of tests/fake_cuda_graphs.py
(fp16 on the CPU, so a guidance fp16 cannot represent is checked here too), and with torch.cuda on a GPU
(the triton backend; skipped without CUDA). Comparisons are of the final latents, exactly.
"""

import copy
import json
import logging
import shutil
import threading

import numpy as np
import PIL.Image
import pytest
import torch

import runtime
from runtime.bench.presets import preset_configs, write_random_model
from runtime.graphs import CudaGraphDenoiser
from runtime.pipeline import GenerationCancelled, Pipeline
from runtime.schedulers import SCHEDULER_NAMES, make_scheduler
from tests import seeding
from tests.fake_cuda_graphs import FakeCudaGraphs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GUIDANCES = (1.0, 7.3)  # off, and a value fp16 rounds (to 7.30078)
SIZE = dict(width=32, height=48)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_random_model("tiny", tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def inpaint9_model(tiny_model, tmp_path_factory):
    """The tiny folder with a seeded random 9-channel inpainting UNet."""
    from safetensors.torch import save_file

    from runtime.models.unet import UNet, UNetConfig

    folder = tmp_path_factory.mktemp("tiny9") / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["in_channels"] = 9
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with seeding.global_rng(9):
        unet = UNet(UNetConfig.from_dict(config))
    save_file(
        {k: v.contiguous() for k, v in unet.state_dict().items()},
        str(folder / "unet" / "diffusion_pytorch_model.safetensors"),
    )
    return folder


@pytest.fixture(scope="module", params=["fake", pytest.param("real", marks=[pytest.mark.gpu, needs_cuda])])
def api(request):
    return request.param


@pytest.fixture(scope="module")
def pipelines(api):
    """pipelines(folder, dtype) -> (graphed, eager, fake API or None): fresh pipelines (an empty graph
    cache) over components loaded once per folder and dtype."""
    loaded = {}

    def make(folder, dtype="fp16", max_entries=4):
        if (folder, dtype) not in loaded:
            if api == "fake":
                loaded[folder, dtype] = runtime.load(folder, backend="torch", device="cpu", dtype=dtype).components
            else:
                loaded[folder, dtype] = runtime.load(
                    folder, backend="triton", device="cuda", dtype=dtype, cuda_graphs=False
                ).components
        components = loaded[folder, dtype]
        backend = "torch" if api == "fake" else "triton"
        fake = FakeCudaGraphs() if api == "fake" else None
        graphed = Pipeline(components, backend=backend, cuda_graphs=True, graph_api=fake)
        graphed.graphs.max_entries = max_entries
        return graphed, Pipeline(components, backend=backend, cuda_graphs=False), fake

    return make


def _final_latents(pipe, run):
    """The latents `run(pipe)` hands to the VAE (recorded on this instance only)."""
    seen = []
    decode = pipe.decode_latents
    pipe.decode_latents = lambda latents: (seen.append(latents.clone()), decode(latents))[1]
    try:
        run(pipe)
    finally:
        del pipe.decode_latents
    assert len(seen) == 1
    return seen[0]


def _txt2img(scheduler="dpmpp_2m", guidance=7.3, steps=4, seed=3, prompt="a red fox", **extra):
    kwargs = dict(
        steps=steps,
        seed=seed,
        num_images=2,
        scheduler=scheduler,
        guidance=guidance,
        progress=False,
        **{**SIZE, **extra},
    )
    if guidance > 1:
        kwargs["negative_prompt"] = "blurry"
    return lambda pipe: pipe.generate(prompt, **kwargs)


def _assert_bits_equal(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert torch.isfinite(expected).all(), f"{what}: the eager latents are not finite"
    mismatched = (actual != expected).sum().item()
    assert mismatched == 0, f"{what}: {mismatched} of {actual.numel()} latents differ from eager"


def _capture_replay_eager(graphed, eager, run, what):
    captured = _final_latents(graphed, run)
    replayed = _final_latents(graphed, run)
    reference = _final_latents(eager, run)
    _assert_bits_equal(captured, reference, f"{what}, first run (capture)")
    _assert_bits_equal(replayed, reference, f"{what}, second run (replay)")
    return reference


# ---------------------------------------------------------------- the stand-in itself
def test_fake_graph_replays_into_its_buffers_and_computes_nothing_at_capture():
    fake = FakeCudaGraphs()
    x, history = torch.ones(3), torch.zeros(3)
    graph = fake.CUDAGraph()
    with fake.graph(graph):
        y = x * 2 + history
        history.copy_(y)
    assert torch.isnan(y).all()  # a capture computes nothing usable
    assert torch.equal(history, torch.zeros(3))  # and its writes into older tensors are undone
    x.fill_(5.0)
    graph.replay()
    assert torch.equal(y, torch.full((3,), 10.0)) and torch.equal(history, y)
    graph.replay()  # reads the history it wrote: 10 + 10
    assert torch.equal(y, torch.full((3,), 20.0))
    with pytest.raises(RuntimeError, match="syncs with the host"):
        with fake.graph(fake.CUDAGraph()):
            (x.sum() > 0).item()


def test_cuda_graphs_on_a_cpu_model_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        runtime.load(tiny_model, backend="torch", device="cpu", cuda_graphs=True)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_a_capture_works_on_an_independent_copy_of_the_scheduler(scheduler):
    """copy.deepcopy (what clone() is) used to fail on the config's MappingProxyType."""
    original = make_scheduler(scheduler, preset_configs("tiny")["scheduler"])
    original.set_timesteps(6)
    original.img2img_start(0.7)
    twin = copy.deepcopy(original)
    assert twin.clone().begin_index == twin.begin_index == original.begin_index
    assert twin.config is original.config  # immutable: shared
    generator = torch.Generator().manual_seed(0)
    sample, eps = torch.randn((2, 1, 4, 4, 4), generator=generator)
    noise = original.draw_noise(torch.Generator().manual_seed(1), sample.shape, sample.dtype, "cpu")
    for sched in (original, twin):
        x = sample
        for i in range(original.begin_index, original.num_steps):
            x = sched.step(eps * (i + 1), i, x, None if noise is None else noise[i])
        sched.final = x
    assert torch.equal(twin.final, original.final)
    for name, value in vars(twin).items():  # nothing mutable shared: history buffers are the twin's own
        if isinstance(value, torch.Tensor):
            assert value.data_ptr() != getattr(original, name).data_ptr(), name


# ---------------------------------------------------------------- replay equals eager
@pytest.mark.parametrize("guidance", GUIDANCES)
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_graph_replay_equals_eager_for_every_sampler(pipelines, tiny_model, scheduler, guidance):
    graphed, eager, fake = pipelines(tiny_model)
    _capture_replay_eager(graphed, eager, _txt2img(scheduler, guidance), f"txt2img {scheduler} g={guidance}")
    assert len(graphed.graphs) == 1
    if fake is not None:
        steps = graphed.scheduler.num_steps
        # One graph per step, plus the text encoder's and the VAE decode's (runtime/graph_calls.py).
        assert (fake.captures, fake.replays) == (steps + 2, 2 * (steps + 2))


def test_a_new_guidance_replays_the_same_graphs(pipelines, tiny_model):
    graphed, eager, _ = pipelines(tiny_model)
    for guidance in (7.3, 5.1, 12.7):
        run = _txt2img("euler_a", guidance)
        _assert_bits_equal(_final_latents(graphed, run), _final_latents(eager, run), f"guidance {guidance}")
    assert len(graphed.graphs) == 1


def _picture_and_mask(size=(32, 48)):
    rng = np.random.default_rng(0)
    width, height = size
    image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, : width // 2] = 255
    return image, PIL.Image.fromarray(mask)


@pytest.mark.parametrize("guidance", GUIDANCES)
@pytest.mark.parametrize(
    "mode, scheduler, strength",
    [
        ("img2img", "euler_a", 0.6),
        ("inpaint4", "dpmpp_2m", 0.8),
        ("inpaint4", "pndm", 1.0),
        ("inpaint9", "pndm", 1.0),
        ("inpaint9", "lcm", 0.7),
    ],
)
def test_img2img_and_inpaint_replay_equal_eager(
    pipelines, tiny_model, inpaint9_model, mode, scheduler, strength, guidance
):
    """Graphs that start mid-schedule (img2img, strength < 1), a between-step hook that rewrites the
    latents (4-channel inpainting's blend) and extra conditioning channels (9-channel inpainting)."""
    graphed, eager, _ = pipelines(inpaint9_model if mode == "inpaint9" else tiny_model)
    image, mask = _picture_and_mask()
    kwargs = dict(strength=strength, steps=5, seed=2, scheduler=scheduler, guidance=guidance, progress=False)
    if mode == "img2img":

        def run(pipe):
            return pipe.img2img(image, "a fox", **kwargs)
    else:

        def run(pipe):
            return pipe.inpaint(image, mask, "a fox", **kwargs)

    _capture_replay_eager(graphed, eager, run, f"{mode} {scheduler} strength {strength} g={guidance}")


# ---------------------------------------------------------------- no state leaks between runs
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_a_replay_after_a_nan_run_equals_eager(pipelines, tiny_model, scheduler):
    """Multistep history (DPM++'s previous x0, PNDM's past outputs) is read by the graphs in place: a
    run that went NaN must not poison the next replay, as it cannot poison the next eager image."""
    graphed, _, fake = pipelines(tiny_model)
    runner = CudaGraphDenoiser(graphed.denoise_step, graph_api=fake)  # fake None: torch.cuda
    sched = make_scheduler(scheduler, graphed.scheduler_config)
    sched.set_timesteps(4, device=graphed.device)
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn((1, 4, 6, 4), generator=generator).to(graphed.device, graphed.dtype)
    noise = sched.draw_noise(generator, latents.shape, graphed.dtype, graphed.device)
    with torch.inference_mode():
        context = graphed.encode_prompt(["a fox"], ["blurry"], 7.3)
        inputs = dict(context=context)
        poisoned = runner.run(sched, torch.full_like(latents, float("nan")), 7.3, inputs=inputs, noise=noise)
        assert torch.isnan(poisoned).all()
        replayed = runner.run(sched, latents, 7.3, inputs=inputs, noise=noise)
        sched.reset()
        expected = latents
        for i in range(sched.num_steps):
            expected = graphed.denoise_step(sched, expected, i, context, 7.3, None if noise is None else noise[i])
    _assert_bits_equal(replayed, expected, f"{scheduler} after a NaN run")


def test_new_shapes_capture_within_the_cache_bound_lru(pipelines, tiny_model, caplog):
    graphed, _, _ = pipelines(tiny_model, max_entries=2)
    sizes = {"A": (32, 32), "B": (32, 48), "C": (48, 32)}
    results = {}
    with caplog.at_level(logging.INFO, logger="runtime.graphs"):
        for name in "ABACA":
            width, height = sizes[name]
            run = _txt2img("ddim", 7.3, steps=2, width=width, height=height)
            latents = _final_latents(graphed, run)
            if name in results:
                _assert_bits_equal(latents, results[name], f"shape {name} again")
            results[name] = latents
            assert len(graphed.graphs) <= 2
    captures = [r for r in caplog.records if r.getMessage().startswith("capturing CUDA graphs")]
    # A, B, C captured; A's second and third runs replay (C evicted B, the least recently used, not A).
    assert len(captures) == 3
    assert [key.latent_shape[2:] for key in graphed.graphs.keys()]  # noqa: SIM118 (a method, not a dict) == [(4, 6), (4, 4)]


def test_scheduler_or_step_count_change_between_runs(pipelines, tiny_model):
    graphed, eager, _ = pipelines(tiny_model)
    for scheduler, steps in (("dpmpp_2m", 4), ("euler", 4), ("dpmpp_2m", 3), ("dpmpp_2m_karras", 4), ("dpmpp_2m", 4)):
        run = _txt2img(scheduler, 7.3, steps=steps)
        _assert_bits_equal(_final_latents(graphed, run), _final_latents(eager, run), f"{scheduler} x{steps}")
    assert len(graphed.graphs) == 4


def test_cancel_mid_run_and_callbacks_get_tensors_they_own(pipelines, tiny_model):
    graphed, eager, _ = pipelines(tiny_model)

    def cancelled_latents(pipe):
        def stop_after_two(step, timestep, latents):
            return step < 1

        with pytest.raises(GenerationCancelled) as caught:
            _txt2img("dpmpp_2m", 7.3, seed=1, callback=stop_after_two)(pipe)
        assert caught.value.step_index == 1
        return caught.value.latents

    def per_step_latents(pipe, seed):
        kept = []
        _txt2img("dpmpp_2m", 7.3, seed=seed, callback=lambda step, t, latents: kept.append(latents))(pipe)
        return kept

    cancelled, expected_cancelled = cancelled_latents(graphed), cancelled_latents(eager)
    kept = per_step_latents(graphed, seed=1)
    expected_kept = per_step_latents(eager, seed=1)
    _assert_bits_equal(
        _final_latents(graphed, _txt2img("dpmpp_2m", 7.3, seed=2)),
        _final_latents(eager, _txt2img("dpmpp_2m", 7.3, seed=2)),
        "a full run after a cancel",
    )
    # Later runs reuse the static buffers; what callers were given must not change under them.
    _assert_bits_equal(cancelled, expected_cancelled, "GenerationCancelled.latents")
    assert len(kept) == len(expected_kept) == 4
    for step, (mine, theirs) in enumerate(zip(kept, expected_kept)):
        _assert_bits_equal(mine, theirs, f"callback latents of step {step}")


def test_concurrent_callers_get_their_own_images(pipelines, tiny_model):
    graphed, eager, _ = pipelines(tiny_model)
    seeds = range(3)

    def final_latents(pipe, seed):
        # The callback's latents after the last step are the final ones; a local list is thread-safe.
        kept = []
        _txt2img("euler_a", 7.3, steps=3, seed=seed, callback=lambda step, t, latents: kept.append(latents))(pipe)
        return kept[-1]

    expected = {seed: final_latents(eager, seed) for seed in seeds}
    final_latents(graphed, 0)  # capture first, so the threads race on replays
    results, errors = {}, []

    def worker(seed):
        try:
            results[seed] = final_latents(graphed, seed)
        except Exception as err:  # reported below: an assert in a thread would be lost
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for seed in seeds:
        _assert_bits_equal(results[seed], expected[seed], f"seed {seed} from a thread")


# ---------------------------------------------------------------- cross-attention K/V once per request
def _captures(graphed, fake) -> int:
    """Graphs captured so far (the fake counts them; on a GPU, the cached entries' graphs)."""
    return fake.captures if fake is not None else sum(len(entry.graphs) for entry in graphed.graphs._entries.values())


def test_context_kv_is_a_static_input_refreshed_per_request(pipelines, tiny_model):
    """The projected K/V of the context is one of the named static inputs: a new prompt between two replays
    copies its own K/V in (the image eager gives for that prompt), not the captured prompt's."""
    graphed, eager, fake = pipelines(tiny_model)
    fox, boat = _txt2img("euler_a", 7.3), _txt2img("euler_a", 7.3, prompt="a blue boat")
    first = _final_latents(graphed, fox)
    (key,) = graphed.graphs.keys()
    assert "context_kv" in [name for name, _, _ in key.inputs]
    captures = _captures(graphed, fake)
    second = _final_latents(graphed, boat)
    assert _captures(graphed, fake) == captures, "a new prompt must replay, not capture"
    _assert_bits_equal(second, _final_latents(eager, boat), "a new prompt's replay")
    _assert_bits_equal(_final_latents(graphed, fox), first, "the first prompt again")
    assert not torch.equal(first, second), "the new prompt's image must differ"


def _cross_attention_lora(unet, path, seed=4):
    """A kohya LoRA on the cross-attentions' to_k and to_v only: exactly the weights the stacked GEMM reads."""
    from safetensors.torch import save_file

    tensors, generator = {}, torch.Generator().manual_seed(seed)
    for key, weight in unet.state_dict().items():
        if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            tensors[name + ".lora_down.weight"] = 0.5 * torch.randn((2, weight.shape[1]), generator=generator)
            tensors[name + ".lora_up.weight"] = 0.5 * torch.randn((weight.shape[0], 2), generator=generator)
    assert tensors
    save_file(tensors, str(path))
    return path


def test_a_lora_on_cross_attention_kv_changes_the_replay_without_a_capture(pipelines, tiny_model, tmp_path):
    graphed, eager, fake = pipelines(tiny_model)
    run = _txt2img("dpmpp_2m", 7.3)
    base = _final_latents(graphed, run)
    captures = _captures(graphed, fake)
    graphed.load_lora(_cross_attention_lora(graphed.unet, tmp_path / "kv.safetensors"))
    try:
        with_lora = _final_latents(graphed, run)
        assert _captures(graphed, fake) == captures, "a LoRA load must not recapture"
        assert not torch.equal(with_lora, base), "the LoRA must reach the K/V the graphs read"
        _assert_bits_equal(with_lora, _final_latents(eager, run), "with the LoRA (the weights are shared)")
    finally:
        graphed.unload_lora()
    _assert_bits_equal(_final_latents(graphed, run), base, "after unloading")
    assert _captures(graphed, fake) == captures


# ---------------------------------------------------------------- real GPU only
@pytest.mark.gpu
@needs_cuda
def test_no_memory_growth_over_200_generations(tiny_model):
    pipe = runtime.load(tiny_model, backend="triton", device="cuda", dtype="fp16")
    for _ in range(3):  # warm-up: capture, allocator pools
        pipe.generate("a boat", steps=2, width=64, height=64, seed=0, progress=False)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for seed in range(200):
        pipe.generate("a boat", steps=2, width=64, height=64, seed=seed, progress=False)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before
