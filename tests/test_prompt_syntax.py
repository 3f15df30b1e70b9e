"""runtime/prompt_syntax.py: A1111's emphasis parser, chunking and weighting, on the real CLIP vocabulary."""

import warnings

import pytest
import torch

from runtime.models.clip import CLIPTextConfig, CLIPTextModel
from runtime.prompt_syntax import encode_prompts, hidden_states, parse_prompt_attention, prompt_chunks
from runtime.tokenizer import SD1_PAD_TOKEN, SD2_PAD_TOKEN, CLIPTokenizer
from tests.tokenizer_fixtures import write_clip_vocab_files

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory):
    return write_clip_vocab_files(tmp_path_factory.mktemp("clip_vocab"))


@pytest.fixture(scope="module")
def tokenizer(vocab_files):
    return CLIPTokenizer.from_vocab_files(*vocab_files)


@pytest.fixture(scope="module")
def sd2_tokenizer(vocab_files):
    return CLIPTokenizer.from_vocab_files(*vocab_files, pad_token=SD2_PAD_TOKEN)


# A1111's parse_prompt_attention docstring examples, verbatim (modules/prompt_parser.py).
@pytest.mark.parametrize(
    "text, expected",
    [
        ("normal text", [["normal text", 1.0]]),
        ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
        ("(unbalanced", [["unbalanced", 1.1]]),
        ("\\(literal\\]", [["(literal]", 1.0]]),
        ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ["a ", 1.0],
                ["house", 1.5730000000000004],
                [" ", 1.1],
                ["on", 1.0],
                [" a ", 1.1],
                ["hill", 0.55],
                [", sun, ", 1.1],
                ["sky", 1.4641000000000006],
                [".", 1.1],
            ],
        ),
    ],
)
def test_parse_matches_a1111_documented_examples(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[word]", [["word", 1 / 1.1]]),
        ("((word))", [["word", 1.1 * 1.1]]),
        ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
        ("a break b", [["a break b", 1.0]]),  # only the upper-case word splits
        ("BREAKFAST", [["BREAKFAST", 1.0]]),  # and only as a word of its own
        ("", [["", 1.0]]),
        ("(a:-0.5)", [["a", -0.5]]),
        ("ratio 3:2", [["ratio 3:2", 1.0]]),  # a colon outside (word:w) is text
    ],
)
def test_parse_rules(text, expected):
    assert parse_prompt_attention(text) == expected


def _words(tokenizer, text):
    return tokenizer.token_ids([text])[0]


@pytest.mark.parametrize("pad", [SD1_PAD_TOKEN, SD2_PAD_TOKEN])
@pytest.mark.parametrize(
    "prompt",
    [
        "a photograph of an astronaut riding a horse",
        "",
        "   spaced   out  ",
        "A Photo Of A CAT, it's 42 years old!!!",
        "cat " * 75,
    ],
)
def test_plain_prompt_gives_todays_ids(vocab_files, pad, prompt):
    tokenizer = CLIPTokenizer.from_vocab_files(*vocab_files, pad_token=pad)
    ids, weights = prompt_chunks(tokenizer, prompt)
    assert ids == tokenizer([prompt]).tolist()
    assert weights == [[1.0] * 77]


def test_long_prompt_splits_into_75_token_chunks(tokenizer, sd2_tokenizer):
    cat = _words(tokenizer, "cat")[0]
    ids, weights = prompt_chunks(tokenizer, "cat " * 80)
    assert ids == [[BOS] + [cat] * 75 + [EOS], [BOS] + [cat] * 5 + [EOS] * 71]
    assert weights == [[1.0] * 77] * 2
    ids, _ = prompt_chunks(sd2_tokenizer, "cat " * 80)  # SD 2.x: pad ids after the first EOS
    assert ids[1] == [BOS] + [cat] * 5 + [EOS] + [sd2_tokenizer.pad_token_id] * 70
    assert ids[0] == [BOS] + [cat] * 75 + [EOS]


def test_break_starts_a_new_chunk(tokenizer):
    a, dog = _words(tokenizer, "a")[0], _words(tokenizer, "dog")[0]
    ids, _ = prompt_chunks(tokenizer, "a BREAK dog")
    assert ids == [[BOS, a] + [EOS] * 75, [BOS, dog] + [EOS] * 75]


