"""A1111 prompt syntax on SDXL's two encoders (runtime/conditioning.py + runtime/prompt_syntax.py): short
plain prompts keep their exact tensors, emphasis weights each encoder's hidden states with the mean
restored, BREAK and long prompts concatenate chunks, and the pooled embedding is the first chunk's."""

import pytest
import torch

import runtime
from runtime import prompt_syntax
from tests.sdxl_factory import save_sdxl_folder


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return runtime.load(save_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "base", "sdxl", seed=0))


def _encode(pipe, prompts, negatives, syntax, zero_negatives=False):
    with torch.no_grad():
        return pipe.conditioner.encode(prompts, negatives, zero_negatives, True, 1, "cpu", torch.float32, syntax=syntax)


def _chunk_states(pipe, text: str, index: int):
    """Each encoder's (penultimate, pooled) of chunk `index` of `text`, unweighted, encoded alone."""
    out = []
    for tokenizer, encoder in pipe.conditioner.encoders:
        ids, _ = prompt_syntax.prompt_chunks(tokenizer, text)
        with torch.no_grad():
            out.append(encoder.penultimate_and_pooled(torch.tensor([ids[index]])))
    return out


def test_a_short_plain_prompt_keeps_its_exact_tensors(pipe):
    plain = _encode(pipe, ["a red fox, snow"], ["blurry"], "plain")
    a1111 = _encode(pipe, ["a red fox, snow"], ["blurry"], "a1111")
    assert all(torch.equal(p, a) for p, a in zip(plain, a1111))
    assert plain[0].shape[1] == 77


def test_emphasis_weights_hidden_states_with_the_mean_restored_and_leaves_pooled(pipe):
    context, pooled = _encode(pipe, ["a (red:1.5) fox"], [""], "a1111")
    plain_context, plain_pooled = _encode(pipe, ["a red fox"], [""], "a1111")
    assert torch.equal(pooled, plain_pooled)  # the pooled state is unweighted, as A1111 / ComfyUI
    widths = [encoder.config.hidden_size for _, encoder in pipe.conditioner.encoders]
    start = 0
    for width in widths:  # each encoder's half on its own: weighted, then its mean restored
        ours, unweighted = context[1, :, start : start + width], plain_context[1, :, start : start + width]
        assert not torch.allclose(ours, unweighted)
        assert torch.allclose(ours.mean(), unweighted.mean(), atol=1e-6)
        start += width
    red = 2  # BOS, "a", "red"
    ratio = context[1, red, : widths[0]] / plain_context[1, red, : widths[0]]
    other = context[1, 1, : widths[0]] / plain_context[1, 1, : widths[0]]
    assert torch.allclose(ratio / other, torch.full_like(ratio, 1.5), rtol=1e-4)


def test_break_and_long_prompts_concatenate_chunks_and_pool_the_first(pipe):
    context, pooled = _encode(pipe, ["a fox BREAK a dog in the snow"], ["blurry"], "a1111")
    assert context.shape[1] == 2 * 77  # the negative is padded to the prompt's two chunks
    (first_1, _), (first_2, pooled_2) = _chunk_states(pipe, "a fox BREAK a dog in the snow", 0)
    (second_1, _), (second_2, _) = _chunk_states(pipe, "a fox BREAK a dog in the snow", 1)
    assert torch.allclose(context[1, :77], torch.cat([first_1, first_2], -1)[0], atol=1e-6)
    assert torch.allclose(context[1, 77:], torch.cat([second_1, second_2], -1)[0], atol=1e-6)
    assert torch.allclose(pooled[1], pooled_2[0], atol=1e-6)
    long_prompt = ", ".join(f"word{i}" for i in range(60))  # well past 75 tokens
    context, _ = _encode(pipe, [long_prompt], [""], "a1111", zero_negatives=True)
    assert context.shape[1] > 77 and not context[0].any()  # force_zeros: the negative half is zeros
    images = pipe.generate(long_prompt, steps=2, width=64, height=64, seed=1, progress=False)
    assert images[0].size == (64, 64)
