"""Load Stable Diffusion weights into our models: diffusers folders and single-file checkpoints.

    components = load_components("path/to/sd15", dtype="fp16", device="cuda")
    components.unet, components.vae, components.text_encoder, components.tokenizer, components.scheduler_config

Two sources:
- a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/;
  SDXL adds text_encoder_2/ and tokenizer_2/, and its refiner has only those two of the text pairs),
  weights in .safetensors, optionally sharded (*.safetensors.index.json) or as a variant (*.fp16.*);
- an original-layout (CompVis / A1111 / SGM) single .safetensors file; see runtime/single_file.py.
The family (SD 1.x, 2.x, XL base, XL refiner) is read from the UNet and text-encoder configs (a folder)
or from the tensors (a single file); `load_vae` reads a separate VAE for any of them.

Memory: models are built with their parameters on the meta device (no storage), every tensor is
checked against the model by name and shape from the file headers before any data is read, then
read one at a time, cast to the requested dtype on its way to the device, and assigned in place.
No full-precision copy of the model ever exists when a lower precision is asked for.

Pickle files (.ckpt, .pt, .pth, .bin) can run code when unpickled; they are refused unless
allow_pickle=True, and then read only with torch.load(weights_only=True), which loads the whole
file into memory first (the one-tensor-at-a-time guarantee holds for safetensors only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from runtime import single_file
from runtime.dtypes import parse_dtype
from runtime.single_file import OriginalTensor
from runtime.tensor_header import FLOAT_DTYPES, read_header

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Weight file stems per component folder, as diffusers / transformers write them.
_WEIGHT_STEMS = {
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model", "pytorch_model"),
    "text_encoder_2": ("model", "pytorch_model"),
}
_COMPONENT_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_SDXL_TEXT_PAIRS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
_SHOWN = 5  # how many offending names an error lists


class WeightLoadError(ValueError):
    """Weights or configs that cannot be loaded; the message names the file and the key or field."""


@dataclass
class Components:
    """Everything a Stable Diffusion pipeline needs, loaded and ready (eval mode, no grad)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module | None  # None only for the SDXL refiner (it has encoder 2 alone)
    tokenizer: Any  # runtime.tokenizer.CLIPTokenizer (None with text_encoder)
    scheduler_config: dict  # diffusers scheduler_config.json contents (with any prediction_type override)
    source: str  # the folder or file loaded
    kind: str  # "sd1" | "sd2" | "sdxl" | "sdxl-refiner"
    text_encoder_2: nn.Module | None = None  # SDXL: OpenCLIP bigG, CLIPTextModelWithProjection
    tokenizer_2: Any = None  # SDXL: its tokenizer (pads with "!")
    # SDXL: model_index.json's force_zeros_for_empty_prompt and requires_aesthetics_score.
    pipeline_config: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- arguments


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch.float16 or a name ("fp16", "float16", "half", "bf16", "fp32", ...) -> torch.dtype."""
    try:
        return parse_dtype(dtype)
    except ValueError as err:
        raise WeightLoadError(str(err)) from None


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda', 'cuda:1' or a torch.device -> torch.device, checked to exist on this machine."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise WeightLoadError(f"device {device!r} is not a valid torch device: {error}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise WeightLoadError(
                f"device {device!r} requested but CUDA is not available on this machine "
                f"(torch.cuda.is_available() is False); use device='cpu'"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise WeightLoadError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif resolved.type != "cpu":
        raise WeightLoadError(f"device {device!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return resolved


def _check_prediction_type(prediction_type: str | None) -> None:
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise WeightLoadError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


# ----------------------------------------------------------------------------- tensor files


class TensorStore:
    """The tensors of one model: a .safetensors file, a set of shards, or a (pickle) dict.

    `shapes` comes from the file headers without reading tensor data; `read` reads one tensor.
    Use as a context manager: safetensors handles are closed on exit.
    """

    def __init__(self, label: str):
        self.label = label  # file (or index) named in errors
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.floating: dict[str, bool] = {}  # whether each tensor is stored as a floating-point type
        self._readers: dict[str, Callable[[str], torch.Tensor]] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> TensorStore:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def read(self, key: str) -> torch.Tensor:
        return self._readers[key](key)

    def add_safetensors(self, path: Path, only: set[str] | None = None) -> None:
        """Names, shapes and dtypes from the header now; the file is mapped at the first read, so
        every check runs before any tensor data is touched."""
        try:
            infos = read_header(path)
        except OSError as error:
            raise WeightLoadError(f"{path}: cannot be read: {error}") from None
        except ValueError as error:
            raise WeightLoadError(str(error)) from None
        shapes = {key: info.shape for key, info in infos.items()}
        if only is not None:
            absent = sorted(only - set(shapes))
            if absent:
                raise WeightLoadError(
                    f"{self.label}: the index maps {len(absent)} key(s) to {path.name} that "
                    f"the file does not hold: {_few(absent)}"
                )
            shapes = {k: v for k, v in shapes.items() if k in only}
        opened = []

        def read(key: str) -> torch.Tensor:
            if not opened:
                from safetensors import SafetensorError, safe_open

                try:
                    opened.append(self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu")))
                except SafetensorError as error:
                    raise WeightLoadError(
                        f"{path}: not a readable .safetensors file (truncated or corrupt?): {error}"
                    ) from None
            return opened[0].get_tensor(key)

        for key in shapes:
            self._readers[key] = read
            self.floating[key] = infos[key].dtype in FLOAT_DTYPES
        self.shapes.update(shapes)

    def add_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            if isinstance(tensor, torch.Tensor):
                self.shapes[key] = tuple(tensor.shape)
                self.floating[key] = tensor.is_floating_point()
                self._readers[key] = tensors.__getitem__


def _few(names) -> str:
    names = list(names)
    more = f" ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _refuse_pickle(path: Path) -> WeightLoadError:
    return WeightLoadError(
        f"{path} is a pickle file ({path.suffix}): unpickling can execute arbitrary code, so it is not "
        f"read by default. Prefer a .safetensors copy; or, if you trust the file, pass allow_pickle=True "
        f"(it is then read with torch.load(weights_only=True), which refuses anything but tensors)."
    )


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(str(path), weights_only=True, map_location="cpu")
    except Exception as error:  # torch raises several types (UnpicklingError, RuntimeError, EOFError)
        raise WeightLoadError(f"{path}: could not be read with torch.load(weights_only=True): {error}") from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]  # Lightning-style checkpoints nest the weights
    if not isinstance(data, Mapping):
        raise WeightLoadError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    return dict(data)


# ----------------------------------------------------------------------------- building and filling models


class _EmptyOnMeta(TorchFunctionMode):
    """`torch.empty` without an explicit device allocates on meta; every other factory is untouched.

    torch's layers (Linear, Conv2d, GroupNorm, LayerNorm, Embedding) allocate their parameters with
    torch.empty and then initialise them in place, which on meta costs nothing. Buffers are built
    with arange / zeros / tensor ... and stay real. A TorchFunctionMode lives on the calling thread's
    mode stack, so other threads (another load, or code building its own modules) are unaffected.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with parameters on the meta device and buffers real, on this thread only.

    Parameters get their values from the file, so allocating and initialising them would be wasted
    work (and memory). Buffers keep the values their constructors compute, so a buffer a file does
    not hold (position ids, cached tables) is correct without the loader knowing about it (the same
    approach as accelerate's init_empty_weights(include_buffers=False), without its process-wide
    patch of nn.Module.register_parameter, which broke loads running in parallel threads).
    """
    with _EmptyOnMeta():
        yield


def _build(what: str, model_cls, config_cls, config: dict, config_label: str) -> nn.Module:
    try:
        parsed = config_cls.from_dict(config)
    except (ValueError, TypeError) as error:
        raise WeightLoadError(f"{what} config ({config_label}): {error}") from None
    with _parameters_on_meta():
        return model_cls(parsed)


# Config fields to name when a weight of this kind has the wrong shape.
_SHAPE_HINTS = {
    "attn2.to_k.weight": "cross_attention_dim",
    "attn2.to_v.weight": "cross_attention_dim",
    "token_embedding.weight": "vocab_size / hidden_size",
    "conv_in.weight": "in_channels",
}


@dataclass
class _Job:
    """One network to load: the empty model, where each of its tensors is, and what else the file holds."""

    what: str  # "unet" | "vae" | "text_encoder"
    model: nn.Module
    plan: Mapping[str, OriginalTensor]  # model key -> tensor in `store`
    store: TensorStore
    unexpected: list[str]  # file keys that belong to this network but to no model key
    config_label: str

    def check(self) -> None:
        """Names and shapes of every tensor against the model, from the headers alone."""
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        buffers = {name for name, _ in self.model.named_buffers()}
        missing = [k for k in expected if k not in self.plan and k not in buffers]
        missing += [where.key for k, where in self.plan.items() if k in expected and where.key not in self.store.shapes]
        extra = sorted(set(self.unexpected) | {k for k in self.plan if k not in expected})
        parameters = {name for name, _ in self.model.named_parameters()}
        not_float = [
            where.key
            for key, where in self.plan.items()
            if key in parameters and not self.store.floating.get(where.key, True)
        ]
        mismatched, hints = [], set()
        for key, where in self.plan.items():
            if key in expected and where.key in self.store.shapes:
                found = where.converted_shape(self.store.shapes[where.key])
                if found != expected[key]:
                    mismatched.append(f"{where.key}: file {list(found)} vs config {list(expected[key])}")
                    hints.update(field for suffix, field in _SHAPE_HINTS.items() if key.endswith(suffix))
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_few(missing)}")
        if extra:
            problems.append(f"{len(extra)} unexpected key(s): {_few(extra)}")
        if mismatched:
            hint = f" (check config field {', '.join(sorted(hints))})" if hints else ""
            problems.append(f"{len(mismatched)} shape mismatch(es): {_few(mismatched)}{hint}")
        if not_float:
            problems.append(
                f"{len(not_float)} weight(s) stored as integers or bools where floating-point "
                f"weights belong: {_few(not_float)}"
            )
        if problems:
            raise WeightLoadError(
                f"{self.what} weights in {self.store.label} do not match the model built from "
                f"{self.config_label}: " + "; ".join(problems)
            )

    def load(self, dtype: torch.dtype, device: torch.device) -> nn.Module:
        """Read, cast and assign one tensor at a time; returns the model in eval mode without grad."""
        state = {}
        for key, where in self.plan.items():
            tensor = where.convert(self.store.read(where.key))
            if where.op != "copy":
                tensor = tensor.contiguous()  # a view would keep the whole fused / 4-D source alive
            state[key] = tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor.to(device)
            del tensor  # the file-dtype tensor dies here, before the next one is read
        model = self.model
        model.load_state_dict(state, strict=False, assign=True)
        model.to(device=device, dtype=dtype)  # buffers only: parameters are already there
        still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if still_meta:
            raise WeightLoadError(f"{self.what}: internal error, tensors left unloaded: {_few(still_meta)}")
        return model.eval().requires_grad_(False)


def _run(jobs: list[_Job], dtype: torch.dtype, device: torch.device) -> dict[str, nn.Module]:
    for job in jobs:  # every header checked before any tensor data is read
        job.check()
    return {job.what: job.load(dtype, device) for job in jobs}


# ----------------------------------------------------------------------------- configs


def _read_json(path: Path, expected: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected {expected}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightLoadError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise WeightLoadError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _kind_of_unet_config(config: dict) -> str:
    if config.get("addition_embed_type") == "text_time":
        return "sdxl-unet"
    if config.get("use_linear_projection") or config.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


def _check_context_width(unet_config: dict, text_config: dict, unet_label: str, text_label: str) -> None:
    context, hidden = unet_config.get("cross_attention_dim"), text_config.get("hidden_size")
    if isinstance(context, int) and isinstance(hidden, int) and context != hidden:
        raise WeightLoadError(
            f"{unet_label} field cross_attention_dim={context} does not match "
            f"{text_label} field hidden_size={hidden}: the text encoder does not fit this UNet"
        )


def _scheduler_config(config: dict, prediction_type: str | None) -> dict:
    config = dict(config)
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    return config


def _model_classes():
    from runtime.models.clip import CLIPTextConfig, CLIPTextModel
    from runtime.models.unet import UNet, UNetConfig
    from runtime.models.vae import AutoencoderKL, VAEConfig

    return {
        "unet": (UNet, UNetConfig),
        "vae": (AutoencoderKL, VAEConfig),
        "text_encoder": (CLIPTextModel, CLIPTextConfig),
    }


def _sdxl_model_classes():
    """_model_classes() and SDXL's second text encoder."""
    from runtime.models.clip import CLIPTextConfig, CLIPTextModelWithProjection

    return {**_model_classes(), "text_encoder_2": (CLIPTextModelWithProjection, CLIPTextConfig)}


