"""SDXL's conditioning, numerically diffusers' StableDiffusionXL[Img2Img|Inpaint]Pipeline.

The UNet reads three things per row of the guided batch [uncond; cond]:
  context      [2B, T, 768 + 1280]   the penultimate hidden states of both text encoders side by side
                                     (the refiner: encoder 2 alone, 1280); T = K x 77 for K prompt chunks
  text_embeds  [2B, 1280]            encoder 2's pooled, projected state
  time_ids     [2B, 6]               micro-conditioning: original size (h, w), crop top-left (y, x),
                                     target size (h, w); the refiner: size, crop, aesthetic score [2B, 5]
`force_zeros_for_empty_prompt` (the base's model_index.json): with no negative prompt given (None, not
""), the unconditional context and text_embeds are zeros, as diffusers does.

The ensemble of experts: the base denoises the steps whose timesteps are >= the cutoff of
`refiner_start` (diffusers' denoising_end), the refiner the rest (denoising_start); `base_end` and
`refiner_begin` are those two index rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from runtime import prompt_syntax
from runtime.embeddings import input_embeddings

SDXL_KINDS = ("sdxl", "sdxl-refiner")
DEFAULT_REFINER_START = 0.8


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size / crop / aesthetic conditioning; the names and defaults are diffusers'. Sizes are
    (height, width); None means the output size. Negatives: as diffusers, txt2img reuses the positive ids
    unless both negative sizes are given; img2img / inpaint default each negative size to its positive,
    and the negative crop to (0, 0)."""

    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0  # the refiner only
    negative_aesthetic_score: float = 2.5

    @classmethod
    def from_kwargs(cls, kwargs: dict, kind: str) -> MicroConditioning:
        """Checked keyword arguments of generate / img2img / inpaint -> MicroConditioning."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(
                f"unexpected keyword argument(s) {', '.join(unknown)}; SDXL conditioning takes "
                f"{', '.join(sorted(names))}"
            )
        if kwargs and kind not in SDXL_KINDS:
            raise TypeError(
                f"{', '.join(sorted(kwargs))}: size / crop / aesthetic conditioning exists only for "
                f"SDXL models; this one is {kind}"
            )
        for name, value in kwargs.items():
            if name.endswith("aesthetic_score"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"{name} must be a finite number, got {value!r}")
            elif value is not None and not (
                isinstance(value, (tuple, list))
                and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
            ):
                raise ValueError(
                    f"{name} must be a pair of non-negative ints (height, width) / (top, left), got {value!r}"
                )
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()})

    def time_ids(self, mode: str, height: int, width: int, aesthetic: bool) -> tuple[list[float], list[float]]:
        """(positive ids, negative ids) for one image of `height` x `width`."""
        original = self.original_size or (height, width)
        target = self.target_size or (height, width)
        if aesthetic:
            negative_original = self.negative_original_size or original
            return (
                [*original, *self.crops_coords_top_left, self.aesthetic_score],
                [*negative_original, *self.negative_crops_coords_top_left, self.negative_aesthetic_score],
            )
        positive = [*original, *self.crops_coords_top_left, *target]
        if mode == "txt2img":
            if self.negative_original_size is not None and self.negative_target_size is not None:
                return positive, [
                    *self.negative_original_size,
                    *self.negative_crops_coords_top_left,
                    *self.negative_target_size,
                ]
            return positive, positive
        return positive, [
            *(self.negative_original_size or original),
            *self.negative_crops_coords_top_left,
            *(self.negative_target_size or target),
        ]


class SDXLConditioner:
    """Encodes prompts and builds the added conditioning for one SDXL base or refiner."""

    def __init__(self, components):
        self.kind = components.kind
        present = [
            (tokenizer, encoder, key)
            for tokenizer, encoder, key in (
                (components.tokenizer, components.text_encoder, "clip_l"),
                (components.tokenizer_2, components.text_encoder_2, "clip_g"),
            )
            if encoder is not None
        ]
        self.encoders = [(tokenizer, encoder) for tokenizer, encoder, _ in present]
        # Which part of an SDXL textual-inversion file each encoder reads (runtime/embeddings.py SDXL_KEYS).
        self.embedding_keys = [key for _, _, key in present]
        flags = components.pipeline_config
        self.force_zeros = bool(flags.get("force_zeros_for_empty_prompt", self.kind == "sdxl"))
        self.aesthetic = bool(flags.get("requires_aesthetics_score", self.kind == "sdxl-refiner"))

    @property
    def is_refiner(self) -> bool:
        return self.aesthetic

    def encode(
        self,
        prompts: list[str],
        negatives: list[str],
        zero_negatives: bool,
        guided: bool,
        num_images: int,
        device,
        dtype,
        syntax: str = "plain",
        embeddings=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [R, K * 77, C], text_embeds [R, P]); R = len(prompts) * num_images, doubled with
        guidance ([uncond; cond]). zero_negatives: no negative prompt was given. syntax: "plain" (one
        77-token window, K = 1) or "a1111" (runtime/prompt_syntax.py; K = 1 for prompts of <= 75 tokens).
        embeddings: a runtime.embeddings.EmbeddingLibrary whose names the a1111 syntax finds in the texts;
        each encoder takes its own part of an SDXL embedding (clip_l, clip_g)."""
        if syntax not in prompt_syntax.PROMPT_SYNTAXES:
            raise ValueError(
                f"unknown prompt syntax {syntax!r}; choose one of {', '.join(prompt_syntax.PROMPT_SYNTAXES)}"
            )
        encode_negatives = guided and not (zero_negatives and self.force_zeros)
        # Prompts and negatives get the same chunk count K (A1111's pad_cond_uncond), encoded in two batches
        # as before A1111 syntax existed, so a short prompt's tensors keep their bits.
        texts = list(prompts) + (list(negatives) if encode_negatives else [])
        matchers = self.matchers(embeddings if syntax == "a1111" else None)
        count = 1 if syntax == "plain" else self.chunk_count(texts, matchers)
        context, pooled = self._encode_texts(prompts, device, syntax, count, matchers)
        if guided:
            if not encode_negatives:
                negative_context, negative_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
            else:
                negative_context, negative_pooled = self._encode_texts(negatives, device, syntax, count, matchers)
        repeat = lambda t: t.to(dtype).repeat_interleave(num_images, dim=0)  # noqa: E731 (each prompt's images together)
        context, pooled = repeat(context), repeat(pooled)
        if guided:
            context = torch.cat([repeat(negative_context), context])
            pooled = torch.cat([repeat(negative_pooled), pooled])
        return context, pooled

    def matchers(self, embeddings) -> list:
        """Each encoder's finder of the library's names (None each without a library)."""
        return [None if embeddings is None else embeddings.matcher(tokenizer) for tokenizer, _ in self.encoders]

    def chunk_count(self, texts: list[str], matchers) -> int:
        """A1111 chunks per text, over both encoders (their BPE is the same; counted on each anyway)."""
        return max(
            prompt_syntax.chunk_count(tokenizer, texts, matcher)
            for (tokenizer, _), matcher in zip(self.encoders, matchers)
        )

    def _encode_texts(
        self, texts: list[str], device, syntax: str, count: int, matchers
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if syntax == "plain":
            hidden, pooled = [], None
            for tokenizer, encoder in self.encoders:
                penultimate, pooled = encoder.penultimate_and_pooled(tokenizer(texts).to(device))
                hidden.append(penultimate)
            # diffusers takes the pooled output from the encoder with a projection: the last one.
            return torch.cat(hidden, dim=-1), pooled
        # A1111 syntax: both encoders cut the texts into `count` chunks (their BPE is the same; the count is
        # taken over both anyway), each chunk row weighted on its own, the pooled state of chunk 0.
        hidden, pooled = [], None
        for (tokenizer, encoder), key, matcher in zip(self.encoders, self.embedding_keys, matchers):
            ids, weights, _, fixes = prompt_syntax.chunk_rows(tokenizer, texts, count, matcher)
            ids = torch.tensor(ids, dtype=torch.long, device=device)
            if fixes:  # textual inversion: this encoder's vectors over the names' token slots
                inputs = input_embeddings(getattr(encoder, "text_model", encoder), ids, fixes, key)
                penultimate, pooled = encoder.penultimate_and_pooled(ids, inputs)
            else:
                penultimate, pooled = encoder.penultimate_and_pooled(ids)
            penultimate = prompt_syntax.apply_weights(penultimate, weights)
            hidden.append(penultimate.reshape(len(texts), count * penultimate.shape[1], penultimate.shape[2]))
            pooled = pooled.reshape(len(texts), count, pooled.shape[-1])[:, 0]
        return torch.cat(hidden, dim=-1), pooled

    def time_ids(
        self, micro: MicroConditioning, mode: str, height: int, width: int, rows: int, guided: bool, device, dtype
    ) -> torch.Tensor:
        """[rows (x2 when guided), 6 | 5] in the model dtype, as diffusers builds them."""
        positive, negative = micro.time_ids(mode, height, width, self.aesthetic)
        ids = torch.tensor([positive], dtype=dtype, device=device).repeat(rows, 1)
        if guided:
            ids = torch.cat([torch.tensor([negative], dtype=dtype, device=device).repeat(rows, 1), ids])
        return ids


def conditioner_for(components) -> SDXLConditioner | None:
    return SDXLConditioner(components) if components.kind in SDXL_KINDS else None


def _cutoff(scheduler, fraction: float) -> int:
    train = scheduler.config["num_train_timesteps"]
    return int(round(train - fraction * train))


def base_end(scheduler, refiner_start: float) -> int:
    """Steps the base runs before the refiner takes over: diffusers' denoising_end (timesteps >= cutoff)."""
    return int((scheduler.timesteps.cpu() >= _cutoff(scheduler, refiner_start)).sum())


def refiner_begin(scheduler, refiner_start: float) -> int:
    """First step index of the refiner: diffusers' denoising_start (timesteps < cutoff). Our samplers are
    all first order, so diffusers' odd-count adjustment for second-order ones does not apply."""
    remaining = int((scheduler.timesteps.cpu() < _cutoff(scheduler, refiner_start)).sum())
    return scheduler.num_steps - remaining


def check_refiner(base_kind: str, refiner, refiner_start) -> float | None:
    """The validated refiner_start (None without a refiner); clear errors before any work."""
    if refiner is None:
        if refiner_start is not None:
            raise ValueError(
                f"refiner_start={refiner_start!r} was given without a refiner; pass refiner=<an SDXL "
                f"pipeline> or drop refiner_start"
            )
        return None
    if base_kind != "sdxl":
        raise ValueError(f"refiner= needs an SDXL base; this model is {base_kind}")
    refiner_kind = getattr(getattr(refiner, "components", None), "kind", None)
    if refiner_kind not in SDXL_KINDS:
        raise ValueError(
            f"refiner must be an SDXL pipeline (runtime.load of an SDXL refiner or base), got "
            f"{refiner_kind or type(refiner).__name__}"
        )
    if refiner_start is None:
        refiner_start = DEFAULT_REFINER_START
    if isinstance(refiner_start, bool) or not isinstance(refiner_start, (int, float)) or not 0 < refiner_start < 1:
        raise ValueError(
            f"refiner_start must be a fraction in (0, 1) of the denoising done by the base, got {refiner_start!r}"
        )
    return float(refiner_start)