def test_text_after_a_near_comma_moves_to_the_next_chunk(tokenizer):
    cat, comma, dog = _words(tokenizer, "cat , dog")
    assert comma == tokenizer.comma_token_id
    ids, _ = prompt_chunks(tokenizer, "cat " * 70 + ", " + "dog " * 10)
    # 70 cats, the comma, then 4 dogs fill 75; the comma is 5 tokens back (<= 20): the dogs move.
    assert ids[0] == [BOS] + [cat] * 70 + [comma] + [EOS] * 5
    assert ids[1] == [BOS] + [dog] * 10 + [EOS] * 66
    far, _ = prompt_chunks(tokenizer, "cat " * 40 + ", " + "dog " * 40)  # comma 35 back: a plain cut
    assert far[0] == [BOS] + [cat] * 40 + [comma] + [dog] * 34 + [EOS]


def test_weights_follow_the_tokens(tokenizer):
    ids, weights = prompt_chunks(tokenizer, "a (red:1.5) ((fox)) [sky]")
    a, red, fox, sky = (_words(tokenizer, w)[0] for w in ("a", "red", "fox", "sky"))
    assert ids[0][:6] == [BOS, a, red, fox, sky, EOS]
    assert weights[0][:6] == pytest.approx([1.0, 1.0, 1.5, 1.21, 1 / 1.1, 1.0])
    assert weights[0][6:] == [1.0] * 71


class _LookupEncoder(torch.nn.Module):
    """A text encoder whose hidden state of each token depends on the token and its position."""

    def __init__(self, channels=8):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(49408, channels, generator=generator) + 0.5)
        self.position = torch.nn.Parameter(torch.randn(77, channels, generator=generator))

    def forward(self, ids):
        return self.table[ids] + self.position[: ids.shape[1]]


def test_plain_text_context_is_the_unweighted_encoding(tokenizer):
    encoder = _LookupEncoder()
    texts = ["a red fox", "", "cat " * 75]
    expected = encoder(tokenizer(texts))
    assert torch.equal(encode_prompts(tokenizer, encoder, texts), expected)