def _sdxl_kind(unet: dict, text_2: dict, unet_label: str) -> str:
    """ "sdxl" or "sdxl-refiner" from how many time ids the UNet's add_embedding reads: (its input width -
    the pooled text width) / the sinusoid width is 6 for the base, 5 (no target size; an aesthetic score)
    for the refiner."""
    from runtime.default_configs import SDXL_TIME_IDS

    width, step = unet.get("projection_class_embeddings_input_dim"), unet.get("addition_time_embed_dim")
    pooled = text_2.get("projection_dim", 512)
    ids = (width - pooled) / step if isinstance(width, int) and isinstance(step, int) and step > 0 else None
    for kind, count in SDXL_TIME_IDS.items():
        if ids == count:
            return kind
    raise WeightLoadError(
        f"{unet_label}: projection_class_embeddings_input_dim={width} is neither the SDXL base's "
        f"nor the refiner's: with a {pooled}-wide pooled text embedding (text_encoder_2 "
        f"projection_dim) and addition_time_embed_dim={step}, the base has "
        f"{pooled + 6 * (step or 0)} and the refiner {pooled + 5 * (step or 0)}"
    )


# ----------------------------------------------------------------------------- diffusers folders

_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_TEXT_POSITION_IDS = ("embeddings.position_ids", "text_model.embeddings.position_ids")


