"""runtime.bench's rows beside the census: the modelled step next to the measured one (runtime/bench/modelled.py),
and the diffusers-compile row's wiring. A real torch.compile of the tiny UNet took over 300 s on this shared
CPU, so the row's compile is replaced by a stand-in here; the stand-in proves the wiring (the compiled UNet
is the one the pipeline runs, its first step timed apart), not inductor."""

import contextlib
import io
import json
from types import SimpleNamespace

import pytest

from runtime import bench
from runtime.bench import baselines, census
from runtime.bench.cli import parse_args
from runtime.bench.measure import BenchConfig
from runtime.bench.modelled import beside, component_configs, modelled_steps
from runtime.bench.presets import write_random_model

pytest.importorskip("diffusers")


def _config(**overrides) -> BenchConfig:
    fields = {"preset": "tiny", "device": "cpu", "dtype": "fp32", "width": 32, "height": 48, "steps": 2}
    return BenchConfig(**{**fields, "step_iters": 20, **overrides})


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(write_random_model("tiny", tmp_path_factory.mktemp("tiny") / "model", weights=False))


def test_a_cpu_row_has_no_modelled_step_unless_a_target_is_named(tiny_folder):
    entries = modelled_steps(_config(), tiny_folder, ["torch", "onnxruntime"], None)
    assert "no census target for cpu" in entries["torch"]["reason"]
    assert "does not model the onnxruntime backend" in entries["onnxruntime"]["reason"]
    assert beside(entries["torch"], 12.0) == entries["torch"]  # a reason stays a reason, no ratio made up


def test_a_named_target_models_the_bench_request_with_the_cpu_caveat(tiny_folder):
    config = _config(batch=2)
    entries = modelled_steps(config, tiny_folder, ["torch", "diffusers", "diffusers-compile"], "h100")
    torch_entry = entries["torch"]
    assert torch_entry["target"] == "H100 SXM" and not torch_entry["graphed"]
    assert "measured on cpu, modelled for H100 SXM" in torch_entry["caveat"]
    assert "measured in fp32" in torch_entry["caveat"]
    # The census ran the bench's own request: the tiny UNet at 32x48, batch 2, guided (4 rows).
    request = census.Request(component_configs(tiny_folder), 32, 48, batch=2, guided=True)
    expected = census.modelled_step(request, "torch", census.TARGETS["h100"])
    assert torch_entry["modelled_ms"] == expected["modelled_ms"] and torch_entry["launches"] == expected["launches"]
    unguided = census.modelled_step(census.Request(request.configs, 32, 48, 2, False), "torch", census.TARGETS["h100"])
    assert unguided["gb_moved"] < expected["gb_moved"]  # half the UNet batch
    assert entries["diffusers"]["launches"] > 0 and "reason" in entries["diffusers-compile"]
    row = beside(torch_entry, 2 * torch_entry["modelled_ms"])
    assert row["measured_over_modelled"] == pytest.approx(2.0) and row["measured_ms"] == 2 * torch_entry["modelled_ms"]


def test_single_file_models_say_why_they_are_not_modelled(tmp_path):
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    (entry,) = modelled_steps(_config(), str(single), ["torch"], "h200").values()
    assert "diffusers folder" in entry["reason"]


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    """One bench run of diffusers and diffusers-compile (compile replaced by a stand-in that records
    the UNet it was given and counts the calls through it), with the modelled step for the H200."""
    calls = SimpleNamespace(compiled=[], forwards=0)

    def stand_in(unet, device):
        calls.compiled.append((type(unet).__name__, device))
        original = unet.forward

        def counted(*args, **kwargs):
            calls.forwards += 1
            return original(*args, **kwargs)

        unet.forward = counted
        return unet

    path = tmp_path_factory.mktemp("bench") / "bench.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(baselines, "compile_unet", stand_in)
        argv = ["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--width", "32", "--height", "32"]
        argv += ["--steps", "3", "--rounds", "1", "--backends", "diffusers,diffusers-compile"]
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            code = bench.main([*argv, "--census-target", "h200", "--json", str(path)])
    calls.printed = printed.getvalue()
    return code, json.loads(path.read_text()), calls


def test_compile_row_runs_the_compiled_unet_and_times_its_first_step_apart(compiled_run):
    code, payload, calls = compiled_run
    assert code == 0, payload["rows"]
    rows = {row["label"]: row for row in payload["rows"]}
    assert list(rows) == ["diffusers", "diffusers-compile"]
    assert calls.compiled == [("UNet2DConditionModel", "cpu")]
    # The warm-up image and one timed image, nothing else, through the compiled UNet: 3 steps each, which
    # diffusers' PNDM (the tiny preset's sampler) runs as 4 UNet calls (PLMS repeats its first timestep).
    assert calls.forwards == 2 * 4
    compiled = rows["diffusers-compile"]
    assert 0 < compiled["first_step_s"] < compiled["warmup_image_s"]
    assert compiled["psnr_db"] == rows["diffusers"]["psnr_db"]  # the same weights, the same images
    ratio = rows["diffusers"]["ratio_to_diffusers_compile"]
    assert ratio["baseline"] == "diffusers-compile" and ratio["rounds"] == 1
    assert compiled["ratio_to_diffusers"]["baseline"] == "diffusers"
    assert "diffusers-compile: torch.compile took" in calls.printed


def test_bench_rows_carry_the_modelled_step_beside_the_measured(compiled_run):
    _, payload, calls = compiled_run
    assert payload["config"]["census_target"] == "h200"
    rows = {row["label"]: row for row in payload["rows"]}
    entry = rows["diffusers"]["modelled_step"]
    assert entry["target"] == "H200" and entry["caveat"].startswith("measured on cpu")
    assert entry["measured_ms"] == rows["diffusers"]["unet_step_ms"]["median"]
    assert entry["measured_over_modelled"] == pytest.approx(entry["measured_ms"] / entry["modelled_ms"])
    assert "diffusers: step " in calls.printed and "modelled for H200" in calls.printed
    assert rows["diffusers-compile"]["modelled_step"] == {
        "reason": "the census does not model the diffusers-compile backend"
    }


def test_compile_row_is_opt_in():
    from runtime.bench.models import available_backends

    assert "diffusers-compile" not in available_backends("cpu")
    assert parse_args(["--backends", "torch,diffusers-compile"])[1] == ["torch", "diffusers-compile"]


def test_a_census_failure_is_a_reason_not_a_lost_run(tiny_folder, monkeypatch):
    def broken(*_):
        raise NotImplementedError("no formula for aten.frobnicate")

    monkeypatch.setattr(census, "modelled_step", broken)
    (entry,) = modelled_steps(_config(), tiny_folder, ["torch"], "h200").values()
    assert entry == {"reason": "the census failed: NotImplementedError: no formula for aten.frobnicate"}
