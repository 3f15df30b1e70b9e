"""The `onnxruntime` backend: the exported ONNX graphs run by onnxruntime behind the modules' call signatures.

    pipe = runtime.load(path, backend="onnxruntime", engine_dir="exports/sd15")

prepare() exports the networks into engine_dir on first use (or when the weights or dtype changed),
then replaces components.unet / .text_encoder / .vae with stand-ins that take and return torch
tensors exactly like our modules: unet(sample, timestep, context), text_encoder(ids),
vae.decode(z), vae.encode(x), vae.encode_moments(x), each with the original `.config`.
Tensors are handed to onnxruntime by pointer (IO binding), on the GPU with the CUDA execution
provider when onnxruntime-gpu is installed and the model is on CUDA, otherwise on the CPU.

LoRAs (runtime/backends/deployed.py): `set_initializers` builds a new session of the same graph file with
the changed initializers given from memory (`SessionOptions.add_initializer`, which uses the arrays in
place); nothing is exported again. Replaced initializers stay replaced until their weights are back at
the base (then the file's own are used again), so each swap builds from the file plus the current set.
Such a session runs at ORT_ENABLE_EXTENDED: at ORT_ENABLE_ALL, onnxruntime 1.32's CPU layout transformer
(NCHWc convolutions) reads the file's convolution weights, not the replaced ones (a LoRA'd UNet came out
with relative error 0.90 against torch; 1.3e-6 at EXTENDED). With no replacement, the default level.

Sessions never spin-wait (`session.intra_op.allow_spinning` 0): the pipeline runs torch (scheduler,
guidance) between ONNX calls in the same process, and onnxruntime's idle threads spinning for work took the
cores from torch's threads. On this 2-core CPU (tiny preset, `python -m runtime.bench`) spinning made every
row slower, not only this one (onnxruntime step 6.6-8.1 ms -> 4.7-5.9 ms, torch 14-18 -> 10.5-14 ms), and
widened the spreads (the torch row's p90 was 20-23 ms in three runs with spinning, 12-20 ms in four without).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from runtime.backends.deployed import DeployedNetwork, replace_networks

log = logging.getLogger("runtime")

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def _session_options():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see the module docstring
    return options


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
            log.warning(
                "onnxruntime has no CUDA execution provider (install onnxruntime-gpu): %s "
                "runs on the CPU and tensors are copied to and from the GPU",
                spec.name,
            )
        self.ort_device = torch.device("cuda", self.device.index or 0) if use_cuda else torch.device("cpu")
        self.path, self.providers = path, providers
        self.overrides: dict[str, object] = {}  # initializer name -> OrtValue (its array must outlive the session)
        self.session = ort.InferenceSession(str(path), sess_options=_session_options(), providers=providers)
        from export.weight_map import read_weight_map

        self.weight_map = read_weight_map(path)
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if names != (spec.input_names, spec.output_names):
            from export.manifest import ArtifactError

            raise ArtifactError(
                f"{path}: graph inputs/outputs {names} are not those of {spec.name} "
                f"{(spec.input_names, spec.output_names)}"
            )

    def set_initializers(self, arrays: dict, restored=()) -> None:
        import onnxruntime as ort

        overrides = {name: value for name, value in self.overrides.items() if name not in restored}
        for name, array in arrays.items():
            if name not in restored:
                overrides[name] = ort.OrtValue.ortvalue_from_numpy(array)
        options = _session_options()
        if overrides:  # see the module docstring: ALL would ignore replaced convolution weights
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        for name, value in overrides.items():
            options.add_initializer(name, value)
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.providers)
        self.overrides = overrides

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device_type, device_id = self.ort_device.type, self.ort_device.index or 0
        binding = self.session.io_binding()
        keep = []  # the bound tensors must outlive the run
        for name, value in inputs.items():
            value = value.to(self.ort_device).contiguous()
            keep.append(value)
            binding.bind_input(name, device_type, device_id, _NUMPY[value.dtype], tuple(value.shape), value.data_ptr())
        outputs = {}
        shapes = self.spec.output_shapes({name: tuple(value.shape) for name, value in inputs.items()})
        for tensor_spec in self.spec.outputs:
            out = torch.empty(
                shapes[tensor_spec.name], dtype=tensor_spec.torch_dtype(self.graph_dtype), device=self.ort_device
            )
            binding.bind_output(
                tensor_spec.name, device_type, device_id, _NUMPY[out.dtype], tuple(out.shape), out.data_ptr()
            )
            outputs[tensor_spec.name] = out
        if device_type == "cuda":
            torch.cuda.current_stream(self.ort_device).synchronize()  # inputs written before ORT reads
        self.session.run_with_iobinding(binding)
        if device_type == "cuda":
            binding.synchronize_outputs()
        return outputs


def prepare_onnxruntime(components, *, engine_dir=None, providers=None, keep_weights: bool = True):
    """Export (if needed) and run components' networks with onnxruntime.

    engine_dir: where the ONNX graphs and manifest.json live (created and filled when empty or stale).
    providers: onnxruntime execution providers, default CUDA (if available and the model is on CUDA)
    then CPU. Export traces the loaded modules where they are, in their dtype.
    keep_weights: keep the torch text encoders and UNet (on the CPU) as the base LoRAs merge into.
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
    return replace_networks(
        components,
        lambda name: OrtNetwork(paths[name], specs[name], device, dtype, dtype, providers),
        keep_weights=keep_weights,
    )
