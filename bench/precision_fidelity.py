"""The precision section's fidelity: every row's eps-MSE along t on the *trained* digits reference.

``fxpass/reference/digits.pt``, lowered with fxpass here, each row built from it as on the bench config
(:mod:`bench.precision_builds`): eps-MSE at every step of its 50-step schedule on held-out images
against the eager float32 model (:func:`fxpass.fidelity.eps_mse_along_t`), the worst ratio over t and
where.  Random weights say nothing about how a trained network's activations survive int8 or bf16; the
digits model does.  fxpass's int8 calibrates and measures its plan on the first held-out digits; the
eps-MSE is measured on the images after those.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .harness import short_error
from .precision_builds import Subject, build_all

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "fxpass" / "reference"
DIGITS_CHECKPOINT = REFERENCE_DIR / "digits.pt"
DIGITS_CONFIG = REFERENCE_DIR / "digits.yml"
HELDOUT_DIR = REFERENCE_DIR / "heldout"


def digits_subject(workdir: Path, threads: int, seed: int = 0) -> Subject:
    from fxpass.checkpoint import load_model
    from fxpass.config import load_config
    from fxpass.pipeline import lower_with_report

    cfg = load_config(DIGITS_CONFIG)
    model = load_model(DIGITS_CHECKPOINT, config=cfg).float().eval()
    lowered = lower_with_report(model, config=cfg)
    return Subject("digits", model, lowered.model, cfg, list(lowered.model_timesteps), workdir, threads, seed,
                   calibration_data=HELDOUT_DIR)


def int8_images_used() -> int:
    """How many of the first held-out images fxpass's int8 reads (calibration + its plan's evaluation) with
    its default options: the eps-MSE is measured on the images after them."""
    try:
        from fxpass.precision import Int8Options

        options = Int8Options()
        return int(options.calibration_samples) + int(getattr(options, "eval_samples", 0))
    except Exception:  # not in this checkout, or another Int8Options: the count of the current defaults
        return 8


def run_fidelity(keys, subject: Subject, images: int, log: Callable[[str], None]) -> dict[str, Any]:
    """eps-MSE of every row vs the eager float32 model on ``images`` held-out digits, every step."""
    from fxpass.denoisers import TorchDenoiser
    from fxpass.diffusion import Diffusion
    from fxpass.fidelity import eps_mse_along_t, summarize
    from fxpass.images import load_image_dir

    skip = int8_images_used() if subject.calibration_data is not None else 0
    x0 = load_image_dir(HELDOUT_DIR, subject.image_size, skip + images)[skip:]
    diffusion = Diffusion.from_config(subject.cfg)
    built, problems = build_all([k for k in keys if k != "eager"], subject, log)
    failed: dict[str, str] = {}
    spent: dict[str, float] = {}

    def guarded(key: str, fn):
        def call(x, t_index):
            if key not in failed:
                start = time.perf_counter()
                try:
                    return fn(x, t_index)
                except Exception as exc:
                    failed[key] = short_error(exc)
                finally:
                    spent[key] = spent.get(key, 0.0) + time.perf_counter() - start
            return np.full((x.shape[0], diffusion.out_channels, *x.shape[2:]), np.nan, dtype=np.float32)
        return call

    denoisers = {"eager": TorchDenoiser(subject.model, diffusion, subject.model_timesteps)}
    denoisers.update({k: guarded(k, v.denoiser()) for k, v in built.items()})
    log(f"precision: digits eps-MSE: {len(denoisers) - 1} rows × {diffusion.num_steps} steps × {x0.shape[0]} images ...")
    start = time.perf_counter()
    rows = eps_mse_along_t(denoisers, x0, diffusion, reference="eager", seed=subject.seed,
                           progress=lambda done, total: log(f"precision: digits eps-MSE step {done}/{total}")
                           if done % 10 == 0 or done == total else None)
    seconds = time.perf_counter() - start
    summary = summarize(rows)
    out: dict[str, Any] = {"eager": {"reference": True, "mean_eps_mse": summary["mean_eps_mse"]["eager"]}}
    for key in keys:
        if key == "eager":
            continue
        if key in problems:
            out[key] = problems[key]
        elif key in failed:
            out[key] = {"error": failed[key], "build": built[key].build}
        else:
            out[key] = {**fidelity_stats(rows, key), "mean_eps_mse": summary["mean_eps_mse"][key],
                        "eval_s": spent.get(key), "build": built[key].build}
    return {"rows": out, "eps_s": seconds, "first_image": skip, "per_t": [{"t_index": r["t_index"], "timestep": r["timestep"],
                                                      "eps_mse": r["eps_mse"]} for r in rows]}


def fidelity_stats(rows: list[dict], key: str) -> dict[str, Any]:
    """A row's eps-MSE ratio to the reference over t: the worst (farthest from 1, as
    :func:`fxpass.fidelity.summarize` picks it), the largest and the mean, each with where."""
    ratios = [(r["ratio"][key], r["t_index"], r["timestep"]) for r in rows]
    worst = max(ratios, key=lambda v: abs(v[0] - 1.0))
    largest = max(ratios, key=lambda v: v[0])
    return {"worst_ratio": worst[0], "t_index": worst[1], "timestep": worst[2],
            "max_ratio": largest[0], "max_ratio_t_index": largest[1],
            "mean_ratio": float(np.mean([v[0] for v in ratios])), "steps": len(ratios)}
