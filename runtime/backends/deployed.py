"""What both deployed backends share: an exported network behind our modules' call signatures.

`DeployedNetwork` converts inputs and outputs around an engine call (`run`: onnxruntime in
onnxruntime_backend.py, TensorRT in tensorrt_backend.py); `DeployedTextEncoder` / `DeployedUNet` /
`DeployedVAE` give it the interface the pipeline calls; `replace_networks` puts them into the components.

LoRA on exported graphs: each text-encoder / UNet stand-in keeps the torch module it was exported from
(`weights`, moved to the CPU) as the LoRA's base. runtime/lora.py merges into that module's weights as on
the torch backend, then `write_weights` sends the changed ones to the engine (`set_initializers`): onnxruntime
rebuilds its session with those initializers replaced from memory, TensorRT refits. Nothing is exported
or built again. The cost: one CPU copy of those networks' weights while the pipeline lives.
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

    # {torch state-dict key: (initializer name, transposed)}, read from the graph (export/weight_map.py).
    weight_map: dict[str, tuple[str, bool]] = {}

    def check_weights(self, keys) -> None:
        """A clear error before any weight changes if one of `keys` has no initializer of its own."""
        missing = [key for key in keys if key not in self.weight_map]
        if missing:
            raise ValueError(
                f"the exported {self.spec.name} graph holds no separate initializer for {len(missing)} of the "
                f"weights this LoRA changes (e.g. {missing[0]}): graphs exported before weight maps existed, or "
                f"a weight the exporter folded; delete the engine directory and export again"
            )

    def write_weights(self, tensors: dict[str, torch.Tensor], restored=()) -> None:
        """Put new values of torch weights (by state-dict key) into the engine; `restored`: the keys
        among them that are back at the exported values."""
        self.check_weights(tensors)
        arrays = {}
        for key, tensor in tensors.items():
            name, transposed = self.weight_map[key]
            value = tensor.detach().t() if transposed else tensor.detach()
            arrays[name] = value.to("cpu", self.graph_dtype).contiguous().numpy()
        self.set_initializers(arrays, {self.weight_map[key][0] for key in restored})

    def set_initializers(self, arrays: dict, restored=()) -> None:
        """Replace the named initializers (numpy arrays in the graph's dtype; `restored`: names whose
        value is the graph's own again): onnxruntime / TensorRT."""
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


class _LoraTarget:
    """A stand-in whose weights a LoRA may change: `weights` is the torch module the graph came from."""

    def __init__(self, network: DeployedNetwork, config, weights=None):
        self.network, self.config = network, config
        self.weights = None if weights is None else weights.to("cpu")

    def parameters(self):
        return self.network.parameters()

    def check_weights(self, keys) -> None:
        self.network.check_weights(keys)

    def write_weights(self, keys, restored=()) -> None:
        state = self.weights.state_dict()
        self.network.write_weights({key: state[key] for key in keys}, restored)


class DeployedTextEncoder(_LoraTarget):
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        outputs = self.network(input_ids=input_ids.to(torch.int64))
        if "last_hidden_state" not in outputs:
            raise ValueError(
                f"the exported SDXL {self.network.spec.name} gives the penultimate hidden state and the pooled "
                f"state only (what SDXL reads): use penultimate_and_pooled(input_ids)"
            )
        return outputs["last_hidden_state"]

    def penultimate_and_pooled(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL graphs: (penultimate hidden state, pooled state), as the torch models' method."""
        outputs = self.network(input_ids=input_ids.to(torch.int64))
        if "penultimate_hidden_state" not in outputs:
            raise ValueError(
                f"the exported {self.network.spec.name} is an SD 1.x / 2.x encoder: it has no pooled output"
            )
        penultimate, pooled = (outputs[tensor.name] for tensor in self.network.spec.outputs)
        return penultimate, pooled


class DeployedUNet(_LoraTarget):
    """The exported UNet. Its context is [B, K x 77, C] for a prompt of K chunks (export/specs.py's "T"
    axis): any K on onnxruntime, 1 .. 3 on TensorRT (its profile); another length is a clear error from
    the network's spec (NetworkSpec.bind), before the engine runs."""

    def __call__(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        timestep = timestep_batch(timestep, sample.shape[0], sample.device)
        inputs = dict(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states)
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        wanted = [name for name in added if name in self.network.spec.input_names]
        given = [name for name, value in added.items() if value is not None]
        if wanted != given:
            raise ValueError(
                f"the exported UNet takes {wanted or 'no'} added conditioning, got {given or 'none'} "
                f"(SDXL's UNet needs text_embeds and time_ids; SD 1.x / 2.x take neither)"
            )
        inputs.update({name: added[name] for name in wanted})
        return self.network(**inputs)["out_sample"]


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


def replace_networks(components, make_network, keep_weights: bool = True):
    """components with unet / text encoder(s) / vae replaced by deployed stand-ins.

    make_network(name) -> DeployedNetwork for each network the model has (export.specs.NETWORKS_OF).
    keep_weights: the text-encoder and UNet stand-ins keep their torch modules (on the CPU) for LoRAs.
    """
    kept = (lambda module: module) if keep_weights else (lambda module: None)
    changes = {
        "unet": DeployedUNet(make_network("unet"), components.unet.config, kept(components.unet)),
        "vae": DeployedVAE(make_network("vae_decoder"), make_network("vae_encoder"), components.vae.config),
    }
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(components, name, None)
        if module is not None:
            changes[name] = DeployedTextEncoder(make_network(name), module.config, kept(module))
    if dataclasses.is_dataclass(components):
        return dataclasses.replace(components, **changes)
    for name, value in changes.items():
        setattr(components, name, value)
    return components