def _variants_present(names: list[str], stem: str) -> list[str]:
    """Variant names ("fp16", ...) of `stem` weight files among `names`."""
    patterns = (
        rf"{re.escape(stem)}\.(\w+)[.-].*(safetensors|bin)$",
        rf"{re.escape(stem)}\.safetensors\.index\.(\w+)\.json$",
    )
    return sorted({m.group(1) for name in names for pattern in patterns if (m := re.match(pattern, name))})


def _store_for(folder: Path, stem: str, variant: str | None, allow_pickle: bool) -> TensorStore | None:
    """`stem`[.variant] weights in `folder`: one .safetensors, shards with an index, or a pickle .bin."""
    dot = f".{variant}" if variant else ""
    single, index, pickled = (
        folder / f"{stem}{dot}.safetensors",
        folder / f"{stem}.safetensors.index{dot}.json",
        folder / f"{stem}{dot}.bin",
    )
    for candidate in (single, index, pickled):
        _refuse_non_file(candidate)
    if single.is_file():
        store = TensorStore(str(single))
        store.add_safetensors(single)
        return store
    if index.is_file():
        return _sharded_store(index)
    if pickled.is_file():
        if not allow_pickle:
            raise _refuse_pickle(pickled)
        store = TensorStore(str(pickled))
        store.add_dict(_load_pickle(pickled))
        return store
    return None


