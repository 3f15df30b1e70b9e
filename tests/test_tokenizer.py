"""Our CLIP tokenizer against transformers' CLIPTokenizer (what diffusers calls) and open_clip."""

import json
import warnings

import pytest
import torch
import transformers

from runtime.tokenizer import (
    SD1_PAD_TOKEN,
    SD2_PAD_TOKEN,
    CLIPTokenizer,
    PromptTruncatedWarning,
    open_clip_vocab_and_merges,
)
from tests.tokenizer_fixtures import open_clip_reference_vocab, write_clip_vocab_files, write_sd_tokenizer_folder

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Photo Of A CAT, it's 42 years old!!! (masterpiece:1.2), [best quality]",
    "   leading and trailing   spaces   ",
    "tabs\tand\nnewlines\r\nmixed \t\n whitespace\u00a0nbsp\u3000ideographic",
    "",
    "Café crème brûlée, naïve façade, Ångström, cafe\u0301 (decomposed accent)",
    "emoji 🙂🚀🐱‍👤 and a flag 🇯🇵",
    "CJK 猫が好きです 中文 한국어",
    "numbers 3.14159 1,000,000 2024-01-01 0x1F 007",
    "punctuation ... --- !!! ??? ;;; ''' \"quoted\" <tag> {braces} @#$%^&* \\back/slash",
    "contractions: I'm you're we've they'll he'd can't it's IT'S",
    "literal <|endoftext|> and <|startoftext|> and <|ENDOFTEXT|>",
    "cat " * 75,  # exactly fills 77 with BOS and EOS
    "cat " * 76,  # one token too many
    "a very long prompt, with many words and commas, " * 12,
    "ÉMOJI 🙂 über 猫 " * 40,
]
SIMPLE_PROMPTS = PROMPTS[:3] + [PROMPTS[8]]  # no ftfy/html clean-up differences with open_clip


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory):
    return write_clip_vocab_files(tmp_path_factory.mktemp("clip_vocab"))


@pytest.fixture(scope="module", params=[SD1_PAD_TOKEN, SD2_PAD_TOKEN], ids=["sd1_pad", "sd2_pad"])
def pad_token(request):
    return request.param


def _reference(vocab_files):
    vocab_json, merges_txt = vocab_files
    vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in merges_txt.read_text(encoding="utf-8").splitlines()[1:]]
    # transformers 5 takes vocab= / merges=; vocab_file= / merges_file= would be silently ignored.
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def _reference_ids(reference, prompts, pad_token=SD1_PAD_TOKEN):
    """transformers' ids, padded with `pad_token`. transformers itself is given the SD 1.x pad so that
    it does not split "!" out of prompts (see runtime/tokenizer.py); the pad is applied afterwards."""
    encoded = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids = encoded.input_ids.clone()
    ids[encoded.attention_mask == 0] = reference.convert_tokens_to_ids(pad_token)
    return ids


def test_vocab_files_match_transformers(vocab_files, pad_token):
    ours = CLIPTokenizer.from_vocab_files(*vocab_files, pad_token=pad_token)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        ids = ours(PROMPTS)
    expected = _reference_ids(_reference(vocab_files), PROMPTS, pad_token)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), 77)
    torch.testing.assert_close(ids, expected, rtol=0, atol=0)
    assert ours.pad_token_id == (49407 if pad_token == SD1_PAD_TOKEN else 0)
    assert (ids[:, 0] == 49406).all()
    empty = ids[PROMPTS.index("")]
    assert empty[1] == 49407 and (empty[2:] == ours.pad_token_id).all()
    assert (ids[PROMPTS.index("cat " * 76)][-1] == 49407).all()


def test_sd_folders_match_transformers_from_pretrained(tmp_path, vocab_files, pad_token):
    folder = write_sd_tokenizer_folder(tmp_path / "tokenizer", pad_token)
    ours = CLIPTokenizer.from_folder(folder)
    # The folder's pad token is resolved as transformers resolves it (special_tokens_map.json wins).
    reference = transformers.CLIPTokenizer.from_pretrained(folder)
    assert ours.pad_token_id == reference.pad_token_id == (49407 if pad_token == SD1_PAD_TOKEN else 0)
    assert ours.max_length == reference.model_max_length == 77
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        expected = _reference_ids(_reference(vocab_files), PROMPTS, pad_token)
        torch.testing.assert_close(ours(PROMPTS), expected, rtol=0, atol=0)


def test_sd2_pad_token_does_not_split_prompts_unlike_transformers(tmp_path):
    """OpenCLIP, which SD 2.x was trained with, reads "! !! !!!" as three BPE tokens; transformers
    (so diffusers) turns every "!" into a pad id when "!" is the pad token (diffusers #4153)."""
    from open_clip.tokenizer import SimpleTokenizer

    folder = write_sd_tokenizer_folder(tmp_path / "tokenizer", SD2_PAD_TOKEN)
    prompt = "wow! !! !!!"
    ours = CLIPTokenizer.from_folder(folder)([prompt])[0]
    tokens = SimpleTokenizer().encode(prompt)
    assert ours[1 : 1 + len(tokens)].tolist() == tokens
    assert ours[1 + len(tokens)] == 49407 and (ours[2 + len(tokens) :] == 0).all()
    diffusers_ids = transformers.CLIPTokenizer.from_pretrained(folder)(prompt).input_ids
    assert diffusers_ids[2:8] == [0] * 6


