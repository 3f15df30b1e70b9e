"""The `tensorrt` backend: TensorRT 10 engines run from static device buffers under CUDA graphs.

    pipe = runtime.load(path, backend="tensorrt", device="cuda", dtype="fp16", engine_dir="engines/sd15")

prepare() builds (or reuses) one engine per network in engine_dir via export.tensorrt.ensure_engines,
checks each engine's metadata (TensorRT version, GPU, ONNX hash) before loading it, and replaces
components.unet / .text_encoder / .vae with the same stand-ins as the onnxruntime backend. A call
with new input shapes is checked against the engine's profile, then gets its own static input and
output buffers and one captured CUDA graph of execute_async_v3; later calls with those shapes copy
inputs in, replay the graph, and return copies of the outputs. The UNet's profile covers contexts of 1 to 3
prompt chunks (77 .. 231 tokens, export/specs.py); a longer prompt is refused at its first UNet call, the
message naming its chunks and the engine's limit.

LoRAs need refittable engines (refittable=True): `set_initializers` refits the engine with the merged
weights through trt.Refitter (export/tensorrt.py's refit_engine), no rebuild. The captured graphs are
dropped after a refit and captured again on the next call, since TensorRT does not promise that a refit
keeps weights at the addresses a graph recorded.

Never executed so far: no machine this was developed on has TensorRT (see export/tensorrt.py).
"""

from __future__ import annotations

import torch

from runtime.backends.deployed import DeployedNetwork, replace_networks


class TensorRTNetwork(DeployedNetwork):
    def __init__(self, plan_path, spec, device, dtype, onnx_sha256, onnx_path=None):
        from export.tensorrt import import_tensorrt, load_engine
        from export.weight_map import read_weight_map

        trt = import_tensorrt()
        self.engine, self.meta = load_engine(plan_path, onnx_sha256=onnx_sha256)
        self.plan_path = plan_path
        # Engines are built from fp32 graphs: their inputs and outputs stay fp32 whatever the precision.
        super().__init__(spec, device, dtype, torch.float32)
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self.device)
        self.tensor_dtypes = {
            name: _torch_dtype(trt, self.engine.get_tensor_dtype(name)) for name in spec.input_names + spec.output_names
        }
        self.graphs: dict[tuple, tuple] = {}
        # The engine's weights carry the ONNX initializers' names (TensorRT's ONNX parser keeps them).
        self.weight_map = read_weight_map(onnx_path) if onnx_path is not None else {}

    def check_weights(self, keys) -> None:
        if not self.meta.get("refittable"):
            raise ValueError(
                f"{self.plan_path} is not refittable, so a LoRA cannot change its weights: build the engines "
                f"with refittable=True (python -m export tensorrt --refittable)"
            )
        super().check_weights(keys)

    def set_initializers(self, arrays: dict, restored=()) -> None:
        from export.tensorrt import refit_engine

        torch.cuda.current_stream(self.device).synchronize()  # no run may read weights mid-refit
        self.stream.synchronize()
        refit_engine(self.engine, arrays, self.plan_path)
        self.graphs.clear()

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from export.tensorrt import check_shapes_in_profile

        shapes = {name: tuple(value.shape) for name, value in inputs.items()}
        key = tuple(sorted(shapes.items()))
        if key not in self.graphs:
            self.spec.bind(shapes)  # the spec's own errors first (a context of whole chunks), then the profile's
            check_shapes_in_profile(self.meta, shapes, self.plan_path)
            self.graphs[key] = self._capture(shapes)
        graph, static_inputs, static_outputs = self.graphs[key]
        # The caller's stream, taken before switching: inside the block it would be self.stream.
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the inputs are written on the caller's stream
        with torch.cuda.stream(self.stream):
            for name, value in inputs.items():
                static_inputs[name].copy_(value, non_blocking=True)
            graph.replay()
            outputs = {name: value.clone() for name, value in static_outputs.items()}
        caller.wait_stream(self.stream)
        return outputs

    def _capture(self, shapes: dict[str, tuple]):
        static_inputs = {
            name: torch.empty(shape, dtype=self.tensor_dtypes[name], device=self.device)
            for name, shape in shapes.items()
        }
        static_outputs = {
            name: torch.empty(shape, dtype=self.tensor_dtypes[name], device=self.device)
            for name, shape in self.spec.output_shapes(shapes).items()
        }
        for name, tensor in {**static_inputs, **static_outputs}.items():
            if name in static_inputs:
                self.context.set_input_shape(name, tensor.shape)
            self.context.set_tensor_address(name, tensor.data_ptr())
        # One eager run first: TensorRT finishes shape-dependent setup outside the capture.
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.plan_path} for shapes {shapes}")
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self.context.execute_async_v3(self.stream.cuda_stream)
        return graph, static_inputs, static_outputs


def _torch_dtype(trt, trt_dtype) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
    }
    return table[trt_dtype]


def prepare_tensorrt(
    components,
    *,
    engine_dir=None,
    profile=None,
    precision: str = "fp16",
    refittable: bool = False,
    keep_weights: bool = True,
):
    """Build (or reuse) engines in engine_dir and run components' networks with them.

    profile: export.specs.ShapeProfile (default 256-1024 px, batch 1-4); precision: fp16, bf16, fp32.
    refittable: engines whose weights LoRAs can change (load_lora); keep_weights: keep the torch text
    encoders and UNet on the CPU as the LoRAs' base (runtime/backends/deployed.py).
    """
    from export.manifest import Manifest
    from export.onnx import specs_of
    from export.tensorrt import EngineOptions, ensure_engines

    if engine_dir is None:
        raise ValueError("backend='tensorrt' needs engine_dir=<directory for the engines>")
    device = next(components.unet.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"the tensorrt backend runs on CUDA; load the model with device='cuda' (got {device})")
    dtype = next(components.unet.parameters()).dtype
    plans = ensure_engines(
        engine_dir,
        components.source,
        profile=profile,
        options=EngineOptions(precision=precision, refittable=refittable),
    )
    manifest = Manifest.open(engine_dir)
    specs = specs_of(components)

    def make(name):
        onnx_sha = manifest.verify(f"{name}.onnx")["files"][f"{name}.onnx"]["sha256"]
        manifest.verify(f"{name}.plan")
        return TensorRTNetwork(plans[name], specs[name], device, dtype, onnx_sha, manifest.out_dir / f"{name}.onnx")

    return replace_networks(components, make, keep_weights=keep_weights)
