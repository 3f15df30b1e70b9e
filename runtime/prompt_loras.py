"""A1111's `<lora:NAME:WEIGHT>` in prompts: found, resolved in a LoRA folder, applied for one call.

    tags = find_tags("a fox <lora:ink:0.8>")        # [PromptLora(name="ink", scale=0.8, ...)]
    without_tags("a fox <lora:ink:0.8>")            # "a fox " (what the text encoder reads)
    with applied(lora_set, prompts, "loras/"):      # ink.safetensors loaded at 0.8, removed after
        ...

As A1111 (extensions-builtin/Lora, modules/extra_networks.py): `<lora:NAME>` is weight 1.0 (its
extra_networks_default_multiplier), `<lora:NAME:W>` weight W; a third field (A1111's separate UNet
multiplier) and `te=` / `unet=` named weights are accepted only when they equal the first, since one
LoRA here has one scale. The tags are removed from the text before encoding; the prompt written into
the PNG keeps them, as A1111's does. As A1111, only the first prompt of a batch decides the LoRAs: here
every prompt of one call must name the same ones, or the call is refused. Negative prompts are not
parsed (A1111 does not either).

NAME resolves to `NAME.safetensors` directly inside the folder: no separators, no `..`, no symlink that
leads out of it. An unknown name is refused with the names the folder holds, before anything loads.
A name already loaded (pipe.load_lora) keeps its file: the prompt's weight replaces its scale for the
call and the scale is put back after. Unloading restores the base weights bit for bit (runtime/lora.py).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

LORA_SUFFIX = ".safetensors"
DEFAULT_WEIGHT = 1.0
_TAG = re.compile(r"<lora:([^>]+)>")  # A1111's re_extra_net, for the "lora" network type
_NAMED_WEIGHTS = ("te", "unet")


class PromptLoraError(ValueError):
    """A `<lora:...>` tag that cannot be applied; the message names the tag."""


@dataclass(frozen=True)
class PromptLora:
    name: str
    scale: float
    tag: str  # the tag as written, for messages


def find_tags(prompt: str) -> list[PromptLora]:
    """The `<lora:...>` tags of one prompt, in order; a name given twice keeps its last weight."""
    found: dict[str, PromptLora] = {}
    for match in _TAG.finditer(prompt):
        tag = match.group(0)
        fields = [field.strip() for field in match.group(1).split(":")]
        positional = [field for field in fields if not field.startswith(tuple(f"{n}=" for n in _NAMED_WEIGHTS))]
        named = dict(field.split("=", 1) for field in fields if field not in positional)
        name = positional[0] if positional else ""
        if not name:
            raise PromptLoraError(f"{tag}: the LoRA name is empty; write <lora:NAME> or <lora:NAME:0.8>")
        weights = [_weight(value, tag) for value in positional[1:3]] + [_weight(v, tag) for v in named.values()]
        if len(positional) > 3:
            raise PromptLoraError(f"{tag}: too many fields; write <lora:NAME> or <lora:NAME:WEIGHT>")
        if len(set(weights)) > 1:
            raise PromptLoraError(
                f"{tag}: separate text-encoder and UNet weights are not supported; give one weight, <lora:{name}:W>"
            )
        found.pop(name, None)
        found[name] = PromptLora(name, weights[0] if weights else DEFAULT_WEIGHT, tag)
    return list(found.values())


def _weight(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise PromptLoraError(f"{tag}: the weight {text!r} is not a finite number")
    return value


def without_tags(prompts: list[str]) -> list[str]:
    """The prompts as the text encoder reads them: every `<lora:...>` removed, as A1111 does."""
    return [_TAG.sub("", prompt) for prompt in prompts]


def available(folder) -> list[str]:
    """The LoRA names a folder offers: the stems of its *.safetensors files."""
    return sorted(p.name[: -len(LORA_SUFFIX)] for p in Path(folder).iterdir() if p.name.endswith(LORA_SUFFIX))


def resolve(name: str, folder) -> Path:
    """`folder/NAME.safetensors`, refusing names that would leave the folder and names it lacks."""
    if folder is None:
        raise PromptLoraError(
            f"the prompt names the LoRA {name!r} (<lora:{name}:...>) but no LoRA folder is set: pass "
            f"lora_dir= to runtime.load, set pipe.lora_dir, or --lora-dir on the command line"
        )
    folder = Path(folder)
    if not folder.is_dir():
        raise PromptLoraError(f"the LoRA folder {folder} does not exist or is not a folder")
    if name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
        raise PromptLoraError(f"<lora:{name}>: a LoRA is named by its file stem inside the LoRA folder, not by a path")
    path = folder / f"{name}{LORA_SUFFIX}"
    root = folder.resolve()
    if not path.is_file() or path.resolve().parent != root:
        names = available(folder)
        listing = ", ".join(names) if names else "no .safetensors files"
        raise PromptLoraError(f"no LoRA named {name!r} in {folder} (it holds: {listing})")
    return path


def call_loras(prompts: list[str], folder) -> list[tuple[PromptLora, Path]]:
    """The LoRAs one call's prompts name, resolved; checked before any weight changes."""
    per_prompt = [find_tags(prompt) for prompt in prompts]
    first = {(t.name, t.scale) for t in per_prompt[0]}
    for index, tags in enumerate(per_prompt[1:], start=1):
        if {(t.name, t.scale) for t in tags} != first:
            raise PromptLoraError(
                f"prompt {index} names other LoRAs (or weights) than prompt 0; the LoRAs apply to the "
                f"whole batch, so every prompt of one call must name the same <lora:...> tags"
            )
    return [(tag, resolve(tag.name, folder)) for tag in per_prompt[0]]


@contextlib.contextmanager
def applied(lora_set_for, prompts: list[str], folder, allow_pickle: bool = False):
    """Apply the prompts' LoRAs for the block, then put everything back.

    lora_set_for: a function returning the pipeline's runtime.lora.LoraSet (called only when the
    prompts name a LoRA, so a prompt without tags works on every backend)."""
    wanted = call_loras(prompts, folder)
    if not wanted:
        yield
        return
    adapters = lora_set_for()
    loaded, rescaled = [], {}
    try:
        for tag, path in wanted:
            if tag.name in adapters.scales:
                rescaled[tag.name] = adapters.scales[tag.name]
                adapters.set_scale(tag.name, tag.scale)
            else:
                adapters.load(path, scale=tag.scale, name=tag.name, allow_pickle=allow_pickle)
                loaded.append(tag.name)
        yield
    finally:
        for name in reversed(loaded):
            adapters.unload(name)
        for name, scale in rescaled.items():
            adapters.set_scale(name, scale)


def metadata(lora_set) -> dict[str, str | None]:
    """GenerationInfo's `loras` ("name: scale, ...") and `lora_hashes` (A1111's "name: hash, ...") fields
    for the LoRAs applied now; names lose ':' and ',' as in A1111's infotext."""
    if lora_set is None or not lora_set.scales:
        return {"loras": None, "lora_hashes": None}
    from runtime.model_hash import lora_hash

    clean = {name: name.replace(":", "").replace(",", "") for name in lora_set.scales}
    return {
        "loras": ", ".join(f"{clean[name]}: {scale:g}" for name, scale in lora_set.scales.items()),
        "lora_hashes": ", ".join(f"{clean[name]}: {lora_hash(path)}" for name, path in lora_set.paths.items()),
    }
