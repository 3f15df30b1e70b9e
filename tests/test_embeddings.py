"""Textual-inversion embeddings (runtime/embeddings.py, runtime/prompt_syntax.py): A1111's file layouts,
names found by their tokens (bare or `<name>`), n slots per n vectors, and only those slots' inputs changed."""

import pytest
import torch
from safetensors.torch import save_file

from runtime.embeddings import EmbeddingError, EmbeddingLibrary, input_embeddings, read_embedding
from runtime.models.clip import CLIPTextConfig, CLIPTextModel
from runtime.prompt_syntax import embedding_chunks, encode_prompts, prompt_chunks
from runtime.tokenizer import CLIPTokenizer
from tests.tokenizer_fixtures import write_clip_vocab_files

WIDTH = 16
PLACEHOLDER = 0


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CLIPTokenizer.from_vocab_files(*write_clip_vocab_files(tmp_path_factory.mktemp("vocab")))


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)
    model = CLIPTextModel(config).eval()
    with torch.no_grad():  # off zero mean, so A1111's mean restore divides by something
        model.final_layer_norm.bias.fill_(0.5)
    return model


def vectors(count, seed, width=WIDTH):
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    save_file({"emb_params": vectors(3, 1)}, str(folder / "inkstyle.safetensors"))  # A1111's own layout
    save_file({"string_to_param.*": vectors(1, 2)}, str(folder / "mood.safetensors"))  # its .pt layout, flat
    save_file({"<cat-toy>": vectors(1, 3)[0]}, str(folder / "cattoy.safetensors"))  # diffusers learned_embeds
    return folder


