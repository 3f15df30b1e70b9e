"""python -m runtime.bench on the CPU: it runs, the backends agree, and the JSON holds real measurements."""

import json
import math

import pytest

from runtime import bench


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    # 21 steps give the 20 step intervals the median/p90 need from a single generation.
    code = bench.main(
        [
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--width",
            "32",
            "--height",
            "48",
            "--steps",
            "21",
            "--step-iters",
            "20",
            "--backends",
            "torch,onnxruntime",
            "--json",
            str(path),
        ]
    )
    return code, json.loads(path.read_text())


def test_bench_writes_the_documented_json(bench_json):
    code, payload = bench_json
    assert code == 0, payload["rows"]
    assert set(payload) >= {"schema", "benchmark", "provenance", "config", "rows"}
    assert set(payload["provenance"]) >= {"device", "versions", "git"}
    assert payload["provenance"]["device"] == "cpu"
    assert payload["config"]["width"] == 32 and payload["config"]["height"] == 48
    assert [row["backend"] for row in payload["rows"]] == ["torch", "onnxruntime"]


def test_bench_rows_hold_real_measurements(bench_json):
    _, payload = bench_json
    for row in payload["rows"]:
        step = row["unet_step_ms"]
        assert step["samples"] >= 20
        assert 0 < step["median"] <= step["p90"]
        for key in ("text_encode_ms", "vae_decode_ms", "end_to_end_ms", "it_per_s"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        assert row["it_per_s"] == pytest.approx(1e3 / step["median"])
        # A whole image costs more than one of its steps.
        assert row["end_to_end_ms"] > step["median"]


def test_exported_backend_agrees_with_the_fp32_reference(bench_json):
    _, payload = bench_json
    torch_row, ort_row = payload["rows"]
    assert torch_row["psnr_db"] is None  # it is the reference
    # fp32 ONNX graphs vs fp32 torch: the images are identical ("inf") or nearly so.
    assert ort_row["psnr_db"] == "inf" or ort_row["psnr_db"] >= 40.0


def test_cpu_rows_say_why_they_carry_no_modelled_step(bench_json):
    # No --census-target: a CPU has no census target (runtime/bench/modelled.py's rule), ONNX no census.
    _, payload = bench_json
    torch_row, ort_row = payload["rows"]
    assert set(torch_row["modelled_step"]) == {"reason"}
    assert "no census target for cpu" in torch_row["modelled_step"]["reason"]
    assert ort_row["modelled_step"] == {"reason": "the census does not model the onnxruntime backend"}


def test_bench_rejects_too_few_timed_steps(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--step-iters", "5"])
    assert "--step-iters must be at least 20" in capsys.readouterr().err


def test_bench_rejects_an_unknown_backend(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--backends", "torch,tensorflow"])
    assert "unknown backend(s) tensorflow" in capsys.readouterr().err


def test_bench_rejects_a_size_the_vae_cannot_decode(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--width", "60"])
    assert "--width and --height must be positive multiples of 8, got 60x" in capsys.readouterr().err


def test_rows_ran_interleaved_in_rounds_and_record_what_could_bias_them(bench_json):
    _, payload = bench_json
    assert [r["order"] for r in payload["rounds"]] == [["torch", "onnxruntime"]] * 3
    for order, row in enumerate(payload["rows"]):
        assert row["order"] == order
        assert row["cpu_s"] > 0 and 0 < row["build_s"] < row["wall_s"]
        assert row["peak_rss_mb"] > 0
        spread = row["unet_step_ms"]
        assert spread["p10"] <= spread["median"] <= spread["p90"]
    torch_row, ort_row = payload["rows"]
    # A row against itself, round by round: exactly 1.
    assert torch_row["ratio_to_torch"] == {"median": 1.0, "min": 1.0, "max": 1.0, "rounds": 3, "baseline": "torch"}
    assert ort_row["ratio_to_torch"]["rounds"] == 3
    assert ort_row["ratio_to_torch"]["min"] <= ort_row["ratio_to_torch"]["median"] <= ort_row["ratio_to_torch"]["max"]


def test_self_check_runs_one_backend_as_two_rows(tmp_path, capsys):
    path = tmp_path / "self.json"
    code = bench.main(
        [
            "--self-check",
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "11",
            "--step-iters",
            "20",
            "--json",
            str(path),
        ]
    )
    payload = json.loads(path.read_text())
    assert code == 0, payload["rows"]
    assert [row["label"] for row in payload["rows"]] == ["torch#1", "torch#2"]
    assert payload["self_check"]["rounds"] == 3
    assert "self-check: torch#2 / torch#1 step time" in capsys.readouterr().out


def test_self_check_takes_one_backend(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--self-check", "--backends", "torch,onnxruntime"])
    assert "--self-check runs one backend twice" in capsys.readouterr().err


def test_crosscheck_times_the_two_unets_alternately_on_the_same_work(capsys):
    pytest.importorskip("diffusers")
    from benchmarks import crosscheck_ratio

    calls = []
    ours, theirs = (lambda: calls.append("a")), (lambda: calls.append("b"))
    times_a, times_b = crosscheck_ratio.alternate(ours, theirs, calls=3, warmup=1)
    assert calls == list("ab" * 4) and len(times_a) == len(times_b) == 3
    crosscheck_ratio.main(["--calls", "2"])  # builds both UNets and checks they agree before timing
    out = capsys.readouterr().out
    assert "2 calls each, alternated" in out and "ratio" in out
