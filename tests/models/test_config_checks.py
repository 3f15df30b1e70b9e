"""Config fields of the wrong type, out of range or absurd are refused at parse time, naming the field;
through the loader the message also names the file, and nothing is built from an unchecked size."""

import json
import math
import shutil

import pytest

from runtime.models.clip import CLIPTextConfig
from runtime.models.unet import UNetConfig
from runtime.models.vae import VAEConfig
from runtime.schedulers import make_scheduler
from runtime.weights import WeightLoadError, load_components
from tests.model_factory import save_diffusers_folder, small_configs

SD1 = small_configs("sd1")


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_out_channels", "ab"),
        ("block_out_channels", [32.0, 64.0]),
        ("block_out_channels", None),
        ("block_out_channels", [-32, 64]),
        ("block_out_channels", [32] * 20),
        ("conv_in_kernel", 10001),
        ("conv_out_kernel", 2.0),
        ("sample_size", "big"),
        ("sample_size", -8),
        ("sample_size", 10**6),
        ("sample_size", 1e6),
        ("norm_eps", "x"),
        ("norm_eps", -1),
        ("norm_eps", math.nan),
        ("flip_sin_to_cos", "no"),
        ("center_input_sample", 1),
        ("freq_shift", 1e308),
        ("transformer_layers_per_block", 10**4),
        ("transformer_layers_per_block", [1, 10**4]),
        ("layers_per_block", 10**5),
        ("layers_per_block", 1.5),
        ("attention_head_dim", 0),
        ("cross_attention_dim", 10**7),
        ("in_channels", 0),
        ("norm_num_groups", "32"),
        ("only_cross_attention", "yes"),
        ("mid_block_scale_factor", math.inf),
        ("time_embedding_dim", 10**9),
    ],
)
def test_unet_fields(field, value):
    with pytest.raises(ValueError, match=rf"UNetConfig: config field '{field}' = .* must be "):
        UNetConfig.from_dict({**SD1["unet"], field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_out_channels", "ab"),
        ("block_out_channels", [32, -64, 64, 64]),
        ("layers_per_block", 10**5),
        ("latent_channels", 10**6),
        ("sample_size", "big"),
        ("scaling_factor", "0.18"),
        ("scaling_factor", -1.0),
        ("force_upcast", "no"),
        ("in_channels", 3.0),
    ],
)
def test_vae_fields(field, value):
    with pytest.raises(ValueError, match=rf"VAEConfig: config field '{field}' = .* must be "):
        VAEConfig.from_dict({**SD1["vae"], field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 10**10),
        ("vocab_size", 1e10),
        ("num_hidden_layers", 10**5),
        ("hidden_size", "768"),
        ("intermediate_size", -1),
        ("max_position_embeddings", 10**6),
        ("layer_norm_eps", "x"),
        ("layer_norm_eps", 5.0),
    ],
)
def test_text_encoder_fields(field, value):
    with pytest.raises(ValueError, match=rf"CLIPTextConfig.{field} must be "):
        CLIPTextConfig.from_dict({**SD1["text_encoder"], field: value})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_train_timesteps", 10**9, r"'num_train_timesteps' must be an integer in \[2, 100000\]"),
        ("steps_offset", 10**5, r"'steps_offset' must be an integer in \[0, num_train_timesteps = 1000\)"),
        ("steps_offset", -1, r"'steps_offset'"),
        ("beta_end", 2.0, r"'beta_end' must be a finite number in \(0, 1\)"),
        ("beta_start", math.nan, r"'beta_start' must be a finite number in \(0, 1\)"),
        ("beta_start", "0.001", r"'beta_start'"),
        ("trained_betas", [0.5] * 999 + [math.inf], r"'trained_betas' entry 999 is inf"),
    ],
)
@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler", "dpmpp_2m"])
def test_scheduler_fields(scheduler, field, value, message):
    with pytest.raises(ValueError, match=message):
        make_scheduler(scheduler, {**SD1["scheduler"], field: value})


@pytest.mark.parametrize(
    "scheduler, field",
    [("ddim", "clip_sample"), ("euler", "rescale_betas_zero_snr"), ("dpmpp_2m", "lower_order_final")],
)
def test_scheduler_flags_must_be_booleans(scheduler, field):
    with pytest.raises(ValueError, match=rf"'{field}' must be true or false, got 'no'"):
        make_scheduler(scheduler, {**SD1["scheduler"], field: "no"})


def test_a_schedule_whose_table_collapses_is_refused_at_construction():
    config = {
        **SD1["scheduler"],
        "beta_schedule": "linear",
        "beta_start": 0.5,
        "beta_end": 0.99,
        "num_train_timesteps": 100000,
    }
    with pytest.raises(ValueError, match="alphas_cumprod with NaN, inf or 0 values"):
        make_scheduler("euler", config)


@pytest.mark.parametrize("scheduler", ["ddim", "pndm"])
def test_leading_steps_past_the_table_are_named(scheduler):
    sched = make_scheduler(scheduler, SD1["scheduler"])  # steps_offset 1, "leading"
    sched.set_timesteps(999)
    with pytest.raises(
        ValueError,
        match=r"steps=1000 .*reaches timestep 1000, past the last trained timestep "
        r"999; use at most 999 steps",
    ):
        sched.set_timesteps(1000)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_diffusers_folder(tmp_path_factory.mktemp("configs") / "sd1", "sd1")


@pytest.mark.parametrize(
    "component, field, value",
    [
        ("unet", "transformer_layers_per_block", 10**4),
        ("unet", "layers_per_block", 10**5),
        ("text_encoder", "num_hidden_layers", 10**5),
        ("vae", "block_out_channels", "ab"),
    ],
)
def test_loader_names_file_and_field_before_building(folder, tmp_path, monkeypatch, component, field, value):
    copy = shutil.copytree(folder, tmp_path / "sd1")
    path = copy / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    from runtime import weights

    built, real = [], weights._parameters_on_meta

    def recording():
        built.append(1)
        return real()

    monkeypatch.setattr(weights, "_parameters_on_meta", recording)
    with pytest.raises(WeightLoadError, match=rf"{component}/config\.json\).*{field}"):
        load_components(copy)
    # Networks build in the order unet, vae, text_encoder: the bad one is refused before its build.
    assert len(built) == ("unet", "vae", "text_encoder").index(component)
