"""`python -m export --format triton-repo`: every config.pbtxt parses against Triton's schema and matches
its ONNX graph, and the Python model, run in-process with a stand-in pb_utils whose BLS calls go to
onnxruntime, makes the image our pipeline makes."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import onnxruntime
import pytest

import runtime
from export.__main__ import main as export_main
from export.manifest import ArtifactError
from export.triton_repo import NETWORKS, PIPELINE, write_triton_repo
from tests.export import fake_triton_pb_utils, pbtxt
from tests.export.conftest import SMALL_PROFILE

_ONNX_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64"}


@pytest.fixture(scope="module")
def repo(model_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    profile = f"--min 1x32x32 --opt 1x64x64 --max {SMALL_PROFILE.max}".split()
    assert (
        export_main(
            [
                "--model",
                str(model_folder("sd1")),
                "--out",
                str(out),
                "--format",
                "triton-repo",
                "--no-progress",
                *profile,
            ]
        )
        == 0
    )
    return out


def _config(repo, name) -> dict:
    message = pbtxt.parse((repo / name / "config.pbtxt").read_text())
    pbtxt.check(message)
    return pbtxt.plain(message)


def test_every_config_parses_and_matches_its_graph(repo):
    assert sorted(p.name for p in repo.iterdir()) == sorted([*NETWORKS, PIPELINE])
    for name in NETWORKS:
        config = _config(repo, name)
        assert config["name"] == name and config["backend"] == "onnxruntime" and config["max_batch_size"] == 0
        session = onnxruntime.InferenceSession(str(repo / name / "1" / config["default_model_filename"]))
        for declared, actual in ((config["input"], session.get_inputs()), (config["output"], session.get_outputs())):
            assert [t["name"] for t in declared] == [a.name for a in actual]
            for tensor, graph in zip(declared, actual):
                assert tensor["data_type"] == _ONNX_TYPES[graph.type]
                assert tensor["dims"] == [d if isinstance(d, int) else -1 for d in graph.shape], tensor["name"]
    config = _config(repo, PIPELINE)
    assert config["backend"] == "python" and (repo / PIPELINE / "1" / "model.py").is_file()
    optional = {t["name"]: t.get("optional", False) for t in config["input"]}
    assert optional.pop("prompt") is False and all(optional.values())


def test_the_parser_refuses_what_triton_would():
    with pytest.raises(ValueError, match="unknown field 'max_batch'"):
        pbtxt.check(pbtxt.parse('name: "x"\nmax_batch: 0\n'))
    with pytest.raises(ValueError, match="TYPE_FLOAT"):
        pbtxt.check(pbtxt.parse('input [ { name: "a" data_type: TYPE_FLOAT dims: [ 1 ] } ]'))
    with pytest.raises(ValueError, match="missing"):
        pbtxt.parse('input [ { name: "a" ')


@pytest.fixture
def python_model(repo, monkeypatch):
    pb_utils = fake_triton_pb_utils.make_module(repo)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    spec = importlib.util.spec_from_file_location("triton_pipeline_model", repo / PIPELINE / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(repo / PIPELINE), "model_version": "1", "model_config": "{}"})
    return model, pb_utils


def _request(**inputs):
    arrays = {}
    for name, value in inputs.items():
        if isinstance(value, str):
            arrays[name] = np.array([value.encode()], dtype=object)
        else:
            arrays[name] = np.array(
                [value], dtype=np.float32 if name == "guidance" else np.int64 if name == "seed" else np.int32
            )
    return fake_triton_pb_utils.Request(**arrays)


@pytest.mark.parametrize("scheduler", ["", "euler_a"])  # the model's own (PNDM), and an ancestral one
def test_python_model_makes_the_pipelines_image(python_model, model_folder, scheduler):
    model, pb_utils = python_model
    request = _request(
        prompt="a lighthouse",
        negative_prompt="fog",
        steps=3,
        guidance=6.0,
        seed=7,
        width=64,
        height=48,
        scheduler=scheduler,
    )
    (response,) = model.execute([request])
    assert not response.has_error(), response.error() and response.error().message()
    image = pb_utils.get_output_tensor_by_name(response, "image").as_numpy()
    assert image.shape == (1, 48, 64, 3) and image.dtype == np.uint8
    pipe = runtime.load(model_folder("sd1"))
    pipe.prompt_syntax = "plain"  # the Triton model reads prompts as plain text
    expected = pipe.generate(
        "a lighthouse",
        negative_prompt="fog",
        steps=3,
        guidance=6.0,
        seed=7,
        width=64,
        height=48,
        scheduler=scheduler or None,
        progress=False,
    )[0]
    difference = np.abs(image[0].astype(int) - np.asarray(expected).astype(int))
    assert difference.max() <= 2, difference.max()  # onnxruntime vs torch fp32: rounding, not a different image
    assert pb_utils.calls.count("unet") == 3 + (1 if not scheduler else 0)  # PNDM runs one extra step


def test_python_model_answers_bad_inputs_with_an_error_response(python_model):
    model, _ = python_model
    bad, good = _request(prompt="x", steps=0), _request(prompt="x", steps=1, width=32, height=32)
    responses = model.execute([bad, _request(prompt="x", width=60), good])
    assert "steps" in responses[0].error().message() and "multiples of 8" in responses[1].error().message()
    assert not responses[2].has_error()


def test_a_second_run_reuses_and_a_foreign_folder_is_refused(repo, model_folder, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in repo.rglob("*.onnx")}
    write_triton_repo(repo, model_folder("sd1"), profile=None, progress=False)
    assert {p: p.stat().st_mtime_ns for p in repo.rglob("*.onnx")} == before
    foreign = tmp_path / "mine"
    (foreign / "notes").mkdir(parents=True)
    with pytest.raises(ArtifactError, match="'notes'"):
        write_triton_repo(foreign, model_folder("sd1"), progress=False)
    assert (foreign / "notes").is_dir() and len(list(foreign.iterdir())) == 1
