"""What both deployed backends share: an exported network behind our modules' call signatures.

`DeployedNetwork` converts inputs and outputs around an engine call (`run`: onnxruntime in
onnxruntime_backend.py, TensorRT in tensorrt_backend.py); `DeployedTextEncoder` / `DeployedUNet` /
`DeployedVAE` give it the interface the pipeline calls; `replace_networks` puts them into the components.
"""

from __future__ import annotations

import dataclasses

import torch


class DeployedNetwork:
    """Common plumbing of an exported network: input conversion and the torch-facing attributes.

    `run(inputs: dict[name, Tensor]) -> dict[name, Tensor]` is the engine call (onnxruntime here,
    TensorRT in tensorrt_backend.py); results come back on `device` in `dtype`.
    """

    def __init__(self, spec, device: torch.device, dtype: torch.dtype, graph_dtype: torch.dtype):
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype  # what callers give and get (the loaded components' dtype)
        self.graph_dtype = graph_dtype  # the float dtype inside the exported graph

    def parameters(self):
        """No torch parameters live here; yields one empty tensor so that code reading
        `next(module.parameters())` for the device and dtype (the pipeline does) still works."""
        yield torch.empty(0, device=self.device, dtype=self.dtype)

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        converted = {}
        for tensor_spec in self.spec.inputs:
            value = inputs[tensor_spec.name]
            converted[tensor_spec.name] = value.to(dtype=tensor_spec.torch_dtype(self.graph_dtype))
        outputs = self.run(converted)
        return {name: value.to(device=self.device, dtype=self.dtype) for name, value in outputs.items()}

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def timestep_batch(timestep, batch: int, device) -> torch.Tensor:
    """A python number, 0-d, [1] or [batch] tensor -> float32 [batch], the UNet graph's `timestep`."""
    t = torch.as_tensor(timestep, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() != batch:
        raise ValueError(
            f"timestep has {t.numel()} values but the sample batch is {batch}; give one timestep or one per sample"
        )
    return t


class DeployedTextEncoder:
    def __init__(self, network: DeployedNetwork, config):
        self.network, self.config = network, config

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.network(input_ids=input_ids.to(torch.int64))["last_hidden_state"]

    def parameters(self):
        return self.network.parameters()


class DeployedUNet:
    def __init__(self, network: DeployedNetwork, config):
        self.network, self.config = network, config

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        timestep = timestep_batch(timestep, sample.shape[0], sample.device)
        return self.network(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states)["out_sample"]

    def parameters(self):
        return self.network.parameters()


class DeployedVAE:
    def __init__(self, decoder: DeployedNetwork, encoder: DeployedNetwork, config):
        self.decoder_network, self.encoder_network, self.config = decoder, encoder, config

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder_network(latent=z)["images"]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder_network(images=images)["latent"]

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's (mean, logvar), for sampling as diffusers' latent_dist.sample does."""
        outputs = self.encoder_network(images=images)
        return outputs["latent"], outputs["latent_logvar"]

    def parameters(self):
        return self.decoder_network.parameters()

    def to(self, *args, **kwargs):
        raise NotImplementedError(
            "a deployed VAE runs its exported graph in the dtype it was exported "
            "in; it cannot be cast. Export in fp32 if the fp16 VAE overflows"
        )


def replace_networks(components, make_network):
    """components with unet / text_encoder / vae replaced by deployed stand-ins.

    make_network(name) -> DeployedNetwork for each of export.specs.NETWORKS.
    """
    changes = {
        "text_encoder": DeployedTextEncoder(make_network("text_encoder"), components.text_encoder.config),
        "unet": DeployedUNet(make_network("unet"), components.unet.config),
        "vae": DeployedVAE(make_network("vae_decoder"), make_network("vae_encoder"), components.vae.config),
    }
    if dataclasses.is_dataclass(components):
        return dataclasses.replace(components, **changes)
    for name, value in changes.items():
        setattr(components, name, value)
    return components
