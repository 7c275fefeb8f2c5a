"""Library checkpoints as they are saved: a diffusers model folder and the scheduler config beside it.

A diffusers model folder holds ``config.json`` (``_class_name``: the diffusers model class, and its
constructor's arguments) and ``diffusion_pytorch_model.safetensors`` (or ``.bin``); a pipeline folder
holds ``model_index.json`` and the model in ``unet/``.  :func:`model_folder` finds the model folder,
:func:`load_folder` builds the class diffusers names (only a diffusers ``ModelMixin`` class: nothing the
folder names outside diffusers is imported, no code in the folder runs) with diffusers' own
``from_pretrained`` (local files only), and :func:`folder_config` reads the schedule: the scheduler
config beside the model (``scheduler_config.json`` in the folder, or ``scheduler/scheduler_config.json``
in the pipeline folder) gives the number of training steps, the betas (``beta_schedule``,
``beta_start``, ``beta_end``) and what the model predicts (``prediction_type``), recorded in the
lowered file's metadata and honoured by ``sample`` / ``evaluate`` (:meth:`fxpass.diffusion.Diffusion.as_eps`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import MAX_CONFIG_BYTES, PARSE_ERRORS, FxpassError, parse_reason

SCHEDULER_FILE = "scheduler_config.json"
#: diffusers' beta_schedule → fxpass's noise_schedule (squaredcos_cap_v2 is guided-diffusion's cosine)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise FxpassError(f"{path}: {size:,} bytes, not a config (at most {MAX_CONFIG_BYTES:,})")
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise FxpassError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    except PARSE_ERRORS as exc:
        raise FxpassError(f"{path}: not valid JSON ({parse_reason(exc)})") from None
    if not isinstance(value, dict):
        raise FxpassError(f"{path}: expected a JSON object")
    return value


def model_folder(path: str | Path | None) -> Path | None:
    """The diffusers model folder ``path`` is (a folder with a ``config.json`` naming ``_class_name``) or
    holds (a pipeline folder's ``unet/``); None for anything else (a file, a folder of something else)."""
    if path is None:
        return None
    path = Path(path)
    try:
        if not path.is_dir():
            return None
        for folder in (path, path / "unet"):
            config = folder / "config.json"
            if config.is_file() and "_class_name" in _read_json(config):
                return folder
    except OSError:
        return None
    return None


def class_name(folder: Path) -> str:
    name = _read_json(folder / "config.json").get("_class_name")
    if not isinstance(name, str) or not name.isidentifier():
        raise FxpassError(f"{folder / 'config.json'}: _class_name {name!r} is not a class name")
    return name


def load_folder(folder: Path, *, allow_nonfinite: bool = False):
    """The diffusers model of ``folder``, its weights loaded by diffusers, float32, eval mode."""
    try:
        import diffusers
    except ImportError:
        raise FxpassError(f"{folder}: a diffusers model folder needs diffusers: pip install diffusers") from None
    name = class_name(folder)
    cls = getattr(diffusers, name, None)
    if not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        raise FxpassError(f"{folder / 'config.json'}: _class_name {name} is not a diffusers model class")
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    except Exception as exc:  # diffusers' own reasons: a missing weights file, a config its class refuses
        from .errors import first_line

        raise FxpassError(f"{folder}: diffusers cannot load this {name} ({type(exc).__name__}: "
                          f"{first_line(exc)[:300]})") from None
    if not allow_nonfinite:
        from .checkpoint import _refuse_nonfinite

        _refuse_nonfinite(model.state_dict().items(), folder)
    import torch

    torch.nn.Module.float(model)
    torch.nn.Module.train(model, False)
    return model


def scheduler_file(folder: Path) -> Path | None:
    """The scheduler config beside the model: in its folder, or in its pipeline's ``scheduler/``."""
    for candidate in (folder / SCHEDULER_FILE, folder.parent / "scheduler" / SCHEDULER_FILE,
                      folder / "scheduler" / SCHEDULER_FILE):
        if candidate.is_file():
            return candidate
    return None


def schedule_values(path: Path) -> dict[str, Any]:
    """fxpass config keys of a diffusers scheduler config (refused in one line where fxpass cannot
    reproduce its betas)."""
    cfg = _read_json(path)
    steps = cfg.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise FxpassError(f"{path}: num_train_timesteps must be a positive integer (got {steps!r})")
    if cfg.get("trained_betas") is not None:
        raise FxpassError(f"{path}: trained_betas (an explicit beta list) is not supported; fxpass reproduces "
                          f"the {', '.join(BETA_SCHEDULES)} schedules")
    schedule = cfg.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise FxpassError(f"{path}: beta_schedule {schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")
    values: dict[str, Any] = {"diffusion_steps": steps, "noise_schedule": BETA_SCHEDULES[schedule],
                              "prediction_type": cfg.get("prediction_type", "epsilon"),
                              "learn_sigma": cfg.get("variance_type") in ("learned", "learned_range")}
    if schedule != "squaredcos_cap_v2":
        values["beta_start"] = cfg.get("beta_start", 0.0001)
        values["beta_end"] = cfg.get("beta_end", 0.02)
    return values


def folder_config(folder: Path, *, timestep_respacing: str | None = None, image_size: int | None = None,
                  diffusion_steps: int | None = None):
    """The :class:`~fxpass.config.ModelConfig` of a diffusers model folder: its scheduler config's
    schedule, the respacing asked for, the image size from ``sample_size`` (or ``image_size``)."""
    from .config import from_dict

    sched = scheduler_file(folder)
    if sched is None and diffusion_steps is None:
        raise FxpassError(f"{folder}: no {SCHEDULER_FILE} beside the model (nor in ../scheduler/); fxpass needs "
                          "its diffusion schedule: add it, or pass --diffusion-steps N")
    values = schedule_values(sched) if sched is not None else {"diffusion_steps": diffusion_steps}
    if diffusion_steps is not None and diffusion_steps != values["diffusion_steps"]:
        raise FxpassError(f"--diffusion-steps {diffusion_steps}: {sched} says num_train_timesteps "
                          f"{values['diffusion_steps']}")
    values["timestep_respacing"] = timestep_respacing or ""
    size = image_size or _sample_size(folder)
    if size is None:
        raise FxpassError(f"{folder / 'config.json'}: no square sample_size; pass --image-size N")
    values["image_size"] = size
    values["model_class"] = f"diffusers:{class_name(folder)}"
    return from_dict(values, source=str(sched or folder / "config.json"), architecture=False)


def _sample_size(folder: Path) -> int | None:
    return square_side(_read_json(folder / "config.json").get("sample_size"))


def square_side(value) -> int | None:
    """The side of a square image size given as a positive int or an equal pair (diffusers' ``sample_size``)."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
