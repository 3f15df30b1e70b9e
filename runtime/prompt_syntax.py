"""Prompts as A1111 (stable-diffusion-webui) writes them: emphasis weights, BREAK, prompts of any length.

    context = encode_prompts(tokenizer, text_encoder, ["a (red:1.3) fox", ""])   # [2, K * 77, C]

Syntax (`parse_prompt_attention`, a port of A1111's modules/prompt_parser.py):
  (word)  x1.1 per pair of parentheses, nested ones multiply: ((word)) = 1.21
  [word]  /1.1 per pair of brackets
  (word:1.3)  that weight; \\( \\) \\[ \\] are literal brackets; unbalanced brackets close at the end
  BREAK   (upper case, a word of its own) ends the current chunk: the rest starts a fresh one

Encoding (A1111's FrozenCLIPEmbedderWithCustomWords): the prompt's tokens are cut into chunks of 75 (the
window minus BOS and EOS); when a chunk fills and a comma lies within its last 20 tokens, the text after
the comma moves to the next chunk (A1111's comma_padding_backtrack default). Each chunk is padded with EOS
to 75, wrapped in BOS ... EOS, its ids after the first EOS set to the tokenizer's pad id (SD 2.x pads with
`!`), and encoded on its own; the chunks' hidden states are concatenated on the sequence axis, so a long
prompt gives a context of K x 77 tokens and nothing is dropped. Every text of one call is padded with
empty-prompt chunks to the same K (A1111's pad_cond_uncond), so prompt and negative stack into one batch.
Weights scale each token's hidden state, then the chunk is rescaled so its mean is the unweighted mean
(A1111's "Original" emphasis). A1111 takes that mean over the whole batch of a chunk; here it is taken per
text, which is the same for one prompt and keeps an image independent of its batch-mates.

A prompt without brackets or BREAK and with at most 75 tokens gives exactly the ids of the plain
tokenizer (one chunk) and weights of 1, so its context is bit-identical to plain encoding.

SDXL (runtime/conditioning.py) chunks the prompt for each of its two encoders with `chunk_rows`, weights
each encoder's penultimate hidden states per token with the mean restored (`apply_weights`), concatenates
the chunks, and takes the pooled embedding of the first chunk, unweighted: what A1111 (`zs[0].pooled`
in sd_hijack_clip.py) and ComfyUI (`first_pooled` in sd1_clip.py) do.
syntax="plain" turns all this off: one 77-token window, the text past it cut off with a warning.
"""

from __future__ import annotations

import re
import warnings

import torch

PROMPT_SYNTAXES = ("a1111", "plain")

# A1111's comma_padding_backtrack default: how far back (in tokens) a comma may be to move the text
# after it into the next chunk instead of splitting mid-phrase.
COMMA_BACKTRACK = 20

_ROUND_MULTIPLIER = 1.1
_SQUARE_MULTIPLIER = 1 / 1.1
_BREAK_WEIGHT = -1  # marks a BREAK entry in parse_prompt_attention's output, as in A1111
_EMBEDDING_PLACEHOLDER = 0  # the id A1111 puts in an embedding's slots (its vectors replace the token's)

_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list]:
    """[[text, weight], ...] with runs of equal weight merged; BREAK appears as ["BREAK", -1].

    >>> parse_prompt_attention('an (important) word')
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    """
    result: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for position in range(start, len(result)):
            result[position][1] *= multiplier

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            result.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(result))
        elif piece == "[":
            square_brackets.append(len(result))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), _ROUND_MULTIPLIER)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), _SQUARE_MULTIPLIER)
        else:
            for index, part in enumerate(_BREAK.split(piece)):
                if index > 0:
                    result.append(["BREAK", _BREAK_WEIGHT])
                result.append([part, 1.0])
    for start in round_brackets:
        multiply_range(start, _ROUND_MULTIPLIER)
    for start in square_brackets:
        multiply_range(start, _SQUARE_MULTIPLIER)
    if not result:
        result = [["", 1.0]]
    index = 0
    while index + 1 < len(result):
        if result[index][1] == result[index + 1][1]:
            result[index][0] += result[index + 1][0]
            result.pop(index + 1)
        else:
            index += 1
    return result


def prompt_chunks(tokenizer, text: str) -> tuple[list[list[int]], list[list[float]]]:
    """A1111's chunks of one prompt: (ids, weights), one row of `tokenizer.max_length` per chunk.

    tokenizer: runtime.tokenizer.CLIPTokenizer (token_ids, bos/eos/pad ids, comma_token_id, max_length).
    """
    ids, weights, _ = embedding_chunks(tokenizer, text, None)
    return ids, weights


