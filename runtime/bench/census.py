"""python -m runtime.bench census: what one request costs on a GPU, counted on the CPU (every figure modelled).

For each model of MODELS at its native size, and each backend (torch: our eager modules; triton: our
kernels substituted, channels_last; diffusers: its UNet, when importable), the networks run once on
meta tensors (runtime/bench/op_census.py): the guided UNet step (UNet on [uncond; cond] and the guidance
combine; SDXL's with its added conditioning, text_embeds and time_ids), the VAE decode and the text
encoder(s), in fp16 (an SDXL VAE in fp32: the pipeline upcasts it, as its config's force_upcast says). Our
UNets take the cross-attention K/V projected once per request, as the pipeline runs them: that projection
is a row of its own (`context_kv`, once per request, not per step), and the step row no longer holds it.
Per network it prints launches, GB moved, TFLOP and a roofline time on a named target: per op
max(FLOPs / matrix peak, bytes / bandwidth), plus a cost per launch (a graph node's gap where the network
replays from a CUDA graph, an eager launch elsewhere), then the top 15 ops by modelled time. Runs in
seconds; nothing here is a measurement. `python -m runtime.bench` puts the modelled step time beside the
measured one (`modelled_step`).
"""

from __future__ import annotations

import pathlib
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch

from runtime import default_configs
from runtime.bench.op_census import DEVICE, OpRecord, count_ops
from runtime.bench.results import write_result
from runtime.one_line_parser import OneLineParser

DTYPE = torch.float16
GUIDANCE = 7.5
TOP_OPS = 15
TEXT_TOKENS = 77
# Hopper's TF32 tensor-core rate is half its fp16 rate; cuDNN convolutions run fp32 in TF32 by default
# (torch.backends.cudnn.allow_tf32), which is what an upcast VAE decode is made of.
FP32_MATRIX_SHARE = 0.5


@dataclass(frozen=True)
class Target:
    """A GPU to model: the rates a roofline divides by, and what a launch costs."""

    name: str
    matrix_tflops: float  # dense fp16/bf16 tensor-core rate, TFLOP/s
    bandwidth_tbs: float  # DRAM copy bandwidth, TB/s
    graph_node_us: float  # gap between nodes of a replayed CUDA graph, µs
    eager_launch_us: float  # one eagerly launched op (dispatch + cudaLaunchKernel), µs
    source: str


# One row per target; the figures and where each comes from.
TARGETS = {
    "h200": Target(
        "H200",
        790.0,
        4.3,
        1.0,
        5.0,
        "matrix rate and copy bandwidth as measured on the lent H200 (issue 15, DESIGN.md); graph-node gap "
        "from issue 15's reading (~0.8 ms of gaps over ~780 graph nodes); eager launch: an assumption "
        "(PyTorch dispatch plus cudaLaunchKernel, 4-10 µs on a fast host)",
    ),
    "h100": Target(
        "H100 SXM",
        790.0,
        3.0,
        1.0,
        5.0,
        "NVIDIA H100 SXM datasheet: 989 TFLOP/s dense fp16, 3.35 TB/s HBM3; scaled by what the H200 "
        "(same GH100 tensor cores and clocks, 989 TFLOP/s and 4.8 TB/s on its datasheet) reached: "
        "790/989 of the matrix rate and 4.3/4.8 of the bandwidth; launch costs as the H200's",
    ),
}


def target_for_device(device_name: str) -> str | None:
    """The census target a GPU's name (torch.cuda.get_device_name) is modelled by, or None."""
    name = device_name.upper()
    return next((key for key in TARGETS if key.upper() in name), None)


@dataclass(frozen=True)
class Model:
    """A model of the census at its native resolution."""

    kind: str  # runtime.default_configs kind
    width: int
    height: int


