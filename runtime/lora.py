"""LoRA adapters applied in place to a pipeline's weights, and removed bit for bit.

    adapters = LoraSet({"unet": unet, "text_encoder": text_encoder})
    name = adapters.load("style.safetensors", scale=0.8)
    adapters.set_scale(name, 0.5); adapters.unload(name)

Formats (.safetensors):
- kohya-ss / A1111: `lora_unet_<path>` / `lora_te_<path>` (SDXL: `lora_te1_`, `lora_te2_`) with
  `.lora_down.weight`, `.lora_up.weight` and an optional `.alpha`; `<path>` is the module path with dots
  written as underscores, matched against the model's own module paths written the same way. LoCon
  (3x3 `lora_down` on convolutions) is the same product, reshaped to the kernel.
- diffusers / peft: `unet.<path>.lora_A.weight` / `.lora_B.weight` (`text_encoder.`, `text_encoder_2.`),
  optional `<path>.alpha`.
Our state-dict keys are diffusers' / transformers', so both name our modules directly; a CLIP text model
stored without the `text_model.` prefix (transformers 5) also answers to the prefixed name LoRA files use.

Each touched weight W becomes base + sum over active adapters of scale * alpha/rank * up @ down, computed
in fp32 and written into W's own storage: a captured CUDA graph (which reads parameters by address) sees
the new weights without a recapture. The base of every touched weight is kept as an exact copy on the
CPU (pinned when the weight is on CUDA) from its first touch until no adapter touches it, so unloading
copies it back bit for bit. Its cost: one CPU copy of each touched weight, in the weight's dtype.
Everything is parsed and checked (names, shapes, finiteness) before any weight changes.

Exported graphs (onnxruntime, TensorRT): `engines` maps a component to its deployed stand-in; the merge
runs on the torch module it was exported from, and the stand-in's `check_weights(keys)` (before anything
changes) and `write_weights(keys, restored)` (after each merge; `restored`: keys back at their base) carry
the changed weights into the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_SHOWN = 5  # how many offending names an error lists

# Key prefix -> component, per format. Longer prefixes first: "lora_te1_" before "lora_te_".
_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"))
_KOHYA_PREFIXES += (("lora_te_", "text_encoder"),)
_PEFT_PREFIXES = (("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"))
# (suffix of the down factor, of the up factor): kohya, then peft.
_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight")
_PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# Variants with other factorisations; refused by name rather than applied wrongly.
_UNSUPPORTED = (
    ("hada_", "LoHa"),
    ("lokr_", "LoKr"),
    ("dora_scale", "DoRA"),
    (".lora_mid.", "LoCon with a mid (Tucker) factor"),
)


# Cross-attention context width -> the family it belongs to (what attn2.to_k's lora_down reads).
_FAMILY_BY_CONTEXT_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}


class LoraError(ValueError):
    """A LoRA file or request that cannot be applied; the message names the file and the key."""


@dataclass
class _Delta:
    """One layer's low-rank update: scale * factor * up @ down, reshaped to the weight."""

    key: str  # the file's name for the layer (for messages)
    up: torch.Tensor  # (out, rank), fp32 CPU
    down: torch.Tensor  # (rank, in * kh * kw), fp32 CPU
    factor: float  # alpha / rank

    def tensor(self, shape, device) -> torch.Tensor:
        return (self.up.to(device) @ self.down.to(device)).reshape(shape) * self.factor


@dataclass
class _Adapter:
    scale: float
    deltas: dict[tuple[str, str], _Delta]  # (component, parameter key) -> delta
    path: Path  # the file it came from (its hash goes into PNG metadata)


def _few(names) -> str:
    names = list(names)
    more = f" ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_scale(scale, what: str = "LoRA scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LoraError(f"{what} must be a finite number, got {scale!r}")
    return float(scale)


def read_lora_file(path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file; pickle files are refused unless allow_pickle (then read weights-only)."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoraError(
                f"{path} is a pickle file ({path.suffix}): unpickling can execute arbitrary code, so it is not "
                f"read by default. Prefer a .safetensors copy; or, if you trust the file, pass allow_pickle=True "
                f"(it is then read with torch.load(weights_only=True))."
            )
        try:
            data = torch.load(str(path), weights_only=True, map_location="cpu")
        except Exception as error:  # torch raises several types (UnpicklingError, RuntimeError, EOFError)
            raise LoraError(f"{path}: could not be read with torch.load(weights_only=True): {error}") from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise LoraError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
        return dict(data)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise LoraError(f"{path}: not a readable .safetensors file (truncated or corrupt?): {error}") from None