def embedding_chunks(tokenizer, text: str, matcher):
    """prompt_chunks with textual-inversion embeddings (runtime/embeddings.py's EmbeddingMatcher, or None):
    (ids, weights, fixes), fixes[k] = [(first slot in chunk k's ids, Embedding), ...]. An embedding's
    slots hold a placeholder id (0, as A1111) and never straddle two chunks."""
    chunk_length = tokenizer.max_length - 2
    if matcher:
        text = matcher.unbracket(text)
    parsed = parse_prompt_attention(text)
    tokenized = tokenizer.token_ids([piece for piece, _ in parsed])
    chunks_ids: list[list[int]] = []
    chunks_weights: list[list[float]] = []
    chunks_fixes: list[list] = []
    tokens: list[int] = []
    weights: list[float] = []
    fixes: list = []  # (offset in tokens, Embedding)
    last_comma = -1

    def next_chunk() -> None:
        nonlocal tokens, weights, fixes, last_comma
        padding = chunk_length - len(tokens)
        ids = [tokenizer.bos_token_id] + tokens + [tokenizer.eos_token_id] * (padding + 1)
        first_eos = len(tokens) + 1
        ids[first_eos + 1 :] = [tokenizer.pad_token_id] * (len(ids) - first_eos - 1)
        chunks_ids.append(ids)
        chunks_weights.append([1.0] + weights + [1.0] * (padding + 1))
        chunks_fixes.append([(offset + 1, embedding) for offset, embedding in fixes])  # + 1: BOS
        tokens, weights, fixes, last_comma = [], [], [], -1

    for ids, (piece, weight) in zip(tokenized, parsed):
        if piece == "BREAK" and weight == _BREAK_WEIGHT:
            next_chunk()
            continue
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == tokenizer.comma_token_id:
                last_comma = len(tokens)
            elif len(tokens) == chunk_length and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                # Embeddings after the comma move with their slots (A1111 leaves them behind).
                moved_fixes = [(offset - cut, e) for offset, e in fixes if offset >= cut]
                tokens, weights = tokens[:cut], weights[:cut]
                fixes = [(offset, e) for offset, e in fixes if offset < cut]
                next_chunk()
                tokens, weights, fixes = moved_tokens, moved_weights, moved_fixes
            if len(tokens) == chunk_length:
                next_chunk()
            found = matcher.at(ids, position) if matcher else None
            if found is None:
                tokens.append(token)
                weights.append(weight)
                position += 1
                continue
            embedding, name_length = found
            if embedding.count > chunk_length:
                raise ValueError(
                    f"embedding {embedding.name} has {embedding.count} vectors; one chunk holds {chunk_length}"
                )
            if len(tokens) + embedding.count > chunk_length:
                next_chunk()
            fixes.append((len(tokens), embedding))
            tokens += [_EMBEDDING_PLACEHOLDER] * embedding.count
            weights += [weight] * embedding.count
            position += name_length
    if tokens or not chunks_ids:
        next_chunk()
    return chunks_ids, chunks_weights, chunks_fixes


def encode_prompts(
    tokenizer,
    text_encoder,
    texts: list[str],
    *,
    syntax: str = "a1111",
    clip_skip: int | None = None,
    labels: list[str] | None = None,
    embeddings=None,
) -> torch.Tensor:
    """Context [len(texts), K * max_length, C] for a CLIP text encoder (ids [N, max_length] -> [N, L, C]).

    syntax: "a1111" (the module docstring) or "plain" (one window; a warning per text that was cut,
    naming it by `labels[i]`, default "prompt i"). clip_skip: diffusers' meaning, the number of final
    layers skipped (0 or None: all; 1 = the penultimate layer's output, A1111's "Clip skip: 2"); the
    final LayerNorm is applied either way. embeddings: a runtime.embeddings.EmbeddingLibrary whose names
    the a1111 syntax finds in the texts.
    """
    if syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"unknown prompt syntax {syntax!r}; choose one of {', '.join(PROMPT_SYNTAXES)}")
    labels = labels or [f"prompt {index}" for index in range(len(texts))]
    device = next(text_encoder.parameters()).device
    if syntax == "plain":
        ids = _plain_ids(tokenizer, texts, labels)
        return hidden_states(text_encoder, ids.to(device), clip_skip)
    matcher = None if embeddings is None else embeddings.matcher(tokenizer)
    rows_ids, rows_weights, count, rows_fixes = chunk_rows(tokenizer, texts, matcher=matcher)
    ids = torch.tensor(rows_ids, dtype=torch.long, device=device)
    context = hidden_states(text_encoder, ids, clip_skip, fixes=rows_fixes)
    context = apply_weights(context, rows_weights)
    return context.reshape(len(texts), count * context.shape[1], context.shape[2])