# Adding a model is a line.
MODELS = {
    "sd15": Model("sd1", 512, 512),
    "sd21": Model("sd2", 768, 768),
    "sdxl": Model("sdxl", 1024, 1024),
}
# backend -> the networks the census runs on it (diffusers: its UNet, the baseline row); a model without
# a network (SD's text_encoder_2) leaves it out.
NETWORKS = {
    "torch": ("context_kv", "unet_step", "vae_decode", "text_encoder", "text_encoder_2"),
    "triton": ("context_kv", "unet_step", "vae_decode", "text_encoder", "text_encoder_2"),
    "diffusers": ("unet_step",),
}
BACKENDS = tuple(NETWORKS)


@dataclass(frozen=True)
class Request:
    """What one census run models: an architecture's configs (runtime.default_configs' layout: raw config
    dicts per component) at a size, with the batch and guidance the pipeline would run."""

    configs: dict
    width: int
    height: int
    batch: int = 1
    guided: bool = True

    @classmethod
    def of_model(cls, model_name: str) -> Request:
        model = MODELS[model_name]
        return cls(default_configs.default_configs(model.kind), model.width, model.height)

    @property
    def rows(self) -> int:
        """The UNet's batch: [uncond; cond] when guided."""
        return self.batch * (2 if self.guided else 1)

    @property
    def upcast_vae(self) -> bool:
        # As Pipeline._vae_precision: an SDXL pipeline (two text encoders) runs an fp16 VAE in fp32.
        return "text_encoder_2" in self.configs and bool(self.configs["vae"].get("force_upcast", False))


def network_names(request: Request, backend: str) -> tuple[str, ...]:
    return tuple(n for n in NETWORKS[backend] if n != "text_encoder_2" or "text_encoder_2" in request.configs)


# ----------------------------------------------------------------------------- networks


def _build_ours(request: Request, backend: str):
    from runtime.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from runtime.models.unet import UNet, UNetConfig
    from runtime.models.vae import AutoencoderKL, VAEConfig

    configs = request.configs
    vae_dtype = torch.float32 if request.upcast_vae else DTYPE
    with torch.device(DEVICE):
        components = SimpleNamespace(
            unet=UNet(UNetConfig.from_dict(configs["unet"])).eval().to(DTYPE),
            vae=AutoencoderKL(VAEConfig.from_dict(configs["vae"])).eval().to(vae_dtype),
            text_encoder=None,
            text_encoder_2=None,
        )
        if "text_encoder" in configs:
            config = CLIPTextConfig.from_dict(configs["text_encoder"])
            components.text_encoder = CLIPTextModel(config).eval().to(DTYPE)
        if "text_encoder_2" in configs:
            config = CLIPTextConfig.from_dict(configs["text_encoder_2"])
            components.text_encoder_2 = CLIPTextModelWithProjection(config).eval().to(DTYPE)
    if backend == "triton":
        from runtime.backends.triton_backend import prepare_triton

        components = prepare_triton(components)
    return components