def _refuse_non_file(path: Path) -> None:
    """A weights name that exists but is not a regular file would otherwise read as "missing"."""
    if path.is_symlink() and not path.exists():
        raise WeightLoadError(f"{path} is a symlink that leads to no file (dangling, or a loop of links)")
    if path.exists() and not path.is_file():
        raise WeightLoadError(f"{path} is a directory (or other non-file), not a weights file")


def _find_weight_files(folder: Path, component: str, variant: str | None, allow_pickle: bool) -> TensorStore:
    """The store of one component folder. Without `variant` the plain files are used, or else a
    variant if it is the only one present; a component lacking the requested variant falls back to
    its plain files with a warning, as diffusers does (repositories often ship e.g. `non_ema` for
    the UNet only)."""
    present = sorted(p.name for p in folder.iterdir())
    for stem in _WEIGHT_STEMS[component]:
        store = _store_for(folder, stem, variant, allow_pickle)
        if store is None and variant is not None:
            store = _store_for(folder, stem, None, allow_pickle)
            if store is not None:
                warnings.warn(
                    f"{folder}: no {variant!r} variant of the {component} weights; using {Path(store.label).name}",
                    stacklevel=4,
                )
        if store is not None:
            return store
        others = _variants_present(present, stem)
        if variant is None and len(others) > 1:
            raise WeightLoadError(
                f"{folder}: no plain {stem} weights but several variants {others}: pass variant=... to choose one"
            )
        store = _store_for(folder, stem, others[0], allow_pickle) if variant is None and others else None
        if store is not None:
            return store
    wanted = f"variant {variant!r} " if variant else ""
    raise FileNotFoundError(
        f"{folder}: no {wanted}weights found for {component} (expected e.g. "
        f"{_WEIGHT_STEMS[component][0]}{'.' + variant if variant else ''}.safetensors or a "
        f"*.safetensors.index.json); folder holds: {', '.join(present) or 'nothing'}"
    )


