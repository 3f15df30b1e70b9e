"""The census (runtime/bench/census.py) counts what the real networks do, checked against facts derivable
by hand from the SD 1.5 / 2.1 / SDXL architectures. No timing is asserted: modelled times are only reported."""

import json
import math

import pytest
import torch

from runtime import bench
from runtime.bench import census
from runtime.bench.op_census import OpRecord


@pytest.fixture(scope="module")
def counted():
    """{(model, backend): {network: (records, graphed)}} for SD 1.5 and SD 2.1 on both our backends."""
    return {(m, b): census.count_networks(m, b) for m in ("sd15", "sd21") for b in ("torch", "triton")}


def _ops(records: list[OpRecord], *names: str) -> list[OpRecord]:
    return [r for r in records if r.op in names]


@pytest.mark.parametrize("model", ["sd15", "sd21"])
def test_unet_step_has_61_groupnorms_and_32_attentions(counted, model):
    # Per UNet forward: 22 resnets x 2 norms + 16 transformers x 1 norm + conv_norm_out = 61;
    # 16 transformer blocks x (self + cross) = 32 attentions. The guided step runs one batch-2 forward.
    torch_step, graphed = counted[model, "torch"]["unet_step"]
    assert not graphed
    assert len(_ops(torch_step, "aten.native_group_norm")) == 61
    assert len(_ops(torch_step, "sdpa")) == 32
    triton_step, graphed = counted[model, "triton"]["unet_step"]
    assert graphed
    norms = _ops(triton_step, "sd_kernels.group_norm")
    # Every GroupNorm is one launch: groups that fit the one-pass kernel read x once, the others take the
    # looped kernel (a group of at most LOOPED_MAX_GROUP_ELEMENTS, two sweeps) and read it twice. One-pass,
    # SD 1.5: 29 (8x8, 16x16 up to Cg 60, and 320 channels at 32x32); SD 2.1 at 96x96: the 12 of Cg 40 at
    # 12x12 (its 2560-channel concats there, Cg 80 over 144 positions, need 128 x 256 lanes: too many).
    one_pass = {"sd15": 29, "sd21": 12}[model]
    assert len(norms) == 61 and all(r.launches == 1 for r in norms)
    x_bytes = [2 * math.prod(int(d) for d in r.shapes.split()[0].split("x")) for r in norms]
    reads_twice = sum(r.bytes_read >= 2 * b for r, b in zip(norms, x_bytes))
    assert reads_twice == 61 - one_pass
    assert len(_ops(triton_step, "sd_kernels.attention")) == 32
    assert not _ops(triton_step, "aten.native_group_norm", "sdpa")


@pytest.mark.parametrize("model, side", [("sd15", 64), ("sd21", 96)])
def test_conv_in_flops_and_bytes(counted, model, side):
    # conv_in: 4 -> 320 channels, 3x3, on the guided batch of 2 latents: 2 FLOPs per multiply-add.
    records, _ = counted[model, "torch"]["unet_step"]
    conv_in = [r for r in records if r.op == "aten.convolution" and r.shapes.startswith(f"2x4x{side}x{side} ")]
    assert len(conv_in) == 1
    assert conv_in[0].flops == 2 * 2 * 320 * side * side * 4 * 9
    fp16 = 2
    assert conv_in[0].bytes_read == fp16 * (2 * 4 * side * side + 320 * 4 * 9)
    assert conv_in[0].bytes_written == fp16 * 2 * 320 * side * side
    # cuDNN adds the bias in a kernel of its own, reading and rewriting the output.
    bias_add = [r for r in records if r.op == "aten.convolution.bias_add" and r.shapes == conv_in[0].shapes]
    assert len(bias_add) == 1 and bias_add[0].bytes_written == conv_in[0].bytes_written


