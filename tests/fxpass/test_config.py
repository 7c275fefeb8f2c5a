"""fxpass.config: RePaint / guided-diffusion YAML files, validation, the built-in CAMUS default."""

from __future__ import annotations

from pathlib import Path

import pytest

import fxpass
from fxpass.config import CAMUS, DEFAULT_CHANNEL_MULT, ModelConfig, build_model, from_dict, load_config
from fxpass.errors import FxpassError

PACKAGE_CAMUS_YML = Path(fxpass.__file__).parent / "camus.yml"

# The model part of a RePaint config (keys and values as RePaint's confs/*.yml write them), plus the
# sampler / classifier / data keys such files carry, which fxpass ignores.
REPAINT_STYLE = {
    "attention_resolutions": "32,16,8",
    "class_cond": False,
    "diffusion_steps": 1000,
    "learn_sigma": True,
    "noise_schedule": "linear",
    "num_channels": 256,
    "num_head_channels": 64,
    "num_heads": 4,
    "num_res_blocks": 2,
    "resblock_updown": True,
    "use_fp16": False,
    "use_scale_shift_norm": True,
    "classifier_scale": 4.0,
    "lr_kernel_n_std": 2,
    "num_samples": 100,
    "show_progress": True,
    "timestep_respacing": "250",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
    "classifier_use_fp16": False,
    "classifier_width": 128,
    "classifier_depth": 2,
    "classifier_attention_resolutions": "32,16,8",
    "classifier_use_scale_shift_norm": True,
    "classifier_resblock_updown": True,
    "classifier_pool": "attention",
    "num_heads_upsample": -1,
    "channel_mult": "",
    "dropout": 0.0,
    "use_checkpoint": False,
    "use_new_attention_order": False,
    "clip_denoised": True,
    "use_ddim": False,
    "latex_name": "RePaint",
    "method_name": "Repaint",
    "image_size": 256,
    "model_path": "./data/pretrained/model.pt",
    "name": "example",
    "inpa_inj_sched_prev": True,
    "n_jobs": 1,
    "print_estimated_vars": True,
    "inpa_inj_sched_prev_cumnoise": False,
    "schedule_jump_params": {"t_T": 250, "n_sample": 1, "jump_length": 10, "jump_n_sample": 10},
    "data": {"eval": {"example": {"mask_loader": True, "image_size": 256, "batch_size": 1}}},
}


# ---- the CAMUS default ---------------------------------------------------------------------------
def test_camus_has_exactly_41125062_parameters():
    model = build_model(CAMUS)
    assert sum(p.numel() for p in model.parameters()) == 41_125_062


def test_camus_flags():
    assert CAMUS == ModelConfig()
    assert CAMUS.image_size == 256 and CAMUS.num_channels == 64 and CAMUS.num_res_blocks == 3
    assert CAMUS.channel_mults == (1, 1, 2, 2, 4, 4)
    assert CAMUS.attention_ds == (16, 32)  # "16,8" px at 256 px: downsample rates 16 and 32
    assert CAMUS.learn_sigma and CAMUS.out_channels == 6
    assert CAMUS.use_scale_shift_norm and not CAMUS.resblock_updown and not CAMUS.use_new_attention_order
    assert CAMUS.num_heads == 4 and CAMUS.num_head_channels == -1
    assert CAMUS.num_classes is None
    assert CAMUS.diffusion_steps == 4000 and CAMUS.timestep_respacing == "250"


def test_none_is_the_builtin_camus():
    assert load_config(None) is CAMUS


def test_package_camus_yml_equals_builtin():
    assert PACKAGE_CAMUS_YML.is_file()
    assert load_config(PACKAGE_CAMUS_YML) == CAMUS
    assert load_config(str(PACKAGE_CAMUS_YML)) == CAMUS


# ---- reading YAML --------------------------------------------------------------------------------
def test_small_yaml_ignores_sampler_keys(small_yaml, small_cfg):
    cfg = load_config(small_yaml)
    assert cfg == small_cfg
    assert cfg.image_size == 32 and cfg.num_channels == 32 and cfg.num_res_blocks == 1


def test_repaint_style_yaml(tmp_path, write_yaml):
    cfg = load_config(write_yaml(tmp_path / "repaint.yml", REPAINT_STYLE))
    assert cfg.num_channels == 256 and cfg.num_head_channels == 64 and cfg.resblock_updown
    assert cfg.attention_ds == (8, 16, 32)
    assert cfg.diffusion_steps == 1000 and cfg.timestep_respacing == "250"
    assert not cfg.use_fp16


def test_unspecified_keys_take_guided_diffusion_defaults(tmp_path, write_yaml):
    cfg = load_config(write_yaml(tmp_path / "c.yml", {"image_size": 64, "num_channels": 32}))
    assert cfg == CAMUS.replace(image_size=64, num_channels=32)
    assert cfg.channel_mults == (1, 2, 3, 4)