def _sharded_store(index: Path) -> TensorStore:
    data = _read_json(index, "a shard index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightLoadError(f"{index}: field 'weight_map' is missing or empty")
    by_file: dict[str, set[str]] = {}
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise WeightLoadError(
                f"{index}: 'weight_map' entry {key!r} is {name!r}; expected the name of a shard file (a string)"
            )
        by_file.setdefault(name, set()).add(key)
    for name in by_file:
        shard = _shard_path(index, name)
        _refuse_non_file(shard)
        if not shard.is_file():
            raise FileNotFoundError(f"{index}: shard {name!r} listed in 'weight_map' does not exist")
    store = TensorStore(str(index))
    for name, keys in sorted(by_file.items()):
        store.add_safetensors(index.parent / name, only=keys)
    return store


def _shard_path(index: Path, name: str) -> Path:
    """A shard named by an index we did not write: a plain file name in the index's own folder.

    The name itself may not climb out ("..", absolute paths, separators); a symlink the folder holds
    is the folder owner's choice (the Hugging Face cache links every file to its blob store)."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).name != name:
        raise WeightLoadError(
            f"{index}: 'weight_map' names shard {name!r}, which is not a plain file name in "
            f"{index.parent}; refusing to read outside the model folder"
        )
    return index.parent / name


def _folder_plan(component: str, model: nn.Module, store: TensorStore) -> tuple[dict, list[str]]:
    """model key -> file tensor, accepting the key spellings real folders use; plus unexpected file keys."""
    model_keys = set(model.state_dict())
    by_name: dict[str, OriginalTensor] = {}
    unexpected = []
    for file_key in store.shapes:
        name, op = file_key, "copy"
        if component.startswith("text_encoder"):
            if file_key in _TEXT_POSITION_IDS:
                continue  # transformers < 4.31 saved this buffer; it is 0..76
            # transformers 4.x: "text_model." prefix; 5.x: none. Our model decides which it wants.
            bare = single_file.strip_text_model_prefix(file_key)
            name = bare if bare in model_keys else single_file.HF_TEXT_PREFIX + bare
        elif component == "vae" and ".mid_block.attentions." in file_key:
            head, _, leaf = file_key.rpartition(".")
            parent, _, last = head.rpartition(".")
            if last in _LEGACY_VAE_ATTENTION:  # diffusers < 0.14 names
                name = f"{parent}.{_LEGACY_VAE_ATTENTION[last]}.{leaf}"
            if leaf == "weight" and not head.endswith("group_norm"):
                op = "to_linear"  # some old files hold these as 1x1 convs
        if name in by_name:
            raise WeightLoadError(
                f"{store.label}: keys {by_name[name].key!r} and {file_key!r} both give {component} parameter {name!r}"
            )
        by_name[name] = OriginalTensor(file_key, op)
        if name not in model_keys:
            unexpected.append(file_key)
    return {k: v for k, v in by_name.items() if k in model_keys}, unexpected


def _load_folder(path: Path, *, device, dtype, variant, allow_pickle, tokenizer_path, prediction_type):
    model_index = _read_json(
        path / "model_index.json",
        "a diffusers pipeline folder holds model_index.json next to unet/, vae/, "
        "text_encoder/, tokenizer/ and scheduler/ (for a single-file checkpoint pass "
        "the .safetensors file itself)",
    )
    if "text_encoder_2" in model_index:
        return _load_sdxl_folder(
            path,
            model_index,
            device=device,
            dtype=dtype,
            variant=variant,
            allow_pickle=allow_pickle,
            tokenizer_path=tokenizer_path,
            prediction_type=prediction_type,
        )
    needed = [c for c in _COMPONENT_FOLDERS if not (c == "tokenizer" and tokenizer_path is not None)]
    for component in needed:
        if not (path / component).is_dir():
            raise FileNotFoundError(
                f"{path}: component folder {component}/ is missing (model_index.json "
                f"lists {sorted(k for k in model_index if not k.startswith('_'))})"
            )
    configs = {c: _read_json(path / c / "config.json", f"the {c} config") for c in ("unet", "vae", "text_encoder")}
    _check_context_width(
        configs["unet"],
        configs["text_encoder"],
        str(path / "unet" / "config.json"),
        str(path / "text_encoder" / "config.json"),
    )
    scheduler = _read_json(path / "scheduler" / "scheduler_config.json", "the scheduler config")
    from runtime.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_folder(tokenizer_path if tokenizer_path is not None else path / "tokenizer")
    with contextlib.ExitStack() as stack:
        jobs = []
        classes = _model_classes()
        for component in ("unet", "vae", "text_encoder"):
            model_cls, config_cls = classes[component]
            config_label = str(path / component / "config.json")
            store = stack.enter_context(_find_weight_files(path / component, component, variant, allow_pickle))
            model = _build(component, model_cls, config_cls, configs[component], config_label)
            plan, unexpected = _folder_plan(component, model, store)
            jobs.append(_Job(component, model, plan, store, unexpected, config_label))
        models = _run(jobs, dtype, device)
    return Components(
        models["unet"],
        models["vae"],
        models["text_encoder"],
        tokenizer,
        _scheduler_config(scheduler, prediction_type),
        str(path),
        _kind_of_unet_config(configs["unet"]),
    )


def _load_sdxl_folder(
    path: Path, model_index: dict, *, device, dtype, variant, allow_pickle, tokenizer_path, prediction_type
):
    """An SDXL base (both text pairs) or refiner (text_encoder / tokenizer listed as null) folder."""
    from runtime.tokenizer import CLIPTokenizer

    index_label = str(path / "model_index.json")
    listed = {
        name
        for name, value in model_index.items()
        if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None
    }
    for component in ("unet", "vae", "scheduler", "text_encoder_2", "tokenizer_2"):
        if component not in listed:
            raise WeightLoadError(
                f"{index_label}: an SDXL pipeline needs component {component!r}, which it does "
                f"not list (or lists as null)"
            )
    texts = [pair for pair in _SDXL_TEXT_PAIRS if pair[0] in listed]
    networks = ["unet", "vae", *(text for text, _ in texts)]
    for component in [*networks, "scheduler", *(tok for _, tok in texts)]:
        if not (path / component).is_dir():
            raise FileNotFoundError(f"{path}: component folder {component}/ is missing (model_index.json lists it)")
    configs = {c: _read_json(path / c / "config.json", f"the {c} config") for c in networks}
    unet_label = str(path / "unet" / "config.json")
    if configs["unet"].get("addition_embed_type") != "text_time":
        raise WeightLoadError(
            f"{unet_label}: model_index.json lists text_encoder_2 (SDXL) but this UNet has no "
            f"SDXL added conditioning (addition_embed_type="
            f"{configs['unet'].get('addition_embed_type')!r}, expected 'text_time')"
        )
    kind = _sdxl_kind(configs["unet"], configs["text_encoder_2"], unet_label)
    expected_texts = ("text_encoder", "text_encoder_2") if kind == "sdxl" else ("text_encoder_2",)
    if tuple(text for text, _ in texts) != expected_texts:
        raise WeightLoadError(
            f"{index_label}: the UNet is an {kind} UNet, which reads {' + '.join(expected_texts)}, "
            f"but the folder lists {' + '.join(text for text, _ in texts)}"
        )
    _check_sdxl_context(configs, unet_label, {t: str(path / t / "config.json") for t in expected_texts})
    aesthetic = model_index.get("requires_aesthetics_score", False)
    if bool(aesthetic) != (kind == "sdxl-refiner"):
        raise WeightLoadError(
            f"{index_label}: requires_aesthetics_score={aesthetic!r}, but the UNet's added "
            f"conditioning is an {kind}'s ({'5 time ids with' if kind == 'sdxl-refiner' else '6 time ids, no'}"
            f" aesthetic score)"
        )
    scheduler = _read_json(path / "scheduler" / "scheduler_config.json", "the scheduler config")
    tokenizers = {}
    for _encoder, tok in texts:
        folder = Path(tokenizer_path) if tokenizer_path is not None and tok == "tokenizer" else path / tok
        tokenizers[tok] = CLIPTokenizer.from_folder(folder)
    with contextlib.ExitStack() as stack:
        jobs = []
        classes = _sdxl_model_classes()
        for component in networks:
            model_cls, config_cls = classes[component]
            config_label = str(path / component / "config.json")
            store = stack.enter_context(_find_weight_files(path / component, component, variant, allow_pickle))
            model = _build(component, model_cls, config_cls, configs[component], config_label)
            plan, unexpected = _folder_plan(component, model, store)
            jobs.append(_Job(component, model, plan, store, unexpected, config_label))
        models = _run(jobs, dtype, device)
    flags = {
        "force_zeros_for_empty_prompt": bool(model_index.get("force_zeros_for_empty_prompt", True)),
        "requires_aesthetics_score": bool(aesthetic),
    }
    return Components(
        models["unet"],
        models["vae"],
        models.get("text_encoder"),
        tokenizers.get("tokenizer"),
        _scheduler_config(scheduler, prediction_type),
        str(path),
        kind,
        text_encoder_2=models["text_encoder_2"],
        tokenizer_2=tokenizers["tokenizer_2"],
        pipeline_config=flags,
    )


def _check_sdxl_context(configs: dict, unet_label: str, text_labels: dict) -> None:
    """The UNet's cross-attention width is the sum of the text encoders' widths (768 + 1280 = 2048)."""
    context = configs["unet"].get("cross_attention_dim")
    widths = {t: configs[t].get("hidden_size") for t in text_labels}
    if (
        isinstance(context, int)
        and all(isinstance(w, int) for w in widths.values())
        and context != sum(widths.values())
    ):
        parts = " + ".join(f"{text_labels[t]} hidden_size={w}" for t, w in widths.items())
        raise WeightLoadError(
            f"{unet_label} field cross_attention_dim={context} does not match {parts} "
            f"(the UNet reads the text encoders' hidden states side by side)"
        )


# ----------------------------------------------------------------------------- single files


def _single_file_tokenizer(tokenizer_path, pad_token: str, source: Path):
    from runtime.tokenizer import CLIPTokenizer

    if tokenizer_path is not None:
        return CLIPTokenizer.from_folder(tokenizer_path)
    try:
        return CLIPTokenizer.from_open_clip_bpe(pad_token=pad_token)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{source}: a single-file checkpoint carries no tokenizer, and the bundled "
            f"vocabulary is unavailable ({error}); pass tokenizer_path=<folder with "
            f"vocab.json + merges.txt> or install open_clip_torch"
        ) from None


def _single_file_configs(store: TensorStore, name: str) -> tuple[single_file.Layout, dict]:
    try:
        layout = single_file.detect_layout(store.shapes, store.label)
        configs = single_file.infer_configs(store.shapes, layout, store.label)
    except ValueError as error:
        raise WeightLoadError(str(error)) from None
    if layout.kind.startswith("sdxl"):
        texts = [t for t in ("text_encoder", "text_encoder_2") if t in configs]
        _check_sdxl_context(configs, f"{name} (UNet)", {t: f"{name} ({t})" for t in texts})
        return layout, configs
    if layout.text_prefix is None:
        raise WeightLoadError(
            f"{store.label}: no text encoder in the checkpoint (no key under "
            f"{single_file.SD1_TEXT_PREFIX!r} or {single_file.SD2_TEXT_PREFIX!r})"
        )
    _check_context_width(configs["unet"], configs["text_encoder"], f"{name} (UNet)", f"{name} (text encoder)")
    return layout, configs


def _single_file_jobs(store: TensorStore, layout: single_file.Layout, configs: dict) -> list[_Job]:
    """The three networks of an original-layout checkpoint, built empty and mapped to its keys."""
    config_label = f"the {layout.kind.upper()} defaults with sizes read from {store.label}"
    prefixes = {
        "unet": single_file.UNET_PREFIX,
        "vae": single_file.VAE_PREFIX,
        "text_encoder": layout.text_prefix,
        "text_encoder_2": layout.text_prefix_2,
    }
    # The text layout of each encoder: HF CLIP names ("sd1") or OpenCLIP names.
    text_layouts = {"text_encoder": "sd1" if layout.kind.startswith("sdxl") else layout.kind, "text_encoder_2": "sd2"}
    text_layers = configs.get("text_encoder", configs.get("text_encoder_2"))["num_hidden_layers"]
    jobs = []
    classes = _sdxl_model_classes() if layout.kind.startswith("sdxl") else _model_classes()
    for component, (model_cls, config_cls) in classes.items():
        if component != "unet" and component != "vae" and prefixes[component] is None:
            continue
        model = _build(component, model_cls, config_cls, configs[component], config_label)
        keys = list(model.state_dict())
        if component == "unet":
            mapping = single_file.unet_key_map(keys)
        elif component == "vae":
            mapping = single_file.vae_key_map(keys)
        else:
            buffers = {name for name, _ in model.named_buffers()}
            mapping = single_file.text_key_map([k for k in keys if k not in buffers], text_layouts[component])
        prefix = prefixes[component]
        plan = {k: OriginalTensor(prefix + v.key, v.op, v.part) for k, v in mapping.items()}
        used = {v.key for v in plan.values()}
        unexpected = [
            k
            for k in store.shapes
            if k.startswith(prefix) and k not in used and not single_file.is_unused_original_key(k, layout, text_layers)
        ]
        jobs.append(_Job(component, model, plan, store, unexpected, config_label))
    return jobs


def _load_single_file(path: Path, *, device, dtype, allow_pickle, tokenizer_path, prediction_type):
    with TensorStore(str(path)) as store:
        if path.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise _refuse_pickle(path)
            store.add_dict(_load_pickle(path))
        else:
            store.add_safetensors(path)
        layout, configs = _single_file_configs(store, str(path))
        # tokenizer_path stands for the first tokenizer; SDXL's second (padding with "!") is the bundled one.
        tokenizers = {
            name: _single_file_tokenizer(
                tokenizer_path if name == "tokenizer" else None, configs[name]["pad_token"], path
            )
            for name in ("tokenizer", "tokenizer_2")
            if name in configs
        }
        if layout.text_prefix is None:
            tokenizers.pop("tokenizer", None)  # the refiner
        models = _run(_single_file_jobs(store, layout, configs), dtype, device)
    return Components(
        models["unet"],
        models["vae"],
        models.get("text_encoder"),
        tokenizers.get("tokenizer"),
        _scheduler_config(configs["scheduler"], prediction_type),
        str(path),
        layout.kind,
        text_encoder_2=models.get("text_encoder_2"),
        tokenizer_2=tokenizers.get("tokenizer_2"),
        pipeline_config=dict(configs.get("pipeline", {})),
    )


# ----------------------------------------------------------------------------- a separate VAE


def load_vae(
    path: str | os.PathLike,
    components: Components,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> nn.Module:
    """A VAE to use instead of `components.vae`: a diffusers vae/ folder (config.json + weights) or a
    single .safetensors VAE (LDM keys, bare or under first_stage_model.; e.g. sdxl_vae.safetensors).

    Refused unless it fits the model: the same latent channels and, for a folder (a single file has no
    config), the same scaling_factor; an SD 1.x VAE (0.18215) given to SDXL (0.13025) is named as such.
    A single file takes the model's own VAE config (scaling, force_upcast) with sizes read from its shapes.
    """
    resolved_dtype, resolved_device = resolve_dtype(dtype), resolve_device(device)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"vae path {path} does not exist")
    from runtime.models.vae import AutoencoderKL, VAEConfig

    current = components.vae.config
    with contextlib.ExitStack() as stack:
        if path.is_dir():
            config_label = str(path / "config.json")
            config = _read_json(path / "config.json", "a diffusers VAE folder holds config.json and its weights")
            store = stack.enter_context(_find_weight_files(path, "vae", None, allow_pickle))
            model = _build("vae", AutoencoderKL, VAEConfig, config, config_label)
            plan, unexpected = _folder_plan("vae", model, store)
        else:
            if path.suffix != ".safetensors":
                raise WeightLoadError(f"{path}: a VAE must be a diffusers folder or a .safetensors file")
            store = stack.enter_context(TensorStore(str(path)))
            store.add_safetensors(path)
            prefix = single_file.VAE_PREFIX if any(k.startswith(single_file.VAE_PREFIX) for k in store.shapes) else ""
            shapes = {
                single_file.VAE_PREFIX + k[len(prefix) :]: v for k, v in store.shapes.items() if k.startswith(prefix)
            }
            try:
                sizes = single_file._infer_vae(shapes, str(path))
            except ValueError as error:
                raise WeightLoadError(str(error)) from None
            config_label = f"this model's VAE config with sizes read from {path}"
            config = {**{k: v for k, v in dataclasses.asdict(current).items()}, **sizes}
            model = _build("vae", AutoencoderKL, VAEConfig, config, config_label)
            mapping = single_file.vae_key_map(list(model.state_dict()))
            plan = {k: OriginalTensor(prefix + v.key, v.op, v.part) for k, v in mapping.items()}
            used = {v.key for v in plan.values()}
            unexpected = [
                k for k in store.shapes if k.startswith(prefix) and k not in used and not k.startswith(prefix + "loss.")
            ]
        found = model.config
        if found.latent_channels != current.latent_channels:
            raise WeightLoadError(
                f"{path}: this VAE has {found.latent_channels} latent channels, the "
                f"{components.kind} model's UNet reads {current.latent_channels}"
            )
        if found.scaling_factor != current.scaling_factor:
            family = {0.18215: " (an SD 1.x / 2.x VAE)", 0.13025: " (an SDXL VAE)"}.get(found.scaling_factor, "")
            raise WeightLoadError(
                f"{path}: this VAE's scaling_factor is {found.scaling_factor}{family}; the "
                f"{components.kind} model's latents use {current.scaling_factor}"
            )
        return _run([_Job("vae", model, plan, store, unexpected, config_label)], resolved_dtype, resolved_device)["vae"]


# ----------------------------------------------------------------------------- entry point


def load_components(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    variant: str | None = None,
    allow_pickle: bool = False,
    tokenizer_path: str | os.PathLike | None = None,
    prediction_type: str | None = None,
) -> Components:
    """Load a diffusers pipeline folder or a single-file (CompVis / A1111) checkpoint.

    device: "cpu" or "cuda[:N]". dtype: torch dtype or name ("fp16", "bf16", "fp32", ...).
    variant: weight-file variant of a folder ("fp16" picks *.fp16.safetensors; without it, plain files
    are preferred and a variant is used only when it is the only one present).
    allow_pickle: permit .ckpt / .bin / .pt files (read with torch.load(weights_only=True)).
    tokenizer_path: a tokenizer folder to use instead of the folder's tokenizer/ or, for a single file,
    instead of the vocabulary bundled with open_clip. prediction_type: overrides the scheduler config's
    (a single file cannot tell SD 2.x 768-v, "v_prediction", the default, from 512-base, "epsilon").
    """
    resolved_dtype, resolved_device = resolve_dtype(dtype), resolve_device(device)
    _check_prediction_type(prediction_type)
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise WeightLoadError(f"model path {path} is a symlink that leads nowhere (dangling, or a loop of links)")
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if tokenizer_path is not None and not Path(tokenizer_path).is_dir():
        raise FileNotFoundError(f"tokenizer_path {tokenizer_path} is not a folder")
    if path.is_dir():
        if (path / "config.json").is_file() and not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{path} looks like one component folder (config.json, no model_index.json); "
                f"pass the pipeline folder that holds model_index.json"
            )
        return _load_folder(
            path,
            device=resolved_device,
            dtype=resolved_dtype,
            variant=variant,
            allow_pickle=allow_pickle,
            tokenizer_path=tokenizer_path,
            prediction_type=prediction_type,
        )
    if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise WeightLoadError(
            f"{path}: unsupported file type {path.suffix!r}; expected a .safetensors "
            f"single-file checkpoint (or {', '.join(PICKLE_SUFFIXES)} with allow_pickle=True) "
            f"or a diffusers folder"
        )
    if variant is not None:
        raise WeightLoadError(f"variant={variant!r} applies to diffusers folders only, not to the file {path}")
    return _load_single_file(
        path,
        device=resolved_device,
        dtype=resolved_dtype,
        allow_pickle=allow_pickle,
        tokenizer_path=tokenizer_path,
        prediction_type=prediction_type,
    )