def _split(key: str) -> tuple[str, str, str, str, str] | None:
    """(format, key prefix, component, layer name, role) of a LoRA key, role "down" | "up" | "alpha";
    None if it is not a LoRA key."""
    for prefixes, suffixes, style in (
        (_KOHYA_PREFIXES, _KOHYA_SUFFIXES, "kohya"),
        (_PEFT_PREFIXES, _PEFT_SUFFIXES, "peft"),
    ):
        for prefix, component in prefixes:
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            for role, suffix in zip(("down", "up"), suffixes):
                if rest.endswith(suffix):
                    return style, prefix, component, rest[: -len(suffix)], role
            if rest.endswith(".alpha"):
                return style, prefix, component, rest[: -len(".alpha")], "alpha"
            return None
    return None


def _weights_by_name(model: nn.Module, style: str, component: str) -> dict[str, str]:
    """The names a LoRA file may use for each weight of `model` -> that weight's state-dict key."""
    state = model.state_dict(keep_vars=True)
    # transformers 5 saves CLIPTextModel without text_model.; LoRA files name its layers with it.
    alias = component.startswith("text_encoder") and not any(k.startswith("text_model.") for k in state)
    names = {}
    for key, tensor in state.items():
        if not key.endswith(".weight") or tensor.ndim not in (2, 4):
            continue
        path = key[: -len(".weight")]
        for each in [path, "text_model." + path] if alias else [path]:
            names[each.replace(".", "_") if style == "kohya" else each] = key
    return names


def parse_lora(tensors: dict[str, torch.Tensor], models: dict[str, nn.Module], label: str, kind: str | None = None):
    """{(component, parameter key): _Delta} for `models`, or a LoraError naming what does not fit."""
    for pattern, variant in _UNSUPPORTED:
        found = [k for k in tensors if pattern in k]
        if found:
            raise LoraError(
                f"{label}: {variant} adapters (keys with {pattern!r}, e.g. {found[0]}) are not supported; "
                f"only plain LoRA / LoCon (lora_down/lora_up or lora_A/lora_B) is"
            )
    layers: dict[tuple[str, str, str, str], dict[str, torch.Tensor]] = {}
    foreign = []
    for key, tensor in tensors.items():
        parts = _split(key)
        if parts is None:
            foreign.append(key)
            continue
        style, prefix, component, layer, role = parts
        layers.setdefault((style, prefix, component, layer), {})[role] = tensor
    if not layers:
        raise LoraError(
            f"{label}: no LoRA keys found ({len(tensors)} tensors, e.g. {_few(sorted(tensors))}); expected kohya "
            f"names (lora_unet_*.lora_down.weight) or diffusers/peft names (unet.*.lora_A.weight). "
            f"Is this a full checkpoint rather than a LoRA?"
        )
    tables: dict[tuple[str, str], dict[str, str]] = {}
    deltas: dict[tuple[str, str], _Delta] = {}
    family = lora_family(tensors)
    unmatched = list(foreign)
    states = {name: model.state_dict(keep_vars=True) for name, model in models.items()}
    for (style, prefix, component, layer), parts in sorted(layers.items()):
        file_key = prefix + layer
        if "down" not in parts or "up" not in parts:
            missing = "down" if "down" not in parts else "up"
            raise LoraError(f"{label}: layer {file_key} has no {missing} factor")
        model = models.get(component)
        if model is None:
            unmatched.append(file_key)
            continue
        if (style, component) not in tables:
            tables[style, component] = _weights_by_name(model, style, component)
        key = tables[style, component].get(layer)
        if key is None:
            unmatched.append(file_key)
            continue
        if (component, key) in deltas:
            raise LoraError(f"{label}: {deltas[component, key].key} and {file_key} both name {component}.{key}")
        weight = states[component][key]
        deltas[component, key] = _delta(file_key, parts, weight, label, component, key, kind, family)
    if unmatched:
        raise LoraError(
            f"{label}: {len(unmatched)} key(s) match no layer of this {kind or 'model'}: {_few(sorted(unmatched))}"
        )
    return deltas


def lora_family(tensors: dict[str, torch.Tensor]) -> str | None:
    """The model family a LoRA was made for, from its cross-attention key width; None if it has none."""
    for key, tensor in tensors.items():
        if ("attn2_to_k" in key or "attn2.to_k" in key) and key.endswith((".lora_down.weight", ".lora_A.weight")):
            return _FAMILY_BY_CONTEXT_WIDTH.get(tensor[0].numel())
    return None