def chunk_count(tokenizer, texts: list[str], matcher=None) -> int:
    return max(len(embedding_chunks(tokenizer, text, matcher)[0]) for text in texts)


def chunk_rows(tokenizer, texts: list[str], count: int | None = None, matcher=None):
    """(ids, weights, K, fixes): every text's chunks, padded with empty-prompt chunks to K (the most any text
    has, or `count`), as rows of K consecutive chunks per text: len(texts) * K rows of tokenizer.max_length.
    fixes: textual-inversion vectors as (row, first slot, Embedding), for `hidden_states`."""
    per_text = [embedding_chunks(tokenizer, text, matcher) for text in texts]
    count = max([len(ids) for ids, _, _ in per_text] + [count or 1])
    empty_ids, empty_weights = prompt_chunks(tokenizer, "")
    rows_ids, rows_weights, rows_fixes = [], [], []
    for ids, weights, fixes in per_text:
        missing = count - len(ids)
        rows_fixes += [(len(rows_ids) + k, start, e) for k, chunk in enumerate(fixes) for start, e in chunk]
        rows_ids += ids + empty_ids * missing
        rows_weights += weights + empty_weights * missing
    return rows_ids, rows_weights, count, rows_fixes


def apply_weights(context: torch.Tensor, rows_weights: list[list[float]]) -> torch.Tensor:
    """context [rows, L, C] with A1111's emphasis; unchanged (the same tensor) where every weight is 1."""
    if all(weight == 1.0 for row in rows_weights for weight in row):
        return context
    return _apply_weights(context, torch.tensor(rows_weights, device=context.device))


def _apply_weights(context: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis per chunk row: scale each token, then restore the row's mean."""
    hidden = context.float()
    original_mean = hidden.mean(dim=(1, 2), keepdim=True)
    weighted = hidden * weights[:, :, None]
    weighted = weighted * (original_mean / weighted.mean(dim=(1, 2), keepdim=True))
    return weighted.to(context.dtype)


def _plain_ids(tokenizer, texts: list[str], labels: list[str]) -> torch.Tensor:
    if not hasattr(tokenizer, "tokenize_with_info"):
        return tokenizer(texts)
    result = tokenizer.tokenize_with_info(texts)
    for cut in result.truncated:
        warnings.warn(
            f"{labels[cut.index]} is longer than the text encoder's {result.input_ids.shape[1]} "
            f"tokens and was truncated; these words were dropped: {cut.dropped_text!r}",
            UserWarning,
            stacklevel=4,
        )
    return result.input_ids


def hidden_states(text_encoder, ids: torch.Tensor, clip_skip: int | None = None, fixes=()) -> torch.Tensor:
    """text_encoder(ids), or with clip_skip = k the output of all but the last k layers, through the
    final LayerNorm (as diffusers' `clip_skip`). Skipping needs our torch CLIPTextModel's layers.
    fixes: textual-inversion vectors, (row, first slot, Embedding), written over those token embeddings."""
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0):
        raise ValueError(f"clip_skip must be an integer >= 0 (layers skipped from the end), got {clip_skip!r}")
    if not clip_skip and not fixes:
        return text_encoder(ids)
    if fixes:
        from runtime.embeddings import input_embeddings

        hidden = input_embeddings(text_encoder, ids, fixes)  # refuses an exported text encoder by name
    layers = getattr(getattr(text_encoder, "encoder", None), "layers", None)
    if layers is None or not hasattr(text_encoder, "embeddings") or not hasattr(text_encoder, "final_layer_norm"):
        raise ValueError(
            f"clip_skip={clip_skip} needs the torch text encoder's layers; this text encoder "
            f"({type(text_encoder).__name__}) gives only its final output"
        )
    clip_skip = clip_skip or 0
    if clip_skip >= len(layers):
        raise ValueError(
            f"clip_skip must be an integer in [0, {len(layers)}) (the text encoder has "
            f"{len(layers)} layers), got {clip_skip!r}"
        )
    if not fixes:
        hidden = text_encoder.embeddings(ids)
    for layer in layers[: len(layers) - clip_skip]:
        hidden = layer(hidden)
    return text_encoder.final_layer_norm(hidden)
