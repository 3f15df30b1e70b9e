"""The `onnxruntime` backend: the exported ONNX graphs run by onnxruntime behind the modules' call signatures.

    pipe = runtime.load(path, backend="onnxruntime", engine_dir="exports/sd15")

prepare() exports the networks into engine_dir on first use (or when the weights or dtype changed),
then replaces components.unet / .text_encoder / .vae with stand-ins that take and return torch
tensors exactly like our modules: unet(sample, timestep, context), text_encoder(ids),
vae.decode(z), vae.encode(x), vae.encode_moments(x), each with the original `.config`.
Tensors are handed to onnxruntime by pointer (IO binding), on the GPU with the CUDA execution
provider when onnxruntime-gpu is installed and the model is on CUDA, otherwise on the CPU.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

log = logging.getLogger("runtime")

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


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
        raise ValueError(f"timestep has {t.numel()} values but the sample batch is {batch}; "
                         "give one timestep or one per sample")
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
        return self.network(sample=sample, timestep=timestep,
                            encoder_hidden_states=encoder_hidden_states)["out_sample"]

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
        raise NotImplementedError("a deployed VAE runs its exported graph in the dtype it was exported "
                                  "in; it cannot be cast. Export in fp32 if the fp16 VAE overflows")


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


class OrtNetwork(DeployedNetwork):
    """One ONNX graph in an onnxruntime session, fed through IO binding."""

    def __init__(self, path, spec, device, dtype, graph_dtype, providers=None):
        super().__init__(spec, device, dtype, graph_dtype)
        import onnxruntime as ort

        available = ort.get_available_providers()
        use_cuda = self.device.type == "cuda" and "CUDAExecutionProvider" in available
        if providers is None:
            providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
        if self.device.type == "cuda" and not use_cuda:
            log.warning("onnxruntime has no CUDA execution provider (install onnxruntime-gpu): %s "
                        "runs on the CPU and tensors are copied to and from the GPU", spec.name)
        self.ort_device = torch.device("cuda", self.device.index or 0) if use_cuda else torch.device("cpu")
        self.session = ort.InferenceSession(str(path), providers=providers)
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if names != (spec.input_names, spec.output_names):
            from export.manifest import ArtifactError
            raise ArtifactError(f"{path}: graph inputs/outputs {names} are not those of {spec.name} "
                                f"{(spec.input_names, spec.output_names)}")

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device_type, device_id = self.ort_device.type, self.ort_device.index or 0
        binding = self.session.io_binding()
        keep = []  # the bound tensors must outlive the run
        for name, value in inputs.items():
            value = value.to(self.ort_device).contiguous()
            keep.append(value)
            binding.bind_input(name, device_type, device_id, _NUMPY[value.dtype], tuple(value.shape),
                               value.data_ptr())
        outputs = {}
        shapes = self.spec.output_shapes({name: tuple(value.shape) for name, value in inputs.items()})
        for tensor_spec in self.spec.outputs:
            out = torch.empty(shapes[tensor_spec.name], dtype=tensor_spec.torch_dtype(self.graph_dtype),
                              device=self.ort_device)
            binding.bind_output(tensor_spec.name, device_type, device_id, _NUMPY[out.dtype],
                                tuple(out.shape), out.data_ptr())
            outputs[tensor_spec.name] = out
        if device_type == "cuda":
            torch.cuda.current_stream(self.ort_device).synchronize()  # inputs written before ORT reads
        self.session.run_with_iobinding(binding)
        if device_type == "cuda":
            binding.synchronize_outputs()
        return outputs


def prepare_onnxruntime(components, *, engine_dir=None, providers=None):
    """Export (if needed) and run components' networks with onnxruntime.

    engine_dir: where the ONNX graphs and manifest.json live (created and filled when empty or stale).
    providers: onnxruntime execution providers, default CUDA (if available and the model is on CUDA)
    then CPU. Export traces the loaded modules where they are, in their dtype.
    """
    from export.onnx import DTYPES, dtype_name, ensure_onnx, specs_of

    if engine_dir is None:
        raise ValueError("backend='onnxruntime' needs engine_dir=<directory for the exported graphs>")
    parameter = next(components.unet.parameters())
    device, dtype = parameter.device, parameter.dtype
    if dtype not in DTYPES.values():
        raise ValueError(f"the onnxruntime backend runs fp32 or fp16 graphs; the model was loaded as {dtype}")
    paths = ensure_onnx(engine_dir, components.source, dtype=dtype_name(dtype), components=components)
    specs = specs_of(components)
    return replace_networks(components, lambda name: OrtNetwork(paths[name], specs[name], device, dtype,
                                                                 dtype, providers))