def _delta(file_key, parts, weight, label, component, key, kind, family) -> _Delta:
    down, up = parts["down"], parts["up"]
    for role, tensor in (("down", down), ("up", up)):
        if not tensor.is_floating_point():
            raise LoraError(f"{label}: {file_key} {role} factor has dtype {tensor.dtype}, expected a float")
        if not torch.isfinite(tensor).all():
            raise LoraError(f"{label}: {file_key} {role} factor holds NaN or infinite values")
    rank = down.shape[0] if down.ndim else 0
    shape_ok = (
        rank > 0
        and down.ndim in (2, 4)
        and up.ndim in (2, 4)
        and up.shape[1] == rank
        and up[0].numel() == rank  # up is (out, rank[, 1, 1])
        and up.shape[0] == weight.shape[0]
        and down[0].numel() == weight[0].numel()
        and (down.ndim == 2 or weight.ndim == 2 or tuple(down.shape[1:]) == tuple(weight.shape[1:]))
    )
    if not shape_ok:
        if family is not None and kind is not None and family != kind:
            hint = f" (the LoRA is for {family}, by its cross-attention width; the model is {kind})"
        else:
            hint = f" (the model is {kind}; is this LoRA for another family?)" if kind else " (another model family?)"
        raise LoraError(
            f"{label}: {file_key} does not fit {component}.{key}: lora_down {tuple(down.shape)}, lora_up "
            f"{tuple(up.shape)}, weight {tuple(weight.shape)}{hint}"
        )
    alpha = parts.get("alpha")
    factor = 1.0 if alpha is None else float(alpha) / rank
    if not math.isfinite(factor):
        raise LoraError(f"{label}: {file_key}.alpha is not finite")
    return _Delta(file_key, up.float().reshape(up.shape[0], rank), down.float().reshape(rank, -1), factor)


class LoraSet:
    """The LoRAs applied to `models` ({component name: module}), each with its scale."""

    def __init__(self, models: dict[str, nn.Module], kind: str | None = None, engines: dict | None = None):
        self.models = {name: model for name, model in models.items() if model is not None}
        self.kind = kind
        self.engines = dict(engines or {})  # component -> deployed stand-in that mirrors the merged weights
        self._adapters: dict[str, _Adapter] = {}
        self._base: dict[tuple[str, str], torch.Tensor] = {}  # exact CPU copies of the touched weights

    @property
    def scales(self) -> dict[str, float]:
        return {name: adapter.scale for name, adapter in self._adapters.items()}

    @property
    def paths(self) -> dict[str, Path]:
        return {name: adapter.path for name, adapter in self._adapters.items()}

    @property
    def touched_weights(self) -> int:
        """How many weights some loaded LoRA changes (each has a base copy)."""
        return len(self._base)

    @property
    def base_bytes(self) -> int:
        """What the base copies cost (CPU memory)."""
        return sum(t.numel() * t.element_size() for t in self._base.values())

    def load(self, path, scale: float = 1.0, name: str | None = None, allow_pickle: bool = False) -> str:
        scale = check_scale(scale)
        name = Path(path).stem if name is None else name
        if not isinstance(name, str) or not name:
            raise LoraError(f"LoRA name must be a non-empty string, got {name!r}")
        if name in self._adapters:
            raise LoraError(f"a LoRA named {name!r} is already loaded; unload it first or pass another name")
        deltas = parse_lora(read_lora_file(path, allow_pickle), self.models, str(path), self.kind)
        for component, keys in _by_component(deltas).items():
            if component in self.engines:
                self.engines[component].check_weights(keys)
        self._adapters[name] = _Adapter(scale, deltas, Path(path))
        self._recompute(deltas.keys())
        return name

    def set_scale(self, name: str, scale: float) -> None:
        adapter = self._get(name)
        adapter.scale = check_scale(scale)
        self._recompute(adapter.deltas.keys())

    def unload(self, name: str | None = None) -> None:
        if name is not None:
            self._get(name)
        names = list(self._adapters) if name is None else [name]
        touched = set()
        for each in names:
            touched |= set(self._adapters.pop(each).deltas)
        self._recompute(touched)

    def _get(self, name: str) -> _Adapter:
        if name not in self._adapters:
            raise LoraError(f"no LoRA named {name!r} is loaded (loaded: {sorted(self._adapters) or 'none'})")
        return self._adapters[name]

    @torch.no_grad()
    def _recompute(self, keys) -> None:
        keys = list(keys)
        states = {name: model.state_dict(keep_vars=True) for name, model in self.models.items()}
        for component, key in keys:
            weight = states[component][key]
            base = self._base.get((component, key))
            if base is None:
                base = weight.detach().to("cpu", copy=True)
                self._base[component, key] = base.pin_memory() if weight.is_cuda else base
            active = [
                (a.scale, a.deltas[component, key]) for a in self._adapters.values() if (component, key) in a.deltas
            ]
            if not active:
                weight.copy_(base)
                del self._base[component, key]
                continue
            merged = base.to(weight.device, torch.float32, copy=True)  # never a view of the base copy
            for scale, delta in active:
                merged += scale * delta.tensor(weight.shape, weight.device)
            weight.copy_(merged)
        restored = {(component, key) for component, key in keys if (component, key) not in self._base}
        for component, changed in _by_component(keys).items():
            if component in self.engines:
                self.engines[component].write_weights(changed, [k for k in changed if (component, k) in restored])


def _by_component(keys) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for component, key in keys:
        grouped.setdefault(component, []).append(key)
    return grouped