def _step_inputs(request: Request) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Latents [batch, ..], the guided context [rows, 77, C] and SDXL's added conditioning, on meta."""
    unet, vae = request.configs["unet"], request.configs["vae"]
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    latent = (request.batch, unet["in_channels"], request.height // factor, request.width // factor)
    latents = torch.randn(latent, device=DEVICE, dtype=DTYPE)
    context = torch.randn(request.rows, TEXT_TOKENS, unet["cross_attention_dim"], device=DEVICE, dtype=DTYPE)
    added = {}
    if unet.get("addition_embed_type") == "text_time":
        # text_embeds: encoder 2's pooled projection; time_ids: the rest of the add_embedding's input.
        pooled = request.configs["text_encoder_2"]["projection_dim"]
        ids = (unet["projection_class_embeddings_input_dim"] - pooled) // unet["addition_time_embed_dim"]
        added = {
            "text_embeds": torch.randn(request.rows, pooled, device=DEVICE, dtype=DTYPE),
            "time_ids": torch.randn(request.rows, ids, device=DEVICE, dtype=DTYPE),
        }
    return latents, context, added


def _denoise_step(unet: Callable, latents: torch.Tensor, context: torch.Tensor, guided: bool, **added):
    """The UNet's share of a denoising step (pipeline.denoise_step without the sampler)."""
    t = torch.tensor(500.0, device=DEVICE)
    if not guided:
        return unet(latents, t, context, **added)
    uncond, cond = unet(torch.cat([latents, latents]), t, context, **added).chunk(2)
    return uncond + GUIDANCE * (cond - uncond)


def _networks_ours(request: Request, backend: str) -> dict[str, tuple[Callable, bool]]:
    """network -> (a zero-argument run on meta tensors, whether it replays from a CUDA graph)."""
    c = _build_ours(request, backend)
    latents, context, added = _step_inputs(request)
    ids = torch.zeros(request.rows, TEXT_TOKENS, dtype=torch.int64, device=DEVICE)
    vae_dtype = torch.float32 if request.upcast_vae else DTYPE
    # As the pipeline does once per request; the first call also stacks the K/V weights (once per model).
    context_kv = c.unet.project_context(context)
    # SDXL conditions on both encoders' penultimate states (runtime/conditioning.py); SD on the last.
    sdxl = c.text_encoder_2 is not None
    networks = {
        "context_kv": (lambda: c.unet.project_context(context), False),
        # The pipeline replays the triton backend's denoising steps from CUDA graphs (runtime/graphs.py),
        # and its text encoder(s) and VAE decode too (runtime/graph_calls.py).
        "unet_step": (
            lambda: _denoise_step(c.unet, latents, context, request.guided, context_kv=context_kv, **added),
            backend == "triton",
        ),
        "vae_decode": (lambda: c.vae.decode(latents.to(vae_dtype)), backend == "triton"),
    }
    if c.text_encoder is not None:
        encode = c.text_encoder.penultimate_and_pooled if sdxl else c.text_encoder
        networks["text_encoder"] = (lambda: encode(ids), backend == "triton")
    if sdxl:
        networks["text_encoder_2"] = (lambda: c.text_encoder_2.penultimate_and_pooled(ids), backend == "triton")
    return networks


def _networks_diffusers(request: Request) -> dict[str, tuple[Callable, bool]]:
    from diffusers import UNet2DConditionModel

    with torch.device(DEVICE):
        unet = UNet2DConditionModel.from_config(request.configs["unet"]).eval().to(DTYPE)
    latents, context, added = _step_inputs(request)
    kwargs = {"added_cond_kwargs": added} if added else {}

    def run(*args):
        return unet(*args, **kwargs, return_dict=False)[0]

    return {"unet_step": (lambda: _denoise_step(run, latents, context, request.guided), False)}


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- the model of time


def matrix_tflops(target: Target, dtype: str) -> float:
    return target.matrix_tflops * (FP32_MATRIX_SHARE if dtype == "fp32" else 1.0)


def op_seconds(record: OpRecord, target: Target, dtype: str = "fp16") -> float:
    """Roofline time of one op: bound by its matrix FLOPs or by its bytes, whichever is slower."""
    return max(
        record.flops / (matrix_tflops(target, dtype) * 1e12),
        (record.bytes_read + record.bytes_written) / (target.bandwidth_tbs * 1e12),
    )


def summarize(records: list[OpRecord], graphed: bool, target: Target, dtype: str = "fp16") -> dict:
    launches = sum(r.launches for r in records)
    roofline = sum(op_seconds(r, target, dtype) for r in records)
    per_launch_us = target.graph_node_us if graphed else target.eager_launch_us
    by_category = defaultdict(lambda: {"launches": 0, "tflop": 0.0, "gb": 0.0})
    for r in records:
        row = by_category[r.category]
        row["launches"] += r.launches
        row["tflop"] += r.flops / 1e12
        row["gb"] += (r.bytes_read + r.bytes_written) / 1e9
    return {
        "ops": len(records),
        "launches": launches,
        "gb_moved": sum(r.bytes_read + r.bytes_written for r in records) / 1e9,
        "tflop": sum(r.flops for r in records) / 1e12,
        "graphed": graphed,
        "modelled_roofline_ms": roofline * 1e3,
        "modelled_launch_ms": launches * per_launch_us * 1e-3,
        "modelled_ms": roofline * 1e3 + launches * per_launch_us * 1e-3,
        "by_category": dict(sorted(by_category.items())),
    }


def top_ops(records: list[OpRecord], target: Target, dtype: str = "fp16", n: int = TOP_OPS) -> list[dict]:
    """Identical ops (same op, same input shapes) grouped, slowest groups first."""
    groups: dict[tuple[str, str], dict] = {}
    for r in records:
        g = groups.setdefault(
            (r.op, r.shapes),
            {"op": r.op, "shapes": r.shapes, "count": 0, "launches": 0, "gflop": 0.0, "gb": 0.0, "modelled_ms": 0.0},
        )
        g["count"] += 1
        g["launches"] += r.launches
        g["gflop"] += r.flops / 1e9
        g["gb"] += (r.bytes_read + r.bytes_written) / 1e9
        g["modelled_ms"] += op_seconds(r, target, dtype) * 1e3
    return sorted(groups.values(), key=lambda g: -g["modelled_ms"])[:n]


# ----------------------------------------------------------------------------- running it


def network_dtype(request: Request, network: str) -> str:
    return "fp32" if network == "vae_decode" and request.upcast_vae else "fp16"


def count_request(
    request: Request, backend: str, networks: tuple[str, ...] | None = None
) -> dict[str, tuple[list[OpRecord], bool]]:
    """network -> (the ops one run launches, whether it replays from a CUDA graph), for `networks`
    (default: all of the backend's)."""
    runs = _networks_diffusers(request) if backend == "diffusers" else _networks_ours(request, backend)
    wanted = network_names(request, backend) if networks is None else networks
    return {network: (count_ops(run), graphed) for network, (run, graphed) in runs.items() if network in wanted}


def count_networks(model_name: str, backend: str) -> dict[str, tuple[list[OpRecord], bool]]:
    """count_request for a model of MODELS at its native size, guided, batch 1."""
    return count_request(Request.of_model(model_name), backend)


def modelled_step(request: Request, backend: str, target: Target) -> dict:
    """The census's unet_step row for `request` on `backend`: what runtime.bench sets beside a measured step."""
    ((records, graphed),) = count_request(request, backend, ("unet_step",)).values()
    return summarize(records, graphed, target)


def census(models: list[str], backends: list[str], target: Target) -> tuple[list[dict], dict]:
    """(one row per model x backend x network, {"model/backend/network": top ops})."""
    rows, tops = [], {}
    for model_name in models:
        model = MODELS[model_name]
        request = Request.of_model(model_name)
        for backend in backends:
            for network, (records, graphed) in count_request(request, backend).items():
                dtype = network_dtype(request, network)
                rows.append(
                    {
                        "model": model_name,
                        "backend": backend,
                        "network": network,
                        "width": model.width,
                        "height": model.height,
                        "dtype": dtype,
                        "target": target.name,
                        **summarize(records, graphed, target, dtype),
                    }
                )
                tops[f"{model_name}/{backend}/{network}"] = top_ops(records, target, dtype)
    return rows, tops


def format_rows(rows: list[dict]) -> str:
    header = (
        f"{'model':6} {'backend':9} {'network':14} {'dtype':5} {'launches':>8} {'GB moved':>9} {'TFLOP':>7} "
        f"{'roofline ms':>11} {'launch ms':>9} {'total ms':>9}  graphed"
    )
    lines = ["modelled per run:", header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['model']:6} {r['backend']:9} {r['network']:14} {r['dtype']:5} {r['launches']:8d} "
            f"{r['gb_moved']:9.3f} {r['tflop']:7.3f} {r['modelled_roofline_ms']:11.3f} "
            f"{r['modelled_launch_ms']:9.3f} {r['modelled_ms']:9.3f}  {'yes' if r['graphed'] else 'no'}"
        )
    return "\n".join(lines)


