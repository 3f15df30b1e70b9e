"""Small kohya-named LoRA files for tests: the UNet's to_q / to_v / proj_out, big enough to change the image."""

import torch
from safetensors.torch import save_file

RANK = 4


def write_kohya_unet_lora(unet, path, seed, metadata=None):
    tensors = {}
    generator = torch.Generator().manual_seed(seed)
    for key, weight in unet.state_dict().items():
        if key.endswith(("to_q.weight", "to_v.weight", "proj_out.weight")):
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            tensors[name + ".lora_down.weight"] = 0.3 * torch.randn((RANK, *weight.shape[1:]), generator=generator)
            up_shape = (weight.shape[0], RANK) + (1, 1) * (weight.ndim == 4)
            tensors[name + ".lora_up.weight"] = 0.3 * torch.randn(up_shape, generator=generator)
    save_file(tensors, str(path), metadata=metadata)
    return path
