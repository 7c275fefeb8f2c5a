"""Model configuration: RePaint / guided-diffusion YAML files and the built-in CAMUS default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import MAX_CONFIG_BYTES, PARSE_ERRORS, FxpassError, first_line, parse_reason, short_repr

# Keys of RePaint / guided-diffusion YAML files that do not describe the U-Net: accepted and ignored.
SAMPLER_KEYS = frozenset(
    {
        "schedule_jump_params", "data", "lr_kernel_n_std", "num_samples", "show_progress", "use_kl",
        "predict_xstart", "rescale_learned_sigmas", "clip_denoised", "use_ddim", "model_path", "name",
        "inpa_inj_sched_prev", "n_jobs", "print_estimated_vars", "inpa_inj_sched_prev_cumnoise",
        "batch_size", "latex_name", "method_name", "classifier_path", "classifier_scale", "respace_interpolate",
        "microbatch", "lr", "weight_decay", "lr_anneal_steps", "ema_rate", "log_interval", "save_interval",
        "resume_checkpoint", "fp16_scale_growth", "schedule_sampler", "data_dir", "seed",
    }
)
SAMPLER_PREFIXES = ("classifier_",)

DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
NUM_CLASSES = 1000
#: the largest image side a user class's config may declare (its input's memory is checked again when built)
MAX_USER_IMAGE_SIZE = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net and diffusion flags of a guided-diffusion / RePaint config (guided-diffusion defaults)."""

    image_size: int = 256
    num_channels: int = 64
    num_res_blocks: int = 3
    channel_mult: str = ""
    attention_resolutions: str = "16,8"
    num_heads: int = 4
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    learn_sigma: bool = True
    class_cond: bool = False
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dropout: float = 0.0
    use_checkpoint: bool = False
    use_fp16: bool = True
    diffusion_steps: int = 4000
    timestep_respacing: str = "250"
    noise_schedule: str = "linear"
    rescale_timesteps: bool = False
    #: a library's schedule (diffusers' scheduler config): the linear / scaled_linear schedule's first and
    #: last beta (0, 0: guided-diffusion's 0.0001 and 0.02 scaled to 1000 steps)
    beta_start: float = 0.0
    beta_end: float = 0.0
    #: what the model predicts: "epsilon" (the noise; guided-diffusion), "v_prediction" or "sample" (x0)
    prediction_type: str = "epsilon"
    #: "" for fxpass's own U-Net; ``pkg.mod:Class`` for a user's class (``--model-class``), whose config
    #: is checked only for what fxpass uses (size, schedule), not for fxpass's architecture rules
    model_class: str = ""

    # ---- derived -------------------------------------------------------------------------
    @property
    def channel_mults(self) -> tuple:
        if self.channel_mult == "":
            return DEFAULT_CHANNEL_MULT[self.image_size]
        return tuple(float(m) if "." in m else int(m) for m in self.channel_mult.split(","))

    @property
    def attention_ds(self) -> tuple[int, ...]:
        if self.attention_resolutions == "":
            return ()
        return tuple(self.image_size // int(r) for r in self.attention_resolutions.split(","))

    @property
    def out_channels(self) -> int:
        return 6 if self.learn_sigma else 3

    @property
    def plain(self) -> bool:
        """A user's network with no timestep (no schedule given: ``diffusion_steps`` 0): lowered in plain mode."""
        return bool(self.model_class) and self.diffusion_steps == 0

    @property
    def num_classes(self) -> int | None:
        return NUM_CLASSES if self.class_cond else None

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if not values["model_class"]:
            del values["model_class"]  # fxpass's own U-Net: the keys every earlier version wrote
        else:  # a user's class: what fxpass knows of it (size, schedule, output), not its U-Net's settings
            for key in ARCHITECTURE_KEYS:
                del values[key]
        for key in OPTIONAL_KEYS[1:]:  # a library's schedule only: at their defaults, the keys earlier versions wrote
            if values[key] == getattr(ModelConfig, key):
                del values[key]
        return values

    def replace(self, **changes) -> "ModelConfig":
        return from_dict({**self.to_dict(), **changes})


CAMUS = ModelConfig()
#: fxpass's own U-Net's settings: not recorded for a user's class (whose architecture is its own)
ARCHITECTURE_KEYS = ("num_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "num_heads",
                     "num_head_channels", "num_heads_upsample", "class_cond", "use_scale_shift_norm",
                     "resblock_updown", "use_new_attention_order", "dropout", "use_checkpoint", "use_fp16")
#: keys a config may leave out (at their defaults), even one fxpass wrote itself
OPTIONAL_KEYS = ("model_class", "beta_start", "beta_end", "prediction_type")
NOISE_SCHEDULES = ("linear", "cosine", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

_INT = ("image_size", "num_channels", "num_res_blocks", "num_heads", "num_head_channels",
        "num_heads_upsample", "diffusion_steps")
_BOOL = ("learn_sigma", "class_cond", "use_scale_shift_norm", "resblock_updown",
         "use_new_attention_order", "use_checkpoint", "use_fp16", "rescale_timesteps")


def _bad(source: str, key: str, value: Any, why: str) -> FxpassError:
    return FxpassError(f"{source}: {key}: {why} (got {short_repr(value)})")


def from_dict(values: dict[str, Any], source: str = "config", *, complete: bool = False,
              architecture: bool = True) -> ModelConfig:
    """Validate a mapping of config keys; sampler keys are ignored, unknown keys are an error.

    ``complete``: every key must be present (a config fxpass wrote itself, e.g. in ONNX metadata).
    ``architecture=False``: the config of a user's own class (``--model-class``): only what fxpass
    itself uses is checked (image size, schedule), not fxpass's U-Net's architecture rules.
    """
    known = {f.name for f in fields(ModelConfig)}
    if complete:
        optional = set(OPTIONAL_KEYS) | (set(ARCHITECTURE_KEYS) if values.get("model_class") else set())
        missing = sorted(known - set(values) - optional)
        if missing:
            raise FxpassError(f"{source}: missing key '{missing[0]}'")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise FxpassError(f"{source}: key {key!r} is not a string")
        if key in known:
            kwargs[key] = value
        elif key in SAMPLER_KEYS or key.startswith(SAMPLER_PREFIXES):
            continue
        else:
            raise FxpassError(f"{source}: unknown model key '{key}' (known: {', '.join(sorted(known))})")

    for key in _INT:
        if key in kwargs and (isinstance(kwargs[key], bool) or not isinstance(kwargs[key], int)):
            raise _bad(source, key, kwargs[key], "must be an integer")
    for key in _BOOL:
        if key in kwargs and not isinstance(kwargs[key], bool):
            raise _bad(source, key, kwargs[key], "must be true or false")
    for key in ("channel_mult", "attention_resolutions", "timestep_respacing"):
        if key in kwargs:
            value = kwargs[key]
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise _bad(source, key, value, "must be a string such as '16,8'")
            kwargs[key] = str(value).replace(" ", "")
    if "dropout" in kwargs:
        d = kwargs["dropout"]
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise _bad(source, "dropout", d, "must be a number in [0, 1)")
        kwargs["dropout"] = float(d)
    for key in ("beta_start", "beta_end"):
        value = kwargs.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise _bad(source, key, value, "must be a number in [0, 1)")
        kwargs[key] = float(value)
    if (kwargs["beta_start"] == 0.0) != (kwargs["beta_end"] == 0.0) or kwargs["beta_start"] > kwargs["beta_end"]:
        raise _bad(source, "beta_start", (kwargs["beta_start"], kwargs["beta_end"]),
                   "beta_start and beta_end: both or neither, beta_start below beta_end")
    if kwargs.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise _bad(source, "prediction_type", kwargs["prediction_type"], f"must be one of {', '.join(PREDICTION_TYPES)}")
    if "model_class" in kwargs and not isinstance(kwargs["model_class"], str):
        raise _bad(source, "model_class", kwargs["model_class"], "must be a string such as 'pkg.mod:Class'")
    cfg = ModelConfig(**kwargs)
    _check(cfg, source) if architecture and not cfg.model_class else _check_schedule(cfg, source)
    return cfg


def _check_schedule(cfg: ModelConfig, source: str) -> None:
    """What fxpass uses of a user class's config: the image size and the diffusion schedule."""
    if cfg.image_size <= 0 or cfg.image_size > MAX_USER_IMAGE_SIZE:
        raise _bad(source, "image_size", cfg.image_size, f"must be in 1..{MAX_USER_IMAGE_SIZE}")
    if cfg.diffusion_steps == 0 and cfg.timestep_respacing == "":
        return  # a user's network with no timestep (a segmentation U-Net): no schedule at all
    if cfg.diffusion_steps < 1:
        raise _bad(source, "diffusion_steps", cfg.diffusion_steps, "must be positive")
    if cfg.noise_schedule not in NOISE_SCHEDULES:
        raise _bad(source, "noise_schedule", cfg.noise_schedule, f"must be one of {', '.join(NOISE_SCHEDULES)}")
    from .diffusion import respaced
    from .limits import MAX_DIFFUSION_STEPS, MAX_SCHEDULE, schedule_length

    if cfg.diffusion_steps > MAX_DIFFUSION_STEPS:
        raise _bad(source, "diffusion_steps", cfg.diffusion_steps, f"at most {MAX_DIFFUSION_STEPS:,}")
    try:
        respaced(cfg.diffusion_steps, cfg.timestep_respacing)
    except ValueError as exc:
        raise _bad(source, "timestep_respacing", cfg.timestep_respacing, str(exc)) from None
    if schedule_length(cfg.diffusion_steps, cfg.timestep_respacing) > MAX_SCHEDULE:
        raise _bad(source, "timestep_respacing", cfg.timestep_respacing, f"keeps more than {MAX_SCHEDULE:,} steps")


def user_class_config(path: str | Path | None, *, diffusion_steps: int | None = None,
                      timestep_respacing: str | None = None, image_size: int | None = None,
                      spec: str = "--model-class", model_class: str = "") -> ModelConfig:
    """The config of a user's own class: ``--config FILE`` and/or the schedule flags, checked only for
    what fxpass uses.  ``image_size`` 0 in the result: take it from the model's ``image_size``."""
    values: dict[str, Any] = {}
    source = "config"
    if path:
        values = dict(_read_yaml(path))
        source = str(path)
    elif diffusion_steps is None:
        if timestep_respacing is not None:
            raise FxpassError(f"--timestep-respacing {timestep_respacing}: needs --diffusion-steps N")
        values["diffusion_steps"] = 0  # no schedule: a model with no timestep (lowering refuses one that has)
        values["timestep_respacing"] = ""
    if diffusion_steps is not None:
        values["diffusion_steps"] = diffusion_steps
        values.setdefault("timestep_respacing", "")
    if timestep_respacing is not None:
        values["timestep_respacing"] = timestep_respacing
    if image_size is not None:
        values["image_size"] = image_size
    values["model_class"] = model_class or values.get("model_class") or "user"
    unsized = "image_size" not in values
    if unsized:
        values["image_size"] = 1
    cfg = from_dict(values, source=source, architecture=False)
    return dataclasses.replace(cfg, image_size=0) if unsized else cfg


def _check(cfg: ModelConfig, source: str) -> None:
    if cfg.image_size <= 0:
        raise _bad(source, "image_size", cfg.image_size, "must be positive")
    if cfg.channel_mult == "" and cfg.image_size not in DEFAULT_CHANNEL_MULT:
        raise _bad(source, "image_size", cfg.image_size,
                   f"has no default channel_mult (sizes {sorted(DEFAULT_CHANNEL_MULT)}); set channel_mult")
    try:
        mults = cfg.channel_mults
    except ValueError:
        raise _bad(source, "channel_mult", cfg.channel_mult, "must be comma-separated numbers") from None
    if not mults or any(m <= 0 for m in mults):
        raise _bad(source, "channel_mult", cfg.channel_mult, "must be positive numbers")
    if cfg.num_channels <= 0:
        raise _bad(source, "num_channels", cfg.num_channels, "must be positive")
    for m in mults:
        width = int(m * cfg.num_channels)
        if width % 32:
            raise _bad(source, "num_channels", cfg.num_channels,
                       f"times channel_mult {m} gives {width} channels, not divisible by GroupNorm's 32 groups")
    if cfg.image_size % (2 ** (len(mults) - 1)):
        raise _bad(source, "image_size", cfg.image_size, f"must be divisible by {2 ** (len(mults) - 1)}")
    if cfg.num_res_blocks < 1:
        raise _bad(source, "num_res_blocks", cfg.num_res_blocks, "must be at least 1")
    try:
        res = [int(r) for r in cfg.attention_resolutions.split(",")] if cfg.attention_resolutions else []
    except ValueError:
        raise _bad(source, "attention_resolutions", cfg.attention_resolutions,
                   "must be comma-separated pixel sizes such as '16,8'") from None
    if any(r <= 0 or cfg.image_size % r for r in res):
        raise _bad(source, "attention_resolutions", cfg.attention_resolutions,
                   f"each must be a positive divisor of image_size {cfg.image_size}")
    if cfg.num_heads < 1:
        raise _bad(source, "num_heads", cfg.num_heads, "must be at least 1")
    if cfg.num_head_channels == 0 or cfg.num_head_channels < -1:
        raise _bad(source, "num_head_channels", cfg.num_head_channels, "must be -1 or positive")
    if cfg.num_heads_upsample == 0 or cfg.num_heads_upsample < -1:
        raise _bad(source, "num_heads_upsample", cfg.num_heads_upsample, "must be -1 or positive")
    levels_with_attention = {i for i in range(len(mults)) if 2**i in cfg.attention_ds} | {len(mults) - 1}
    for i in sorted(levels_with_attention):
        width = int(mults[i] * cfg.num_channels)
        if cfg.num_head_channels > 0 and width % cfg.num_head_channels:
            raise _bad(source, "num_head_channels", cfg.num_head_channels,
                       f"does not divide the {width} channels of an attention block")
        heads = [cfg.num_heads, cfg.num_heads_upsample if cfg.num_heads_upsample > 0 else cfg.num_heads]
        if cfg.num_head_channels == -1 and any(width % h for h in heads):
            raise _bad(source, "num_heads", cfg.num_heads, f"does not divide the {width} channels of an attention block")
    if cfg.diffusion_steps < 1:
        raise _bad(source, "diffusion_steps", cfg.diffusion_steps, "must be positive")
    if cfg.noise_schedule not in NOISE_SCHEDULES:
        raise _bad(source, "noise_schedule", cfg.noise_schedule, f"must be one of {', '.join(NOISE_SCHEDULES)}")
    from .diffusion import respaced
    from .limits import check_config_fits

    check_config_fits(cfg, source)  # before anything is built: a schedule or a model that cannot fit
    try:
        respaced(cfg.diffusion_steps, cfg.timestep_respacing)
    except ValueError as exc:
        raise _bad(source, "timestep_respacing", cfg.timestep_respacing, str(exc)) from None


def load_config(path: str | Path | None) -> ModelConfig:
    """Read a RePaint / guided-diffusion YAML file; ``None`` gives the built-in CAMUS default."""
    if path is None:
        return CAMUS
    return from_dict(_read_yaml(path), source=str(path))


def _read_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FxpassError(f"{p}: config file not found")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise FxpassError(f"{p}: {p.stat().st_size:,} bytes, not a config file (at most {MAX_CONFIG_BYTES:,})")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, *PARSE_ERRORS) as exc:
        reason = parse_reason(exc) if not isinstance(exc, yaml.YAMLError) else first_line(exc, 200)
        raise FxpassError(f"{p}: not a readable YAML file ({reason})") from None
    if data is None:
        raise FxpassError(f"{p}: config file is empty")
    if not isinstance(data, dict):
        raise FxpassError(f"{p}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def build_model(cfg: ModelConfig, *, fp16: bool = False):
    """Construct the U-Net for ``cfg`` in eval mode (float32 unless ``fp16``)."""
    from types import SimpleNamespace

    from .models.unet import UNetModel

    model = UNetModel(
        image_size=cfg.image_size,
        in_channels=3,
        model_channels=cfg.num_channels,
        out_channels=cfg.out_channels,
        num_res_blocks=cfg.num_res_blocks,
        attention_resolutions=cfg.attention_ds,
        dropout=cfg.dropout,
        channel_mult=cfg.channel_mults,
        num_classes=cfg.num_classes,
        use_checkpoint=cfg.use_checkpoint,
        use_fp16=fp16,
        num_heads=cfg.num_heads,
        num_head_channels=cfg.num_head_channels,
        num_heads_upsample=cfg.num_heads_upsample,
        use_scale_shift_norm=cfg.use_scale_shift_norm,
        resblock_updown=cfg.resblock_updown,
        use_new_attention_order=cfg.use_new_attention_order,
        conf=SimpleNamespace(diffusion_steps=cfg.diffusion_steps),
    )
    if fp16:
        model.convert_to_fp16()
    return model.eval()


def resolve_config(path: str | Path | None, carried: dict[str, Any] | None = None, source: str = "model", *,
                   architecture: bool = True) -> ModelConfig:
    """``--config`` if given, else the config a lowered model carries in its metadata, else built-in CAMUS.
    ``architecture=False``: for a user's own class (only the size and schedule are checked)."""
    if path:
        return load_config(path) if architecture else user_class_config(path)
    if carried is not None:
        return from_dict(carried, source=f"{source} config", complete=True, architecture=architecture)
    return CAMUS
