"""Timestep-aware sample sets for int8: calibration inputs and the evaluation set a plan is judged on.

A diffusion U-Net sees very different activations along the schedule: at small t its input is an image
with faint noise, at large t almost pure noise.  Ranges calibrated on random inputs (or on one t) clip
or waste the int8 grid for the others, so every set here spans the schedule:

* from data (``--calibration-data DIR``): images x0 noised by the forward process,
  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, at ``steps`` spread over the schedule;
* without data: the model's own deterministic (DDIM, eta 0) trajectories from pure noise, visiting the
  same steps; their final predictions x0 then stand in for data in the evaluation set.

The evaluation set keeps the true eps of every x_t, so a variant is scored by the task metric: its
eps-MSE against the true noise relative to the float32 model's, per t_index (:mod:`fxpass.fidelity`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Run = Callable[[dict], np.ndarray]  # a feed -> the model's output (first C channels: eps)


@dataclass
class Sample:
    """One model input of an evaluation set, and the true noise its x was made with."""

    feed: dict[str, np.ndarray]
    t_index: int
    eps: np.ndarray


def extra_inputs(specs, count: int, seed: int, num_classes: int) -> list[dict[str, np.ndarray]]:
    """Per sample, the inputs other than ``x`` and ``t_index`` (class labels, conditioning images),
    seeded and held fixed across steps and variants."""
    from ..inputs import seeded_feeds

    others = [s for s in specs if s.name not in ("x", "t_index")]
    if not others:
        return [{} for _ in range(count)]
    feeds = seeded_feeds(others, seed=seed, timesteps=[0], model_timesteps=[0], count=count, batch=1,
                         num_classes=num_classes).feeds
    return [dict(f) for f in feeds]


def noised(x0: np.ndarray, diffusion, steps: Sequence[int], extras: Sequence[dict], seed: int) -> list[Sample]:
    """Each image noised to each of ``steps`` with its own seeded eps (batch 1 feeds)."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(x0.shape[0]):
        for i in steps:
            eps = rng.standard_normal((1, *x0.shape[1:]), dtype=np.float32)
            x_t = np.asarray(diffusion.q_sample(x0[j:j + 1], int(i), eps), dtype=np.float32)
            out.append(Sample({"x": x_t, "t_index": np.array([i], np.int64), **extras[j]}, int(i), eps))
    return out


def trajectories(run: Run, diffusion, steps: Sequence[int], shape: tuple[int, ...], extras: Sequence[dict],
                 seed: int) -> tuple[list[dict], np.ndarray]:
    """Deterministic DDIM trajectories (eta 0) from seeded pure noise, one per entry of ``extras``,
    visiting ``steps`` from the last to the first.  Returns the feeds the model saw (calibration
    inputs) and the final predictions x0, clipped to [-1, 1], one per trajectory (batch 1 each)."""
    rng = np.random.default_rng(seed)
    order = sorted({int(i) for i in steps}, reverse=True)
    c = shape[1]
    feeds, finals = [], []
    for extra in extras:
        x = rng.standard_normal(shape, dtype=np.float32)
        x0 = x
        for k, i in enumerate(order):
            feed = {"x": x, "t_index": np.array([i], np.int64), **extra}
            feeds.append(feed)
            eps = np.asarray(run(feed), dtype=np.float32)[:, :c]
            x0 = np.clip(diffusion.predict_xstart(x, i, eps), -1.0, 1.0).astype(np.float32)
            if k + 1 < len(order):
                j = order[k + 1]
                x = (np.float32(diffusion.sqrt_alphas_cumprod[j]) * x0
                     + np.float32(diffusion.sqrt_one_minus_alphas_cumprod[j]) * eps).astype(np.float32)
        finals.append(x0)
    return feeds, np.concatenate(finals)

