"""One spec per exported network: tensor names, dynamic axes, profile shapes and sample inputs.

Everything downstream reads these: the ONNX exporter (names, dynamic axes, sample inputs), the
TensorRT builder (optimization profiles) and both deployment backends (output shapes, profile checks).
Shapes are described once, symbolically, with these dimension symbols:

    "B"  the network's batch (the guided UNet and the text encoder see 2x the image batch)
    "H", "W"  image height and width in pixels
    "h", "w"  latent height and width = H / factor, W / factor (factor 8 for every SD VAE)
    "T"  the UNet's text context length: K x 77 tokens for a prompt of K chunks (runtime/prompt_syntax.py:
         more than 75 tokens, or BREAK, takes more chunks). Any multiple of the chunk runs on onnxruntime;
         TensorRT engines take 1 .. TENSORRT_CONTEXT_CHUNKS chunks (their profile: min = opt = 1 chunk).

The VAE encoder outputs the latent distribution's mean ("latent", what AutoencoderKL.encode returns)
and its log-variance ("latent_logvar"), so img2img can sample the posterior as diffusers does.

SDXL (kinds "sdxl", "sdxl-refiner"): each text encoder gives what SDXL reads, the penultimate hidden
state and the pooled state (encoder 2: projected, transformers' `text_embeds`); the UNet takes
`text_embeds` [B, 1280] and `time_ids` [B, 6] (the refiner: [B, 5]) besides the SD inputs. The
refiner has no `text_encoder`, only `text_encoder_2`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

SYMBOLS = ("B", "H", "W", "h", "w", "T")
# Readable names for the dynamic axes in the ONNX graph (TensorRT and Netron show them).
AXIS_NAMES = {
    "B": "batch",
    "H": "height",
    "W": "width",
    "h": "latent_height",
    "w": "latent_width",
    "T": "context_tokens",
}
# A TensorRT engine's profile covers contexts of 1 .. this many prompt chunks (3 x 77 = 231 tokens).
TENSORRT_CONTEXT_CHUNKS = 3
# Every network any model has, in export order; NETWORKS_OF says which ones a model kind has.
NETWORKS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
NETWORKS_OF = {
    "sd1": ("text_encoder", "unet", "vae_decoder", "vae_encoder"),
    "sd2": ("text_encoder", "unet", "vae_decoder", "vae_encoder"),
    "sdxl": NETWORKS,
    "sdxl-refiner": ("text_encoder_2", "unet", "vae_decoder", "vae_encoder"),
}


@dataclass(frozen=True)
class ImageShape:
    """An image batch: `batch` images of `height` x `width` pixels. Written `BxHxW`, e.g. 1x512x512."""

    batch: int
    height: int
    width: int

    def __post_init__(self):
        for name in ("batch", "height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageShape.{name} must be a positive int, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> ImageShape:
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
        if not match:
            raise ValueError(f"shape {text!r} is not of the form BxHxW (e.g. 1x512x512)")
        return cls(*(int(group) for group in match.groups()))

    def __str__(self) -> str:
        return f"{self.batch}x{self.height}x{self.width}"


@dataclass(frozen=True)
class ShapeProfile:
    """The range of image batches an export must serve; `opt` is what TensorRT tunes for."""

    min: ImageShape = ImageShape(1, 256, 256)
    opt: ImageShape = ImageShape(1, 512, 512)
    max: ImageShape = ImageShape(4, 1024, 1024)

    def __post_init__(self):
        for name in ("batch", "height", "width"):
            low, mid, high = (getattr(shape, name) for shape in (self.min, self.opt, self.max))
            if not low <= mid <= high:
                raise ValueError(
                    f"shape profile {name}: need min <= opt <= max, got "
                    f"{low} / {mid} / {high} (min {self.min}, opt {self.opt}, max {self.max})"
                )

    def check_multiple_of(self, factor: int) -> None:
        for label, shape in (("min", self.min), ("opt", self.opt), ("max", self.max)):
            if shape.height % factor or shape.width % factor:
                raise ValueError(
                    f"shape profile {label} {shape}: height and width must be multiples of the VAE factor {factor}"
                )

    def as_dict(self) -> dict:
        return {"min": str(self.min), "opt": str(self.opt), "max": str(self.max)}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, its dims (ints or the SYMBOLS above) and its element type.

    dtype "float" means the network's float dtype (fp32 or fp16 export); "float32" and "int64" are fixed.
    `high` bounds the sample values of an integer input (token ids: the vocabulary size).
    """

    name: str
    dims: tuple
    dtype: str
    high: int | None = None

    def shape(self, values: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(values[dim] if isinstance(dim, str) else dim for dim in self.dims)

    def torch_dtype(self, float_dtype: torch.dtype) -> torch.dtype:
        return {"float": float_dtype, "float32": torch.float32, "int64": torch.int64}[self.dtype]


@dataclass(frozen=True)
class NetworkSpec:
    """Everything an exporter or a backend needs to know about one network's interface."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    factor: int = 8  # pixels per latent cell (the VAE's downsampling factor)
    guided: bool = False  # batch is [uncond; cond]: up to 2x the image batch
    chunk_tokens: int = 0  # tokens per prompt chunk (77) where an input has the "T" axis; 0: none has
    component: str = field(default="", compare=False)  # the model folder the weights come from

    @property
    def input_names(self) -> list[str]:
        return [tensor.name for tensor in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [tensor.name for tensor in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The `dynamic_axes` argument of torch.onnx.export: every symbolic dim of every tensor."""
        return {
            tensor.name: {axis: AXIS_NAMES[dim] for axis, dim in enumerate(tensor.dims) if isinstance(dim, str)}
            for tensor in self.inputs + self.outputs
        }

    def symbols(self, image: ImageShape, *, guided: bool | None = None, chunks: int = 1) -> dict[str, int]:
        """Symbol values for an image batch; guided networks double the batch unless guided=False.
        A network with a context axis gets T = chunks x chunk_tokens."""
        doubled = self.guided if guided is None else (guided and self.guided)
        if image.height % self.factor or image.width % self.factor:
            raise ValueError(
                f"{self.name}: image size {image.height}x{image.width} is not a multiple "
                f"of the VAE factor {self.factor}"
            )
        values = {
            "B": image.batch * (2 if doubled else 1),
            "H": image.height,
            "W": image.width,
            "h": image.height // self.factor,
            "w": image.width // self.factor,
        }
        if self.chunk_tokens:
            values["T"] = chunks * self.chunk_tokens
        return values

    def profile_shapes(self, profile: ShapeProfile) -> dict[str, tuple[tuple, tuple, tuple]]:
        """{input name: (min shape, opt shape, max shape)}, a TensorRT optimization profile.

        A guided network's minimum keeps the single image batch so that guidance <= 1 (one UNet
        pass on the conditional half only) still fits; opt and max are doubled. The context axis runs
        from one chunk (min and opt: most prompts have one) to TENSORRT_CONTEXT_CHUNKS chunks.
        """
        profile.check_multiple_of(self.factor)
        low = self.symbols(profile.min, guided=False)
        mid, high = self.symbols(profile.opt), self.symbols(profile.max, chunks=TENSORRT_CONTEXT_CHUNKS)
        return {tensor.name: (tensor.shape(low), tensor.shape(mid), tensor.shape(high)) for tensor in self.inputs}

    def bind(self, input_shapes: Mapping[str, tuple]) -> dict[str, int]:
        """Symbol values implied by concrete input shapes; a clear error on rank or size mismatch."""
        values: dict[str, int] = {}
        for tensor in self.inputs:
            if tensor.name not in input_shapes:
                raise ValueError(f"{self.name}: missing input {tensor.name!r}")
            shape = tuple(input_shapes[tensor.name])
            if len(shape) != len(tensor.dims):
                raise ValueError(
                    f"{self.name}: input {tensor.name!r} must have {len(tensor.dims)} dims "
                    f"{_dims_text(tensor.dims)}, got shape {list(shape)}"
                )
            for dim, size in zip(tensor.dims, shape):
                if isinstance(dim, int):
                    if size != dim:
                        raise ValueError(
                            f"{self.name}: input {tensor.name!r} has shape {list(shape)}, "
                            f"expected {_dims_text(tensor.dims)}"
                        )
                    continue
                seen = values.setdefault(dim, size)
                if seen != size:
                    raise ValueError(
                        f"{self.name}: input {tensor.name!r} dim {AXIS_NAMES[dim]} is {size} "
                        f"but another input says {seen}"
                    )
        if "h" in values:
            values.setdefault("H", values["h"] * self.factor)
            values.setdefault("W", values["w"] * self.factor)
        if "H" in values:
            values.setdefault("h", values["H"] // self.factor)
            values.setdefault("w", values["W"] // self.factor)
        if "T" in values:
            self.context_chunks(values["T"])
        return values

    def context_chunks(self, tokens: int) -> int:
        """K for a context of `tokens` = K x chunk_tokens tokens; a clear error for any other length."""
        name = next((t.name for t in self.inputs if "T" in t.dims), None)
        if name is None:
            raise ValueError(f"{self.name}: no input has a context-token axis")
        if tokens < self.chunk_tokens or tokens % self.chunk_tokens:
            raise ValueError(
                f"{self.name}: input {name!r} has {tokens} context tokens, which is not a multiple of "
                f"{self.chunk_tokens}: a prompt's context is K x {self.chunk_tokens} tokens (K = 1, 2, 3, ...)"
            )
        return tokens // self.chunk_tokens

    def to_dict(self) -> dict:
        """JSON form, stored in the manifest so engines can be built without loading the model."""
        return {
            "name": self.name,
            "component": self.component,
            "factor": self.factor,
            "guided": self.guided,
            "chunk_tokens": self.chunk_tokens,
            "inputs": [[t.name, list(t.dims), t.dtype, t.high] for t in self.inputs],
            "outputs": [[t.name, list(t.dims), t.dtype, t.high] for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> NetworkSpec:
        try:
            return cls(
                name=data["name"],
                component=data["component"],
                factor=data["factor"],
                guided=data["guided"],
                chunk_tokens=data.get("chunk_tokens", 0),  # absent in exports made before the "T" axis
                inputs=tuple(TensorSpec(n, tuple(d), t, h) for n, d, t, h in data["inputs"]),
                outputs=tuple(TensorSpec(n, tuple(d), t, h) for n, d, t, h in data["outputs"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed network spec {dict(data)!r}: {err}") from None

    def output_shapes(self, input_shapes: Mapping[str, tuple]) -> dict[str, tuple[int, ...]]:
        values = self.bind(input_shapes)
        return {tensor.name: tensor.shape(values) for tensor in self.outputs}

    def sample_inputs(
        self,
        image: ImageShape,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        chunks: int = 1,
    ) -> tuple[torch.Tensor, ...]:
        """Random inputs of the right names' shapes and dtypes (in input order), a context of `chunks`
        prompt chunks; never zeros."""
        generator = torch.Generator("cpu").manual_seed(seed)
        values = self.symbols(image, chunks=chunks)
        tensors = []
        for tensor in self.inputs:
            shape, tensor_dtype = tensor.shape(values), tensor.torch_dtype(dtype)
            if tensor_dtype == torch.int64:
                sample = torch.randint(0, tensor.high, shape, generator=generator)
            elif tensor.name == "timestep":
                sample = torch.rand(shape, generator=generator) * 999.0 + 0.5
            else:
                sample = torch.randn(shape, generator=generator)
            tensors.append(sample.to(device=device, dtype=tensor_dtype))
        return tuple(tensors)


def _dims_text(dims) -> str:
    return "[" + ", ".join(AXIS_NAMES.get(d, str(d)) if isinstance(d, str) else str(d) for d in dims) + "]"


def vae_factor(vae_config) -> int:
    return 2 ** (len(vae_config.block_out_channels) - 1)


def text_encoder_spec(text_config) -> NetworkSpec:
    length, width = text_config.max_position_embeddings, text_config.hidden_size
    return NetworkSpec(
        name="text_encoder",
        component="text_encoder",
        guided=True,
        inputs=(TensorSpec("input_ids", ("B", length), "int64", high=text_config.vocab_size),),
        outputs=(TensorSpec("last_hidden_state", ("B", length, width), "float"),),
    )


def sdxl_text_encoder_spec(name: str, text_config) -> NetworkSpec:
    """An SDXL text encoder: (penultimate hidden state, pooled state). Encoder 1 (CLIP-L) pools without a
    projection (transformers' pooler_output); encoder 2 (bigG) gives the projected `text_embeds`."""
    length, width = text_config.max_position_embeddings, text_config.hidden_size
    pooled = ("text_embeds", text_config.projection_dim) if name == "text_encoder_2" else ("pooler_output", width)
    return NetworkSpec(
        name=name,
        component=name,
        guided=True,
        inputs=(TensorSpec("input_ids", ("B", length), "int64", high=text_config.vocab_size),),
        outputs=(
            TensorSpec("penultimate_hidden_state", ("B", length, width), "float"),
            TensorSpec(pooled[0], ("B", pooled[1]), "float"),
        ),
    )


def unet_spec(unet_config, vae_config, text_length: int = 77, pooled_width: int | None = None) -> NetworkSpec:
    """text_length: tokens per prompt chunk (the text encoder's window); the context is [B, T, C], T any
    multiple of it (a long prompt's chunks side by side).
    pooled_width: SDXL's UNet (addition_embed_type "text_time") also takes text_embeds [B, pooled_width]
    and time_ids [B, n], n = (projection_class_embeddings_input_dim - pooled_width) / addition_time_embed_dim."""
    # Timesteps travel as float32 [B]: Euler-family schedulers use fractional timesteps.
    inputs = (
        TensorSpec("sample", ("B", unet_config.in_channels, "h", "w"), "float"),
        TensorSpec("timestep", ("B",), "float32"),
        TensorSpec("encoder_hidden_states", ("B", "T", unet_config.cross_attention_dim), "float"),
    )
    if pooled_width is not None:
        time_ids = (unet_config.projection_class_embeddings_input_dim - pooled_width) // (
            unet_config.addition_time_embed_dim
        )
        inputs += (
            TensorSpec("text_embeds", ("B", pooled_width), "float"),
            TensorSpec("time_ids", ("B", time_ids), "float"),
        )
    return NetworkSpec(
        name="unet",
        component="unet",
        guided=True,
        factor=vae_factor(vae_config),
        chunk_tokens=text_length,
        inputs=inputs,
        outputs=(TensorSpec("out_sample", ("B", unet_config.out_channels, "h", "w"), "float"),),
    )


def vae_decoder_spec(vae_config) -> NetworkSpec:
    return NetworkSpec(
        name="vae_decoder",
        component="vae",
        factor=vae_factor(vae_config),
        inputs=(TensorSpec("latent", ("B", vae_config.latent_channels, "h", "w"), "float"),),
        outputs=(TensorSpec("images", ("B", vae_config.out_channels, "H", "W"), "float"),),
    )


def vae_encoder_spec(vae_config) -> NetworkSpec:
    return NetworkSpec(
        name="vae_encoder",
        component="vae",
        factor=vae_factor(vae_config),
        inputs=(TensorSpec("images", ("B", vae_config.in_channels, "H", "W"), "float"),),
        outputs=(
            TensorSpec("latent", ("B", vae_config.latent_channels, "h", "w"), "float"),
            TensorSpec("latent_logvar", ("B", vae_config.latent_channels, "h", "w"), "float"),
        ),
    )


def network_specs(unet_config, vae_config, text_config) -> dict[str, NetworkSpec]:
    """The four specs of an SD 1.x / 2.x model, keyed by network name (the order of NETWORKS)."""
    return {
        "text_encoder": text_encoder_spec(text_config),
        "unet": unet_spec(unet_config, vae_config, text_config.max_position_embeddings),
        "vae_decoder": vae_decoder_spec(vae_config),
        "vae_encoder": vae_encoder_spec(vae_config),
    }


def sdxl_network_specs(unet_config, vae_config, text_config, text_config_2) -> dict[str, NetworkSpec]:
    """The specs of an SDXL base (text_config given) or refiner (text_config None), keyed by network name."""
    specs = {}
    if text_config is not None:
        specs["text_encoder"] = sdxl_text_encoder_spec("text_encoder", text_config)
    specs["text_encoder_2"] = sdxl_text_encoder_spec("text_encoder_2", text_config_2)
    length = text_config_2.max_position_embeddings
    specs["unet"] = unet_spec(unet_config, vae_config, length, pooled_width=text_config_2.projection_dim)
    specs["vae_decoder"] = vae_decoder_spec(vae_config)
    specs["vae_encoder"] = vae_encoder_spec(vae_config)
    return specs