def test_sd15_attention_flops_and_step_total(counted):
    records, _ = counted["sd15", "triton"]["unet_step"]
    # The five 4096-token self-attentions at 8 heads of 40: q k^T and p v, 2 * 2 * 8 * 4096^2 * 40 each.
    self_attention = [r for r in _ops(records, "sd_kernels.attention") if r.shapes.count("2x8x4096x40") == 3]
    assert len(self_attention) == 5
    assert all(r.flops == 2 * 2 * 2 * 8 * 4096 * 4096 * 40 for r in self_attention)
    # The cross-attention K/V of the 16 transformer blocks, once per request: one GEMM of the guided batch's
    # 2 x 77 tokens x 768 against 2 x (5 x 320 + 5 x 640 + 6 x 1280) = 24960 stacked output rows.
    (projection,), _ = counted["sd15", "triton"]["context_kv"]
    assert projection.launches == 1 and projection.flops == 2 * 2 * 77 * 768 * 24960
    # DESIGN.md: 803 GFLOP per sample per UNet forward, 1.61 TFLOP per guided step; the step now leaves the
    # K/V to the per-request row (the two together are one full forward).
    assert (sum(r.flops for r in records) + projection.flops) / 1e12 == pytest.approx(1.607, abs=0.005)
    # Both backends do the same matrix work; the kernels only change bytes and launches.
    torch_records, _ = counted["sd15", "torch"]["unet_step"]
    assert sum(r.flops for r in torch_records) == sum(r.flops for r in records)


def test_sd15_vae_decode_and_text_encoder(counted):
    vae, _ = counted["sd15", "triton"]["vae_decode"]
    # Decoder: mid block (2 resnets + attention norm) 5, four up blocks x 3 resnets x 2 = 24, conv_norm_out 1.
    # Each one launch at 512x512 (the looped kernel up to the 256-channel norm at 512x512, Cg 8 x 512^2).
    assert len(_ops(vae, "sd_kernels.group_norm")) == 30 and all(r.launches == 1 for r in vae if "group_norm" in r.op)
    text, _ = counted["sd15", "torch"]["text_encoder"]
    # CLIP ViT-L: 12 layers, each one causal attention and two LayerNorms, plus the final LayerNorm.
    assert len(_ops(text, "sdpa")) == 12
    assert len(_ops(text, "aten.native_layer_norm")) == 25


def test_main_writes_json_with_modelled_rows(tmp_path, capsys):
    out = tmp_path / "census.json"
    assert (
        census.main(["--models", "sd15", "--backends", "triton", "--top", "sd15/triton/unet_step", "--json", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "modelled" in printed.splitlines()[0] and "top 15 ops by modelled time" in printed
    payload = json.loads(out.read_text())
    assert payload["modelled"] is True and payload["target"]["name"] == "H200"
    assert payload["schema"] == "sd-runtime.bench/1" and payload["benchmark"] == "runtime.bench census"
    rows = {r["network"]: r for r in payload["rows"]}
    assert set(rows) == {"context_kv", "unet_step", "vae_decode", "text_encoder"}
    assert not rows["context_kv"]["graphed"]  # once per request, eagerly
    assert rows["vae_decode"]["graphed"] and rows["text_encoder"]["graphed"]  # runtime/graph_calls.py
    step = rows["unet_step"]
    assert step["graphed"] and step["launches"] == sum(c["launches"] for c in step["by_category"].values())
    assert step["modelled_ms"] == pytest.approx(step["modelled_roofline_ms"] + step["modelled_launch_ms"])
    assert len(payload["top_ops"]["sd15/triton/unet_step"]) == census.TOP_OPS


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "sd9"], "--models: unknown ['sd9']"),
        (["--backends", "tensorrt"], "--backends: unknown ['tensorrt']"),
        (["--models", "sd15", "--backends", "torch", "--top", "sd15/triton/unet_step"], "--top:"),
    ],
)
def test_bad_arguments_are_usage_errors_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        census.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_diffusers_unet_does_the_same_matrix_work(counted):
    pytest.importorskip("diffusers")
    ((records, graphed),) = census.count_networks("sd15", "diffusers").values()
    assert not graphed
    assert len(_ops(records, "aten.native_group_norm")) == 61 and len(_ops(records, "sdpa")) == 32
    ours, _ = counted["sd15", "torch"]["unet_step"]
    (projection,), _ = counted["sd15", "torch"]["context_kv"]
    assert sum(r.flops for r in records) == sum(r.flops for r in ours) + projection.flops
    # Per step, ours runs 32 + 21 GEMMs fewer: to_k and to_v of the 16 cross-attentions moved to the request,
    # and the 22 resnets' time projections run as one GEMM (runtime/models/time_projection.py).
    gemms = ("aten.mm", "aten.addmm", "aten.bmm")
    assert len(_ops(records, *gemms)) - len(_ops(ours, *gemms)) == 32 + 21


