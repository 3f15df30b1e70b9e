"""CLIP text encoders as Stable Diffusion uses them: token ids [B, 77] -> hidden states [B, 77, C].

`CLIPTextModel` (SD 1/2, SDXL's first encoder) and `CLIPTextModelWithProjection` (SDXL's OpenCLIP
bigG encoder: the pooled end-of-text state through `text_projection`). SDXL conditions on the
penultimate hidden state of both and on the projected pooled state; `penultimate_and_pooled` gives those.

State-dict keys equal what transformers 5.x saves: `CLIPTextModel` without a `text_model.` prefix and
without a `position_ids` buffer; `CLIPTextModelWithProjection` as `text_model.*` plus
`text_projection.weight`. So a diffusers `text_encoder/` folder written by transformers 5 loads with no
conversion. Files written by transformers 4.x (every checkpoint on the hub) prefix keys with
`text_model.` and sometimes hold `text_model.embeddings.position_ids`; stripping that is the weights
loader's job (runtime/weights.py).

The attention here is causal and is deliberately NOT `layers.AttentionCore`: kernel backends target
the UNet and VAE only, and the text encoder runs once per prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("quick_gelu", "gelu")  # SD 1.x (OpenAI CLIP ViT-L/14) and SD 2.x (OpenCLIP ViT-H/14)

# Keys of a transformers config.json that do not change the encoder's forward math: bookkeeping,
# generation settings every PretrainedConfig carried in 4.x, special-token ids other than end-of-text
# (which pooling reads), dropout (inactive at inference) and init settings.
_IGNORED_KEYS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "architectures",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "model_type",
        "bos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "attention_dropout",
        "dropout",
        "initializer_range",
        "initializer_factor",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "torchscript",
        "use_bfloat16",
        "tf_legacy_loss",
        "pruned_heads",
        "tie_word_embeddings",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "is_decoder",
        "cross_attention_hidden_size",
        "add_cross_attention",
        "tie_encoder_decoder",
        "finetuning_task",
        "id2label",
        "label2id",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "problem_type",
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
    }
)

_ACCEPTED_MODEL_TYPES = ("clip_text_model",)

# Range of each size field: several times the largest real encoder (OpenCLIP bigG: 1280 wide, 32
# layers), so an absurd config fails at parse time instead of after minutes of construction.
_SIZE_LIMITS = {
    "vocab_size": 1_000_000,
    "hidden_size": 16384,
    "intermediate_size": 65536,
    "num_hidden_layers": 128,
    "num_attention_heads": 256,
    "max_position_embeddings": 4096,
    "projection_dim": 16384,
}


@dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of a CLIP text encoder. Defaults are transformers' `CLIPTextConfig` defaults, so a
    config.json that omits a field means what it means to transformers."""

    vocab_size: int = 49408  # token embedding rows
    hidden_size: int = 512  # C, the width of the output context (768 SD1, 1024 SD2)
    intermediate_size: int = 2048  # MLP inner width
    num_hidden_layers: int = 12  # transformer blocks (12 SD1, 23 SD2)
    num_attention_heads: int = 8  # must divide hidden_size
    max_position_embeddings: int = 77  # longest token sequence (SD: always 77)
    hidden_act: str = "quick_gelu"  # MLP activation: "quick_gelu" (SD1) or exact "gelu" (SD2)
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # pooling reads the end-of-text position; 2 (transformers < 4.31) means argmax
    projection_dim: int = 512  # output width of text_projection (CLIPTextModelWithProjection only)

    def __post_init__(self):
        for name, limit in _SIZE_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
                raise ValueError(f"CLIPTextConfig.{name} must be an integer in [1, {limit}], got {value!r:.60}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"CLIPTextConfig.hidden_act={self.hidden_act!r} is not implemented; expected one of {ACTIVATIONS}"
            )
        if (
            isinstance(self.layer_norm_eps, bool)
            or not isinstance(self.layer_norm_eps, (int, float))
            or not 0 < self.layer_norm_eps < 1
        ):
            raise ValueError(
                f"CLIPTextConfig.layer_norm_eps must be a number in (0, 1), got {self.layer_norm_eps!r:.60}"
            )
        if isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, int) or self.eos_token_id < 0:
            raise ValueError(f"CLIPTextConfig.eos_token_id must be a non-negative int, got {self.eos_token_id!r:.60}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
        """Build from a transformers text_encoder/config.json dict. Bookkeeping keys are ignored;
        any other unknown key is rejected, since it may change the math in a way we do not implement."""
        if not isinstance(config, Mapping):
            raise ValueError(f"CLIP text config must be a dict, got {type(config).__name__}")
        model_type = config.get("model_type", "clip_text_model")
        if model_type not in _ACCEPTED_MODEL_TYPES:
            raise ValueError(
                f"CLIP text config key 'model_type'={model_type!r} is not supported; "
                f"expected one of {_ACCEPTED_MODEL_TYPES}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key in fields:
                kwargs[key] = value
            elif key not in _IGNORED_KEYS:
                raise ValueError(
                    f"CLIP text config key {key!r} (value {value!r}) is not supported: "
                    f"it is neither a known field {sorted(fields)} nor a known "
                    f"bookkeeping key"
                )
        return cls(**kwargs)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI CLIP's sigmoid approximation of GELU; SD 1.x weights were trained with it.
    return x * torch.sigmoid(1.702 * x)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Positions are 0..N-1 for every row, so slicing the table replaces a position_ids buffer.
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections (transformers' layout)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        c = config.hidden_size
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.q_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        heads = (b, n, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(heads).transpose(1, 2)
        k = self.k_proj(x).view(heads).transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        # Default scale head_dim**-0.5 is CLIP's scale.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.hidden_act = config.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = _quick_gelu(x) if self.hidden_act == "quick_gelu" else F.gelu(x)
        return self.fc2(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_penultimate(x)[0]

    def forward_with_penultimate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last layer's output, the output before the last layer: transformers' hidden_states[-2])."""
        penultimate = x
        for layer in self.layers:
            penultimate, x = x, layer(x)
        return x, penultimate


class CLIPTextModel(nn.Module):
    """input_ids [B, N<=max_position_embeddings] (integer) -> last hidden state after the final
    LayerNorm [B, N, hidden_size]. No padding mask: Stable Diffusion conditions on all 77 positions,
    padding included."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check_ids(input_ids)
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))

    def penultimate_and_pooled(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden state before the last layer [B, N, C], unnormalised, as SDXL reads it; the final
        LayerNorm's state at each row's end-of-text token [B, C], transformers' pooler_output).
        inputs_embeds: the encoder's input [B, N, C] in place of embeddings(input_ids) (textual
        inversion's, runtime/embeddings.py); input_ids still find each row's end-of-text token."""
        self._check_ids(input_ids)
        hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        last, penultimate = self.encoder.forward_with_penultimate(hidden)
        return penultimate, self._pool(self.final_layer_norm(last), input_ids)

    def _pool(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        if self.config.eos_token_id == 2:
            # Configs from before transformers 4.31 say 2; the end-of-text id is then the largest id.
            positions = input_ids.to(torch.int64).argmax(dim=-1)
        else:
            positions = (input_ids == self.config.eos_token_id).to(torch.int64).argmax(dim=-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        # Shape and dtype checks read only metadata: no host sync.
        if input_ids.dim() != 2:
            raise ValueError(f"CLIPTextModel input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"CLIPTextModel input_ids must be int64 or int32, got {input_ids.dtype}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"CLIPTextModel input_ids has {input_ids.shape[1]} tokens; at most "
                f"max_position_embeddings={self.config.max_position_embeddings} fit"
            )


class CLIPTextModelWithProjection(nn.Module):
    """transformers' CLIPTextModelWithProjection (SDXL's second encoder, OpenCLIP ViT-bigG):
    a CLIPTextModel under `text_model.` and a bias-free `text_projection` of the pooled state."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextModel(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Last hidden state after the final LayerNorm [B, N, C] (as CLIPTextModel)."""
        return self.text_model(input_ids)

    def penultimate_and_pooled(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden state before the last layer [B, N, C]; projected pooled state [B, projection_dim],
        transformers' text_embeds). inputs_embeds: as CLIPTextModel's."""
        penultimate, pooled = self.text_model.penultimate_and_pooled(input_ids, inputs_embeds)
        return penultimate, self.text_projection(pooled)