def test_weighting_scales_tokens_then_restores_the_mean(tokenizer):
    """A1111's rule written out: z * w per token, then z * (mean(z) / mean(z * w)), per chunk."""
    encoder = _LookupEncoder()
    context = encode_prompts(tokenizer, encoder, ["a (red:1.5) [fox]"])
    z = encoder(tokenizer(["a red fox"]))
    w = torch.ones(1, 77)
    w[0, 2], w[0, 3] = 1.5, 1 / 1.1
    weighted = z * w[..., None]
    expected = weighted * (z.mean() / weighted.mean())
    torch.testing.assert_close(context, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(context, z)


def test_long_prompt_and_shorter_negative_share_the_chunk_count(tokenizer):
    encoder = _LookupEncoder()
    long = "cat " * 80 + "(zebra:1.2)"
    context = encode_prompts(tokenizer, encoder, ["blurry", long])
    assert context.shape == (2, 154, 8)
    chunks, _ = prompt_chunks(tokenizer, long)
    # The negative: its own chunk, then the empty prompt's chunk.
    assert torch.equal(context[0, :77], encoder(tokenizer(["blurry"]))[0])
    assert torch.equal(context[0, 77:], encoder(tokenizer([""]))[0])
    # The prompt: each chunk encoded on its own (the first chunk is all weight 1, so unchanged).
    assert torch.equal(context[1, :77], encoder(torch.tensor(chunks[:1]))[0])
    assert not torch.equal(context[1, 77:], encoder(torch.tensor(chunks[1:]))[0])  # zebra weighted


def test_plain_syntax_truncates_with_a_warning(tokenizer):
    encoder = _LookupEncoder()
    with pytest.warns(UserWarning, match="negative prompt 0 is longer than the text encoder's 77 tokens.*zebra'"):
        context = encode_prompts(
            tokenizer, encoder, ["cat " * 80 + "zebra", "(a)"], syntax="plain", labels=["negative prompt 0", "prompt 0"]
        )
    assert torch.equal(context, encoder(tokenizer(["cat " * 80, "(a)"])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_prompts(tokenizer, encoder, ["cat " * 80 + "zebra"])  # a1111: chunks, nothing dropped


def test_unknown_syntax_is_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown prompt syntax 'comfy'; choose one of a1111, plain"):
        encode_prompts(tokenizer, _LookupEncoder(), ["x"], syntax="comfy")


def test_clip_skip_matches_transformers_hidden_states():
    import transformers

    from tests.model_factory import build_reference_models

    reference = build_reference_models("sd1", seed=0)["text_encoder"]
    ours = CLIPTextModel(CLIPTextConfig.from_dict(reference.config.to_dict()))
    ours.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = reference(ids, output_hidden_states=True)
        for clip_skip in (0, 1):
            # diffusers' clip_skip: hidden_states[-(clip_skip + 1)] through the final LayerNorm.
            expected = reference.final_layer_norm(outputs.hidden_states[-(clip_skip + 1)])
            torch.testing.assert_close(hidden_states(ours, ids, clip_skip), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(reference, transformers.CLIPTextModel)


@pytest.mark.parametrize(
    "clip_skip, message",
    [
        (2, r"clip_skip must be an integer in \[0, 2\) \(the text encoder has 2 layers\), got 2"),
        (-1, "clip_skip must be an integer >= 0"),
        (True, "clip_skip must be an integer >= 0"),
    ],
)
def test_bad_clip_skip(clip_skip, message):
    encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=1)
    )
    with pytest.raises(ValueError, match=message):
        hidden_states(encoder, torch.zeros(1, 77, dtype=torch.long), clip_skip)


def test_clip_skip_needs_the_torch_text_encoder():
    with pytest.raises(ValueError, match="clip_skip=1 needs the torch text encoder's layers"):
        hidden_states(_LookupEncoder(), torch.zeros(1, 77, dtype=torch.long), 1)


@pytest.mark.parametrize("shape", [(1, 8, 64, 154, 40), (2, 5, 40, 231, 64)])  # 2 and 3 chunks of 77 keys
def test_triton_attention_takes_multi_chunk_contexts(shape):
    """Cross-attention over a long prompt's 154 / 231 keys (TRITON_INTERPRET=1 without CUDA)."""
    from kernels.attention import attention, attention_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    b, h, nq, nk, d = shape
    generator = torch.Generator().manual_seed(nk)
    q, k, v = (
        torch.randn(size, generator=generator).to(device, torch.float16)
        for size in ((b, h, nq, d), (b, h, nk, d), (b, h, nk, d))
    )
    torch.testing.assert_close(attention(q, k, v), attention_reference(q, k, v), rtol=2e-3, atol=2e-3)


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    import runtime
    from tests.model_factory import save_diffusers_folder

    folder = save_diffusers_folder(tmp_path_factory.mktemp("prompt_syntax") / "tiny", kind="sd1", seed=0)
    return runtime.load(folder)


def _image(pipe, prompt, syntax, **options):
    import numpy as np

    pipe.prompt_syntax = syntax
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = pipe.generate(prompt, steps=2, seed=0, scheduler="ddim", progress=False, **options)[0]
    finally:
        pipe.prompt_syntax = "a1111"
    return np.asarray(image)


def test_pipeline_reads_the_second_chunk(tiny_pipe):
    import numpy as np

    plain_prompt = "a red fox in the snow"
    assert np.array_equal(_image(tiny_pipe, plain_prompt, "a1111"), _image(tiny_pipe, plain_prompt, "plain"))
    long_prompt = "cat " * 80 + "zebra"
    context = tiny_pipe.encode_prompt([long_prompt], ["blurry"], guidance=7.5)
    assert context.shape[:2] == (2, 154)
    assert not np.array_equal(_image(tiny_pipe, long_prompt, "a1111"), _image(tiny_pipe, long_prompt, "plain"))
    assert not np.array_equal(_image(tiny_pipe, "a (red:1.6) fox", "a1111"), _image(tiny_pipe, "a red fox", "a1111"))