@pytest.mark.parametrize(
    "shape, launches, reads",
    # One-pass kernel; looped kernel (one launch, x read twice); split stats + apply kernels (a group
    # of Cg 4 x 1024^2, past LOOPED_MAX_GROUP_ELEMENTS: the SDXL VAE's last level).
    [((2, 1280, 16, 16), 1, 1), ((2, 320, 64, 64), 1, 2), ((1, 128, 1024, 1024), 2, 2)],
    ids=["one-pass", "looped", "split"],
)
@pytest.mark.parametrize("use_out", [False, True], ids=["functional", "out"])
def test_group_norm_cost_follows_the_launchers_plan_and_counts_the_shift(shape, launches, reads, use_out):
    from kernels.group_norm import group_norm
    from runtime.bench.op_census import count_ops

    def call():
        x = torch.empty(shape, device="meta", dtype=torch.float16).to(memory_format=torch.channels_last)
        weight = bias = torch.empty(shape[1], device="meta", dtype=torch.float16)
        shift = torch.empty(1, shape[1], device="meta", dtype=torch.float16).expand(shape[0], -1)  # stride-0 batch
        out = torch.empty_like(x) if use_out else None
        group_norm(x, 32, weight, bias, activation="silu", out=out, shift=shift)

    records = [r for r in count_ops(call) if r.op.startswith("sd_kernels.group_norm")]
    (record,) = records
    x_bytes, channel_bytes = 2 * math.prod(shape), 2 * shape[1]
    assert record.launches == launches
    assert record.bytes_read == reads * x_bytes + 3 * channel_bytes  # weight, bias and the broadcast shift
    assert record.bytes_written == x_bytes


def test_fused_linear_costs_read_each_input_once_and_write_only_the_output():
    from kernels.fused_linear import linear_bias_residual, linear_geglu
    from runtime.bench.op_census import count_ops

    def call():
        empty = lambda *shape: torch.empty(shape, device="meta", dtype=torch.float16)  # noqa: E731
        linear_geglu(empty(2, 4096, 320), empty(2560, 320), empty(2560))
        linear_bias_residual(empty(2, 4096, 1280), empty(320, 1280), empty(320), empty(2, 4096, 320))

    geglu, residual = [r for r in count_ops(call) if r.op.startswith("sd_kernels.linear")]
    tokens = 2 * 4096
    assert (geglu.op, geglu.category, geglu.launches) == ("sd_kernels.linear_geglu", "gemm", 1)
    assert geglu.flops == 2 * tokens * 2560 * 320
    assert geglu.bytes_read == 2 * (tokens * 320 + 2560 * 320 + 2560)
    assert geglu.bytes_written == 2 * tokens * 1280  # the inner width only: the 2x projection never leaves
    assert residual.flops == 2 * tokens * 320 * 1280 and residual.launches == 1
    assert residual.bytes_read == 2 * (tokens * 1280 + 320 * 1280 + 320 + tokens * 320)
    assert residual.bytes_written == 2 * tokens * 320