def test_yaml_scalars_are_normalised(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(
        "image_size: 32\nnum_channels: 32\nattention_resolutions: 16\ntimestep_respacing: 250\n"
        "dropout: 0\nchannel_mult: 1, 2, 2\n"
    )
    cfg = load_config(path)
    assert cfg.attention_resolutions == "16" and cfg.attention_ds == (2,)
    assert cfg.timestep_respacing == "250"
    assert cfg.dropout == 0.0 and isinstance(cfg.dropout, float)
    assert cfg.channel_mult == "1,2,2" and cfg.channel_mults == (1, 2, 2)


@pytest.mark.parametrize("size", sorted(DEFAULT_CHANNEL_MULT))
def test_default_channel_mult_per_image_size(size):
    expected = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
        32: (1, 2, 2, 2),
    }[size]
    assert from_dict({"image_size": size, "num_channels": 64}).channel_mults == expected


def test_explicit_channel_mult_and_fractions(small_values):
    assert from_dict({**small_values, "channel_mult": "1,2"}).channel_mults == (1, 2)
    assert from_dict({"image_size": 32, "num_channels": 64, "channel_mult": "0.5,1"}).channel_mults == (0.5, 1)


def test_derived_values(small_values):
    cfg = from_dict({**small_values, "learn_sigma": False, "class_cond": True})
    assert cfg.out_channels == 3 and cfg.num_classes == 1000
    assert from_dict({**small_values, "attention_resolutions": ""}).attention_ds == ()


def test_replace_validates():
    assert CAMUS.replace(num_channels=32).num_channels == 32
    with pytest.raises(FxpassError, match="num_channels"):
        CAMUS.replace(num_channels=48)


def test_to_dict_round_trips():
    assert from_dict(CAMUS.to_dict()) == CAMUS


# ---- errors --------------------------------------------------------------------------------------
def test_unknown_key_is_an_error_naming_it(tmp_path, write_yaml, small_values):
    path = write_yaml(tmp_path / "typo.yml", {**small_values, "num_chanels": 32})
    with pytest.raises(FxpassError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ")
    assert "unknown model key 'num_chanels'" in text
    assert "\n" not in text


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("num_channels", "abc", "num_channels: must be an integer (got 'abc')"),
        ("num_channels", True, "num_channels: must be an integer"),
        ("num_channels", 48, "not divisible by GroupNorm's 32 groups"),
        ("num_channels", 0, "num_channels"),
        ("learn_sigma", "yes", "learn_sigma: must be true or false (got 'yes')"),
        ("image_size", 48, "image_size: has no default channel_mult"),
        ("image_size", -32, "image_size: must be positive"),
        ("channel_mult", "1,,2", "channel_mult: must be comma-separated numbers"),
        ("channel_mult", "1,0", "channel_mult: must be positive numbers"),
        ("channel_mult", [1, 2], "channel_mult: must be a string"),
        ("attention_resolutions", "16,x", "attention_resolutions: must be comma-separated pixel sizes"),
        ("attention_resolutions", "7", "attention_resolutions: each must be a positive divisor of image_size 32"),
        ("num_heads", 3, "num_heads: does not divide the 64 channels"),
        ("num_heads", 0, "num_heads: must be at least 1"),
        ("num_head_channels", 0, "num_head_channels: must be -1 or positive"),
        ("num_head_channels", 24, "num_head_channels: does not divide"),
        ("num_heads_upsample", 0, "num_heads_upsample: must be -1 or positive"),
        ("num_res_blocks", 0, "num_res_blocks: must be at least 1"),
        ("dropout", 1.5, "dropout: must be a number in [0, 1)"),
        ("dropout", "0.1", "dropout: must be a number in [0, 1)"),
        ("noise_schedule", "quadratic", "noise_schedule: must be one of linear, cosine, scaled_linear"),
        ("diffusion_steps", 0, "diffusion_steps: must be positive"),
        ("timestep_respacing", "ddim1", "timestep_respacing: cannot take exactly 1 steps of 1000"),
        ("timestep_respacing", "2000", "timestep_respacing: cannot divide a section of 1000 steps into 2000"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path, write_yaml, small_values, key, value, fragment):
    path = write_yaml(tmp_path / "bad.yml", {**small_values, key: value})
    with pytest.raises(FxpassError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"{path}: {key}")
    assert fragment in text
    assert "\n" not in text


def test_image_size_not_divisible_by_levels():
    with pytest.raises(FxpassError, match="image_size: must be divisible by 8"):
        from_dict({"image_size": 36, "num_channels": 32, "channel_mult": "1,2,2,2"})


def test_missing_file(tmp_path):
    with pytest.raises(FxpassError, match=r"nope\.yml: config file not found"):
        load_config(tmp_path / "nope.yml")


def test_directory_is_not_a_config(tmp_path):
    with pytest.raises(FxpassError, match="config file not found"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("image_size: [32\n", "not a readable YAML file"),
        ("- 1\n- 2\n", "expected a mapping of config keys, got list"),
        ("just a string\n", "expected a mapping of config keys, got str"),
        ("", "config file is empty"),
        ("# only a comment\n", "config file is empty"),
        (b"\xff\xfe\x87garbage", "not a readable YAML file"),
        ("1: 32\n", "key 1 is not a string"),
    ],
)
def test_unreadable_yaml(tmp_path, content, fragment):
    path = tmp_path / "broken.yml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(FxpassError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
