"""python -m runtime.bench: the opt-in LoRA swap section (runtime/bench/lora_swap.py) and one-line errors for
the options (exit 2, no usage block, no traceback) before anything is built."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runtime
from runtime import bench
from runtime.bench import lora_swap
from runtime.bench.measure import BenchConfig, Row
from runtime.bench.presets import write_random_model
from runtime.bench.results import SCHEMA

QUICK = ["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--width", "32", "--height", "32"]
QUICK += ["--steps", "2", "--rounds", "1", "--backends", "torch"]


def test_lora_rank_adds_a_swap_section_to_the_one_schema(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main([*QUICK, "--lora-rank", "4", "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    assert payload["schema"] == SCHEMA and payload["config"]["lora_rank"] == 4
    (entry,) = payload["lora_swaps"]
    assert entry["backend"] == "torch" and "error" not in entry and "skipped" not in entry
    for key in ("load_apply_ms", "rescale_ms", "unload_ms"):
        assert entry[key]["n"] == lora_swap.SWAP_REPEATS and entry[key]["median"] > 0
    steps_with, steps_without = entry["unet_step_ms_with_lora"], entry["unet_step_ms_without"]
    assert steps_with["n"] == steps_without["n"] >= 1 and steps_with["median"] > 0
    assert entry["touched_weights"] > 0 and entry["base_copy_mb"] > 0
    assert "LoRA swaps" in capsys.readouterr().out


def test_random_lora_covers_attention_and_text_layers_and_unloads_exactly(tmp_path):
    pipe = runtime.load(write_random_model("tiny", tmp_path / "model"), backend="torch", device="cpu", dtype="fp32")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    path = lora_swap.random_lora(pipe, 4, tmp_path / "r.safetensors")
    pipe.load_lora(path)
    touched = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, before[k])]
    linear_attention = [k for k, v in before.items() if "attentions" in k and k.endswith(".weight") and v.ndim == 2]
    assert sorted(touched) == sorted(linear_attention)
    assert pipe._loras.touched_weights > len(touched)  # the text encoder's layers too
    pipe.unload_lora()
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_exported_and_failed_rows_are_listed_as_skipped():
    config = BenchConfig(preset="tiny", device="cpu", dtype="fp32", width=32, height=32, steps=3, step_iters=20)
    assert "skipped" in lora_swap.measure_swaps(Row("onnxruntime", "onnxruntime", 0), config, "x.safetensors")
    failed = Row("torch", "torch", 0, error="RuntimeError: boom")
    assert "the row failed" in lora_swap.measure_swaps(failed, config, "x.safetensors")["skipped"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nope"], "--model path not found: /nope"),
        (["--json", "{tmp}"], "--json .* is a folder; give a file path"),
        (["--json", "{tmp}/file.txt/bench.json"], "file.txt is a file, not a folder"),
        (["--dtype", "fp12"], "unknown dtype 'fp12'; valid names: fp32"),
        (["--device", "gpu"], "--device must be cpu, cuda or cuda:N, got 'gpu'"),
        (["--batch", "0"], "--batch must be at least 1, got 0"),
        (["--guidance", "inf"], "--guidance must be a finite number >= 0"),
        (["--lora", "{tmp}/missing.safetensors"], "--lora file not found"),
        (["--lora-rank", "0"], "--lora-rank must be at least 1, got 0"),
        (["--lora", "x", "--lora-rank", "2"], "argument --lora-rank: not allowed with argument --lora"),
        (["--steps", "lots"], "argument --steps: invalid int value: 'lots'"),
    ],
)
def test_option_mistakes_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "file.txt").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_a_model_that_does_not_load_is_one_line_from_the_module(tmp_path):
    (tmp_path / "empty-model").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "runtime.bench", "--model", str(tmp_path / "empty-model"), "--backends", "torch"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "empty-model" in error_lines[0]