def test_bench_census_subcommand_and_its_one_line_errors(tmp_path, capsys):
    out = tmp_path / "census.json"
    assert bench.main(["census", "--models", "sd15", "--backends", "torch", "--top", "none", "--json", str(out)]) == 0
    assert "modelled" in capsys.readouterr().out.splitlines()[0]
    assert {r["network"] for r in json.loads(out.read_text())["rows"]} >= {"unet_step", "vae_decode"}
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["census", "--target", "a100"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --target: invalid choice") and err.count("\n") == 1


# ----------------------------------------------------------------------------- SDXL at 1024²


@pytest.fixture(scope="module")
def sdxl():
    """SDXL's networks on our torch backend, and the triton backend's guided step."""
    request = census.Request.of_model("sdxl")
    return census.count_request(request, "torch"), census.count_request(request, "triton", ("unet_step",))


def test_sdxl_step_has_46_groupnorms_and_140_attentions(sdxl):
    ours, triton = sdxl
    records, graphed = ours["unet_step"]
    # 17 resnets (2 + 2 + 2 down, 2 mid, 3 x 3 up) x 2 norms + 11 transformers x 1 + conv_norm_out = 46;
    # transformer depths 2 at 640 and 10 at 1280: 2x2 + 2x10 down, 10 mid, 3x10 + 3x2 up = 70 blocks.
    assert not graphed
    assert len(_ops(records, "aten.native_group_norm")) == 46
    assert len(_ops(records, "sdpa")) == 140
    assert len(_ops(records, "aten.native_layer_norm")) == 3 * 70
    # Self-attention at 640 channels (64x64 = 4096 tokens of the 128² latent, 10 heads of 64): 2 transformers
    # of depth 2 down, 3 up; the first level (320) has none.
    self_attention = [r for r in _ops(records, "sdpa") if r.shapes.count("2x10x4096x64") == 3]
    assert len(self_attention) == 2 * 2 + 3 * 2
    assert all(r.flops == 2 * 2 * 10 * 4096 * 4096 * (64 + 64) for r in self_attention)
    triton_records, triton_graphed = triton["unet_step"]
    assert triton_graphed and len(_ops(triton_records, "sd_kernels.group_norm")) == 46
    assert sum(r.flops for r in triton_records) == sum(r.flops for r in records)


def test_sdxl_step_reads_the_added_conditioning(sdxl):
    records, _ = sdxl[0]["unet_step"]
    # add_embedding.linear_1: [text_embeds (1280); 6 time ids x 256 sinusoids] = 2816 -> 1280, guided batch 2.
    (linear,) = [r for r in _ops(records, "aten.addmm") if "2x2816" in r.shapes]
    assert linear.flops == 2 * 2 * 2816 * 1280


def test_sdxl_text_encoders_and_fp32_vae_decode(sdxl):
    ours, _ = sdxl
    # CLIP-L (12 layers) and OpenCLIP bigG (32 layers), each run in full on the guided [uncond; cond] ids.
    assert len(_ops(ours["text_encoder"][0], "sdpa")) == 12
    assert len(_ops(ours["text_encoder_2"][0], "sdpa")) == 32
    projection = [r for r in ours["text_encoder_2"][0] if r.op == "aten.mm" and r.shapes == "2x1280 1280x1280"]
    assert len(projection) == 1  # text_projection of the pooled token (no bias)
    # The pipeline upcasts SDXL's VAE (force_upcast): the decoder's conv_in reads fp32 latents at 128².
    vae, _ = ours["vae_decode"]
    (conv_in,) = [r for r in _ops(vae, "aten.convolution") if r.shapes.startswith("1x4x128x128 512x4x3x3")]
    assert conv_in.bytes_read == 4 * (4 * 128 * 128 + 512 * 4 * 9)
    request = census.Request.of_model("sdxl")
    assert census.network_dtype(request, "vae_decode") == "fp32"
    assert census.network_dtype(request, "unet_step") == "fp16"


def test_sdxl_diffusers_unet_does_the_same_matrix_work(sdxl):
    pytest.importorskip("diffusers")
    ((records, _),) = census.count_request(census.Request.of_model("sdxl"), "diffusers").values()
    assert len(_ops(records, "aten.native_group_norm")) == 46 and len(_ops(records, "sdpa")) == 140
    ours, _ = sdxl
    (projection,), _ = ours["context_kv"]
    assert sum(r.flops for r in records) == sum(r.flops for r in ours["unet_step"][0]) + projection.flops