def test_file_layouts(folder, tmp_path):
    assert read_embedding(folder / "inkstyle.safetensors").count == 3
    assert torch.equal(read_embedding(folder / "mood.safetensors").for_encoder(WIDTH), vectors(1, 2))
    assert read_embedding(folder / "cattoy.safetensors").for_encoder(WIDTH).shape == (1, WIDTH)
    save_file({"clip_l": vectors(2, 4, 768), "clip_g": vectors(2, 5, 1280)}, str(tmp_path / "xl.safetensors"))
    xl = read_embedding(tmp_path / "xl.safetensors")
    assert xl.count == 2 and xl.for_encoder(1280, "clip_g").shape == (2, 1280)
    with pytest.raises(EmbeddingError, match="an SDXL embedding .* used with a single-encoder model"):
        xl.for_encoder(768)
    with pytest.raises(EmbeddingError, match="vectors are 16 wide, the text encoder is 768 wide"):
        read_embedding(folder / "mood.safetensors").for_encoder(768)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)}, "not a textual-inversion embedding: expected emb_params"),
        ({"emb_params": torch.zeros(1, 2, 3)}, r"must be a float \[count, width\] tensor"),
        ({"emb_params": torch.zeros(2, 3, dtype=torch.int32)}, r"must be a float \[count, width\] tensor"),
        ({"emb_params": torch.tensor([[float("nan")]])}, "NaN or infinite"),
        ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(2, 1280)}, "different numbers of vectors"),
    ],
)
def test_bad_files_are_named(tmp_path, tensors, message):
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(EmbeddingError, match=f"bad.safetensors: .*{message}"):
        read_embedding(tmp_path / "bad.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "bad.safetensors").read_bytes()[:20])
    with pytest.raises(EmbeddingError, match="cut.safetensors: not a readable .safetensors"):
        read_embedding(tmp_path / "cut.safetensors")


def test_names_take_one_slot_per_vector_with_their_weight(tokenizer, folder):
    matcher = EmbeddingLibrary(folder).matcher(tokenizer)
    plain_ids, _ = prompt_chunks(tokenizer, "a photo of")
    ids, weights, fixes = embedding_chunks(tokenizer, "a photo of (inkstyle:1.2), mood", matcher)
    assert ids[0][:4] == plain_ids[0][:4]  # BOS a photo of
    assert ids[0][4:7] == [PLACEHOLDER] * 3 and weights[0][4:7] == [1.2] * 3
    assert ids[0][8] == PLACEHOLDER and weights[0][8] == 1.0  # after the comma
    assert [(start, e.name) for start, e in fixes[0]] == [(4, "inkstyle"), (8, "mood")]
    # `<name>` is the bare name; `<other>` text and names inside longer words are left alone.
    assert embedding_chunks(tokenizer, "a photo of <inkstyle>, <mood>", matcher)[0] == ids
    assert embedding_chunks(tokenizer, "a <nope> moody", matcher)[2] == [[]]


def test_an_embedding_never_straddles_two_chunks(tokenizer, folder):
    matcher = EmbeddingLibrary(folder).matcher(tokenizer)
    ids, _, fixes = embedding_chunks(tokenizer, "cat " * 74 + "inkstyle", matcher)
    assert len(ids) == 2 and fixes[0] == [] and [(s, e.name) for s, e in fixes[1]] == [(1, "inkstyle")]
    assert ids[1][1:4] == [PLACEHOLDER] * 3
    # A comma backtrack carries the embedding's slots (and its fix) into the next chunk.
    ids, _, fixes = embedding_chunks(tokenizer, "cat " * 70 + ", dog mood " + "cat " * 5, matcher)
    assert fixes[0] == [] and [(s, e.name) for s, e in fixes[1]] == [(2, "mood")]
    assert ids[1][1:3] == [tokenizer.token_ids(["dog"])[0][0], PLACEHOLDER]


def test_only_the_named_slots_change_their_inputs(tokenizer, folder, encoder):
    library = EmbeddingLibrary(folder)
    ids, _, fixes = embedding_chunks(tokenizer, "a photo of inkstyle", library.matcher(tokenizer))
    ids = torch.tensor(ids)
    fixes = [(0, start, e) for start, e in fixes[0]]
    with torch.no_grad():
        fixed = input_embeddings(encoder, ids, fixes)
        plain = encoder.embeddings(ids)
        changed = (fixed != plain).any(dim=-1)[0]
        assert changed.nonzero().flatten().tolist() == [4, 5, 6]
        positions = encoder.embeddings.position_embedding.weight[4:7]
        torch.testing.assert_close(fixed[0, 4:7], vectors(3, 1) + positions, rtol=0, atol=1e-6)
        context = encode_prompts(tokenizer, encoder, ["a photo of inkstyle"], embeddings=library)
        without = encode_prompts(tokenizer, encoder, ["a photo of inkstyle"])
        # Causal attention: the positions before the embedding are untouched, bit for bit.
        assert torch.equal(context[0, :4], encoder(ids)[0, :4])
        assert not torch.allclose(context[0, 4:], without[0, 4:])
        # Emphasis on the embedding scales its slots and restores the mean (the weights path runs).
        weighted = encode_prompts(tokenizer, encoder, ["a photo of (inkstyle:1.3)"], embeddings=library)
        assert torch.equal(weighted[0, :4] != 0, context[0, :4] != 0) and not torch.equal(weighted, context)


def test_a_prompt_without_names_encodes_as_before(tokenizer, folder, encoder):
    library = EmbeddingLibrary(folder)
    texts = ["a (red:1.2) fox", "cat " * 80]
    with torch.no_grad():
        assert torch.equal(
            encode_prompts(tokenizer, encoder, texts, embeddings=library), encode_prompts(tokenizer, encoder, texts)
        )


def test_an_exported_text_encoder_is_named(tokenizer, folder):
    class Exported:
        def parameters(self):
            return iter([torch.zeros(1)])

        def __call__(self, ids):
            return torch.zeros(ids.shape[0], ids.shape[1], WIDTH)

    with pytest.raises(EmbeddingError, match="need the torch text encoder's token embeddings; .*Exported"):
        encode_prompts(tokenizer, Exported(), ["inkstyle"], embeddings=EmbeddingLibrary(folder))
    with pytest.raises(NotADirectoryError, match="embeddings folder .* is not a folder"):
        EmbeddingLibrary(folder / "missing")