@pytest.mark.parametrize("merge_format", ["pairs", "strings"])
def test_tokenizer_json_folder_matches_transformers(tmp_path, vocab_files, merge_format):
    reference = _reference(vocab_files)
    reference.pad_token = SD2_PAD_TOKEN  # only recorded in tokenizer_config.json: the case to read
    reference.save_pretrained(tmp_path)
    # Hub files written by tokenizers < 0.20 hold merges as "a b" strings, newer ones as [a, b].
    path = tmp_path / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert all(isinstance(m, list) for m in data["model"]["merges"])  # what tokenizers 0.23 writes
    if merge_format == "strings":
        data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    assert not (tmp_path / "vocab.json").exists()
    ours = CLIPTokenizer.from_folder(tmp_path)
    assert ours.pad_token_id == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        expected = _reference_ids(_reference(vocab_files), PROMPTS, SD2_PAD_TOKEN)
        torch.testing.assert_close(ours(PROMPTS), expected, rtol=0, atol=0)


def test_open_clip_bpe_builds_the_reference_vocabulary(vocab_files):
    vocab, merges = open_clip_vocab_and_merges()
    reference_vocab, reference_merges = open_clip_reference_vocab()
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab == reference_vocab
    assert merges == reference_merges
    ours = CLIPTokenizer.from_open_clip_bpe(pad_token=SD2_PAD_TOKEN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        expected = _reference_ids(_reference(vocab_files), PROMPTS, SD2_PAD_TOKEN)
        torch.testing.assert_close(ours(PROMPTS), expected, rtol=0, atol=0)


def test_simple_prompts_match_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    ids = CLIPTokenizer.from_open_clip_bpe()(SIMPLE_PROMPTS)
    for row, prompt in zip(ids, SIMPLE_PROMPTS):
        tokens = reference.encode(prompt)
        assert row[1 : 1 + len(tokens)].tolist() == tokens
        assert row[1 + len(tokens)] == 49407


def test_truncation_is_reported_with_the_dropped_text(vocab_files):
    tokenizer = CLIPTokenizer.from_vocab_files(*vocab_files)
    prompts = ["a short prompt", "cat " * 75 + "dog  bird\tfish ", "cat " * 75]
    info = tokenizer.tokenize_with_info(prompts)
    assert [(t.index, t.dropped_text) for t in info.truncated] == [(1, "dog  bird\tfish")]
    with pytest.warns(PromptTruncatedWarning, match=r"prompt 1 .*'dog  bird\\tfish'"):
        ids = tokenizer(prompts)
    torch.testing.assert_close(ids, info.input_ids, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer([prompts[0], prompts[2]])


def test_single_string_gives_a_batch_of_one(vocab_files):
    tokenizer = CLIPTokenizer.from_vocab_files(*vocab_files)
    ids = tokenizer("a red cube")
    assert ids.shape == (1, 77)
    torch.testing.assert_close(ids, tokenizer(["a red cube"]), rtol=0, atol=0)


def test_missing_folder_names_path_and_expected_files(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match=r"no_such_tokenizer.*tokenizer\.json.*vocab\.json"):
        CLIPTokenizer.from_folder(missing)


def test_folder_without_vocabulary_lists_what_it_found(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"merges\.txt.*found \['tokenizer_config\.json', 'vocab\.json'\]"):
        CLIPTokenizer.from_folder(tmp_path)


def test_missing_vocab_file_is_named(tmp_path, vocab_files):
    with pytest.raises(FileNotFoundError, match="absent.json"):
        CLIPTokenizer.from_vocab_files(tmp_path / "absent.json", vocab_files[1])


def test_bad_files_give_clear_errors(tmp_path, vocab_files):
    vocab_json, merges_txt = vocab_files
    vocab = json.loads(vocab_json.read_text(encoding="utf-8"))

    no_bos = tmp_path / "no_bos.json"
    no_bos.write_text(json.dumps({k: v for k, v in vocab.items() if k != "<|startoftext|>"}))
    with pytest.raises(ValueError, match=r"no_bos\.json.*BOS token '<\|startoftext\|>'"):
        CLIPTokenizer.from_vocab_files(no_bos, merges_txt)

    with pytest.raises(ValueError, match=r"pad token '<pad>'"):
        CLIPTokenizer.from_vocab_files(vocab_json, merges_txt, pad_token="<pad>")

    broken_json = tmp_path / "broken.json"
    broken_json.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        CLIPTokenizer.from_vocab_files(broken_json, merges_txt)

    bad_merges = tmp_path / "bad_merges.txt"
    bad_merges.write_text("#version: 0.2\ni n\nthree symbols here\n")
    with pytest.raises(ValueError, match=r"bad_merges\.txt line 3"):
        CLIPTokenizer.from_vocab_files(vocab_json, bad_merges)

    bad_config = tmp_path / "bad_config"
    write_clip_vocab_files(bad_config)
    (bad_config / "tokenizer_config.json").write_text(json.dumps({"model_max_length": "77"}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json.*model_max_length"):
        CLIPTokenizer.from_folder(bad_config)


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([], "non-empty list"),
        (["ok", 3], "prompt 1 must be a string"),
        (None, "non-empty list"),
    ],
)
def test_bad_prompts_give_clear_errors(vocab_files, prompts, message):
    with pytest.raises(ValueError, match=message):
        CLIPTokenizer.from_vocab_files(*vocab_files)(prompts)
