"""The census (benchmarks/census.py) counts what the real networks do, checked against facts derivable
by hand from the SD 1.5 / 2.1 architectures. No timing is asserted: modelled times are only reported."""

import json

import pytest

from benchmarks import census
from benchmarks.op_census import OpRecord


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
    assert len(norms) == 61 and sum(r.launches for r in norms) == 122  # stats + apply kernels
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
    assert len(_ops(vae, "sd_kernels.group_norm")) == 30
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
    rows = {r["network"]: r for r in payload["results"]}
    assert set(rows) == {"context_kv", "unet_step", "vae_decode", "text_encoder"}
    assert not rows["context_kv"]["graphed"]  # once per request, eagerly
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
