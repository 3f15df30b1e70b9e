"""Denoising under CUDA graphs (runtime/graphs.py): replay equals eager, the cache stays bounded,
memory does not grow, concurrent callers get their own images. GPU tests skip cleanly without CUDA."""
import threading

import numpy as np
import pytest
import torch

import runtime
from runtime.bench.presets import write_random_model
from runtime.schedulers import SCHEDULER_NAMES

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_random_model("tiny", tmp_path_factory.mktemp("tiny") / "model")


def _pixels(images):
    return np.stack([np.asarray(image) for image in images])


def test_cuda_graphs_on_a_cpu_model_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        runtime.load(tiny_model, backend="torch", device="cpu", cuda_graphs=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_graph_replay_equals_eager_execution(tiny_model, scheduler):
    graphed = runtime.load(tiny_model, backend="triton", device="cuda", dtype="fp16")
    eager = runtime.load(tiny_model, backend="triton", device="cuda", dtype="fp16", cuda_graphs=False)
    assert graphed.graphs is not None and eager.graphs is None
    kwargs = dict(negative_prompt="blurry", steps=4, width=64, height=48, seed=3, num_images=2,
                  scheduler=scheduler, progress=False)
    first = _pixels(graphed.generate("a red fox", **kwargs))      # captures
    replayed = _pixels(graphed.generate("a red fox", **kwargs))   # replays
    reference = _pixels(eager.generate("a red fox", **kwargs))
    np.testing.assert_array_equal(first, replayed)
    np.testing.assert_array_equal(replayed, reference)


@pytest.mark.gpu
@needs_cuda
def test_img2img_and_inpaint_replay_equal_eager(tiny_model):
    """Graphs that start mid-schedule (img2img) and a between-step hook that rewrites the latents
    (4-channel inpainting's blend)."""
    import PIL.Image

    graphed = runtime.load(tiny_model, backend="triton", device="cuda", dtype="fp16")
    eager = runtime.load(tiny_model, backend="triton", device="cuda", dtype="fp16", cuda_graphs=False)
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = PIL.Image.fromarray(np.where(np.arange(64)[None, :] < 32, 255, 0).astype(np.uint8).repeat(64, 0))
    for run in (lambda p: p.img2img(image, "a fox", strength=0.6, steps=5, seed=2, progress=False),
                lambda p: p.inpaint(image, mask, "a fox", strength=1.0, steps=4, seed=2, progress=False)):
        expected = _pixels(run(eager))
        np.testing.assert_array_equal(_pixels(run(graphed)), expected)  # captures
        np.testing.assert_array_equal(_pixels(run(graphed)), expected)  # replays


@pytest.mark.gpu
@needs_cuda
def test_new_shapes_capture_within_the_cache_bound(tiny_model):
    pipe = runtime.load(tiny_model, backend="triton", device="cuda", dtype="fp16")
    pipe.graphs.max_entries = 2
    for width, height in ((64, 64), (64, 48), (48, 64), (64, 64)):
        pipe.generate("a boat", steps=2, width=width, height=height, seed=0, progress=False)
        assert len(pipe.graphs) <= 2


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


@pytest.mark.gpu
@needs_cuda
def test_concurrent_callers_get_their_own_images(tiny_model):
    pipe = runtime.load(tiny_model, backend="triton", device="cuda", dtype="fp16")
    expected = {seed: _pixels(pipe.generate("a boat", steps=3, width=64, height=64, seed=seed, progress=False))
                for seed in range(4)}
    results = {}

    def worker(seed):
        results[seed] = _pixels(pipe.generate("a boat", steps=3, width=64, height=64, seed=seed, progress=False))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in range(4):
        np.testing.assert_array_equal(results[seed], expected[seed])
