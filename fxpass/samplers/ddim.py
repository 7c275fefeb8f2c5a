"""DDIM (Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021): skip-step sampling
over any subset of the lowered schedule.

``steps`` evenly spaced t_index values, the top (``t_T - 1``, by default ``num_steps - 1``) and 0
included (:func:`skip_levels`); one model call per level.  The step from level t to the next lower level s
(s = -1: the clean image, alpha_bar 1) is DDIM's generalized update, eq. 12 of the paper:

    x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s)

with x0 predicted from eps and clipped to [-1, 1], and eps re-derived from the clipped x0 (as
guided-diffusion's ``ddim_sample`` does).  eta = 0 is deterministic DDIM; eta = 1 over every step is
ancestral sampling with the posterior variance (DDPM's "fixed small").  For inpainting the known
pixels enter x_t as RePaint does (q(x_t | gt) before every call but the first), and the clean image
is composited with the ground truth (q(x_{-1} | gt) = gt); ``inject=False`` turns both off.
"""

from __future__ import annotations

import math

import numpy as np

from ..diffusion import Diffusion
from .base import Known, Move, NoiseSource, Sampler, check_calls, moves_over, q_known
from .repaint import jump_model_calls, jump_schedule


def positive_knob(flag: str, value) -> int:
    """``value`` as a positive integer; ValueError naming ``flag`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    return int(value)


def skip_levels(num_steps: int, steps: int | None = None, t_T: int | None = None) -> list[int]:
    """``steps`` t_index values evenly spaced over ``0..t_T - 1`` (``t_T`` None: the whole table of
    ``num_steps``), both ends included (just the top for one step), increasing; all of them for ``None``."""
    top_levels = num_steps if t_T is None else positive_knob("--t-T", t_T)
    if top_levels > num_steps:
        raise ValueError(f"--t-T {top_levels} is more than the model's {num_steps} respaced steps")
    steps = top_levels if steps is None else positive_knob("--steps", steps)
    if steps > top_levels:
        raise ValueError(f"--steps {steps} is more than the model's {num_steps} respaced steps" if t_T is None
                         else f"--steps {steps} is more than --t-T {top_levels}")
    if steps == 1:
        return [top_levels - 1]
    top, gaps = top_levels - 1, steps - 1
    return [(2 * k * top + gaps) // (2 * gaps) for k in range(steps)]  # k * top / gaps, rounded half up


def check_eta(eta: float) -> float:
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:  # also refuses nan
        raise ValueError(f"--eta {eta:g} is outside [0, 1]")
    return eta


def skip_plan(num_steps: int, steps: int | None, travel_length: int = 1, travel_repeat: int = 1,
              t_T: int | None = None, travel_below: int | None = None) -> list[Move]:
    """The moves over :func:`skip_levels`: the descent, with DDNM's time travel when ``travel_repeat``
    > 1 (RePaint's jump schedule over the levels: at every ``travel_length``-th level, back up
    ``travel_length`` levels, ``travel_repeat - 1`` times; with ``travel_below`` only at the levels
    below that position, the least noisy ones)."""
    levels = skip_levels(num_steps, steps, t_T)
    for flag, value in (("--travel-length", travel_length), ("--travel-repeat", travel_repeat),
                        *((("--travel-below", travel_below),) if travel_below is not None else ())):
        positive_knob(flag, value)
    calls = jump_model_calls(len(levels), travel_length, travel_repeat, travel_below)
    check_calls(calls, f"steps {len(levels)}, travel_length {travel_length}, travel_repeat {travel_repeat}")
    return moves_over(levels, jump_schedule(len(levels), travel_length, travel_repeat, travel_below))


def alpha_bar(diffusion: Diffusion, t: int) -> float:
    """alpha_bar at t_index ``t``; 1 at -1 (the clean image)."""
    return 1.0 if t < 0 else float(diffusion.alphas_cumprod[t])


def ddim_update(diffusion: Diffusion, x0: np.ndarray, eps: np.ndarray, move: Move, eta: float,
                z: np.ndarray) -> np.ndarray:
    """x at ``move.to`` from x0 and eps at ``move.t`` by DDIM's eq. 12 with sigma(eta); x0 itself
    at -1."""
    if move.to < 0:
        return x0
    ab_t, ab_s = alpha_bar(diffusion, move.t), alpha_bar(diffusion, move.to)
    sigma = eta * math.sqrt((1.0 - ab_s) / (1.0 - ab_t)) * math.sqrt(1.0 - ab_t / ab_s)
    c_eps = math.sqrt(max(1.0 - ab_s - sigma * sigma, 0.0))
    return np.float32(math.sqrt(ab_s)) * x0 + np.float32(c_eps) * eps + np.float32(sigma) * z


def renoise(diffusion: Diffusion, x: np.ndarray, move: Move, noise: NoiseSource) -> np.ndarray:
    """Forward noising from level ``move.t`` up to ``move.to``, q(x_to | x_t), through the product of
    the alphas between them: sqrt(ab_to / ab_t) x + sqrt(1 - ab_to / ab_t) z."""
    ratio = alpha_bar(diffusion, move.to) / alpha_bar(diffusion, move.t)
    return np.float32(math.sqrt(ratio)) * x + np.float32(math.sqrt(1.0 - ratio)) * noise.normal(x.shape)


def eps_and_x0(diffusion: Diffusion, x: np.ndarray, model_out: np.ndarray, t: int):
    """(the model's eps, x0 predicted from it and clipped to [-1, 1]) at ``t``; a learned variance is
    ignored."""
    diffusion.check_output(model_out, x)
    eps = model_out[:, :x.shape[1]]
    return eps, np.clip(diffusion.predict_xstart(x, t, eps), -1.0, 1.0)


class DDIM(Sampler):
    """DDIM with eta over ``steps`` evenly spaced levels of the lowered schedule (of its ``t_T`` lowest)."""

    name = "ddim"

    def __init__(self, diffusion: Diffusion, steps: int | None = None, eta: float = 0.85, *, inject: bool = True,
                 t_T: int | None = None):
        super().__init__(diffusion, skip_plan(diffusion.num_steps, steps, t_T=t_T))
        self.eta = check_eta(eta)
        self.inject = inject

    def model_input(self, x, move: Move, known: Known | None, noise: NoiseSource, first: bool):
        return q_known(self.diffusion, known if self.inject else None, x, move.t, noise, first)

    def step(self, x, model_out, move: Move, known: Known | None, z):
        d = self.diffusion
        _, x0 = eps_and_x0(d, x, model_out, move.t)
        eps = d.predict_eps(x, move.t, x0)
        x_next = ddim_update(d, x0, eps, move, self.eta, z)
        if move.to < 0 and known is not None and self.inject:
            x_next = known.paste(known.gt, x_next)
        return x_next, x0