def format_top(key: str, ops: list[dict]) -> str:
    lines = [
        f"top {len(ops)} ops by modelled time, {key} (all figures modelled):",
        f"  {'modelled ms':>11} {'count':>5} {'GFLOP':>8} {'GB':>7}  op  [input shapes]",
    ]
    for g in ops:
        lines.append(
            f"  {g['modelled_ms']:11.4f} {g['count']:5d} {g['gflop']:8.2f} {g['gb']:7.3f}  {g['op']}  [{g['shapes']}]"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    p = OneLineParser(prog="python -m runtime.bench census", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="sd15,sd21", help=f"comma-separated, from {sorted(MODELS)} (default sd15,sd21)")
    p.add_argument(
        "--backends",
        default=None,
        help=f"comma-separated, from {list(BACKENDS)} (default: all; diffusers only if importable)",
    )
    p.add_argument(
        "--target",
        default="h200",
        choices=sorted(TARGETS),
        help="GPU to model: " + "; ".join(f"{k}: {t.source}" for k, t in TARGETS.items()),
    )
    p.add_argument(
        "--top",
        default=None,
        help="which rows get a top-15 list: 'all', 'none', or model/backend/network keys, "
        "comma-separated (default: each model's unet_step)",
    )
    p.add_argument("--json", dest="json_path", help="write rows, top ops and targets here (the bench's schema)")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models: unknown {unknown or 'empty list'}; choose from {sorted(MODELS)}")
    if args.backends is None:
        args.backends = [b for b in BACKENDS if b != "diffusers" or diffusers_available()]
    else:
        args.backends = [b for b in args.backends.split(",") if b]
        unknown = [b for b in args.backends if b not in BACKENDS]
        if unknown or not args.backends:
            p.error(f"--backends: unknown {unknown or 'empty list'}; choose from {list(BACKENDS)}")
        if "diffusers" in args.backends and not diffusers_available():
            p.error("--backends: diffusers is not importable here")
    keys = [f"{m}/{b}/{n}" for m in args.models for b in args.backends for n in network_names(Request.of_model(m), b)]
    if args.top is None:
        args.top = [k for k in keys if k.endswith("/unet_step")]
    elif args.top in ("all", "none"):
        args.top = keys if args.top == "all" else []
    else:
        args.top = [k for k in args.top.split(",") if k]
        missing = [k for k in args.top if k not in keys]
        if missing:
            p.error(f"--top: {missing} not among this run's rows {keys}")
    if args.json_path is not None and pathlib.Path(args.json_path).is_dir():
        p.error(f"--json {args.json_path} is a folder; give a file path")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target = TARGETS[args.target]
    rows, tops = census(args.models, args.backends, target)
    print(
        f"census: every figure below is modelled (op counts on meta tensors), none measured. Target "
        f"{target.name}: {target.matrix_tflops:g} TFLOP/s, {target.bandwidth_tbs:g} TB/s, "
        f"{target.graph_node_us:g} µs per graph node, {target.eager_launch_us:g} µs per eager launch; fp16 "
        f"(fp32 rows at {FP32_MATRIX_SHARE:g}x the matrix rate)"
    )
    print(f"  (figures: {target.source})")
    print(format_rows(rows))
    for key in args.top:
        print()
        print(format_top(key, tops[key]))
    if args.json_path:
        config = {"models": args.models, "backends": args.backends, "dtype": "fp16", "guidance": GUIDANCE}
        write_result(
            args.json_path,
            "runtime.bench census",
            config,
            rows,
            modelled=True,
            target=asdict(target),
            targets={k: asdict(t) for k, t in TARGETS.items()},
            top_ops=tops,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
