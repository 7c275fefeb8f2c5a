"""RePaint (Lugmayr et al., "RePaint: Inpainting using Denoising Diffusion Probabilistic Models",
CVPR 2022) over guided-diffusion's ancestral step (Dhariwal & Nichol, "Diffusion Models Beat GANs on
Image Synthesis", NeurIPS 2021).

The schedule is a pass down the respaced schedule that jumps ``jump_length`` steps back up
``jump_n_sample - 1`` times at every ``jump_length``-th step; a step up is forward noising
q(x_{t+1} | x_t).  Known pixels enter x_t: before every model call but the first, they are replaced
by the ground truth noised to the current step, q(x_t | x_0) (RePaint's ``inpa_inj_sched_prev``).
A step is p(x_{t-1} | x_t) with the model's variance (learned range or fixed), x0 clipped to [-1, 1].
With ``jump_n_sample=1`` and no known pixels it is plain DDPM (Ho et al., NeurIPS 2020).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..diffusion import Diffusion
from .base import Known, Move, NoiseSource, Sampler, check_calls, q_known


def jump_points(t_T: int, jump_length: int, below: int | None = None) -> range:
    """Where the walk jumps back up: every ``jump_length``-th index below ``t_T - jump_length`` (and below
    ``below``, where given: resampling only at the lowest noise levels)."""
    top = t_T - jump_length if below is None else min(t_T - jump_length, below)
    return range(0, max(top, 0), jump_length)


def jump_model_calls(t_T: int, jump_length: int = 10, jump_n_sample: int = 10, below: int | None = None) -> int:
    """Model calls of :func:`jump_schedule` without building it: each jump point adds
    ``(jump_n_sample - 1) * jump_length`` calls to the plain descent's ``t_T``."""
    for name, value in (("t_T", t_T), ("jump_length", jump_length), ("jump_n_sample", jump_n_sample),
                        *((("below", below),) if below is not None else ())):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return t_T + len(jump_points(t_T, jump_length, below)) * (jump_n_sample - 1) * jump_length


def jump_schedule(t_T: int, jump_length: int = 10, jump_n_sample: int = 10, below: int | None = None) -> list[int]:
    """RePaint's time indices: from ``t_T - 1`` down to ``-1`` with jumps back up.

    Every index ``j`` in ``range(0, t_T - jump_length, jump_length)`` is a jump point: the first
    ``jump_n_sample - 1`` times the walk reaches it going down, it climbs back ``jump_length``
    steps one at a time.  A step down from ``t`` is a model call at ``t``; a step up to ``t`` is
    forward noising with beta_t.  ``jump_n_sample=1`` gives the plain descent; ``below`` keeps only the
    jump points under that index.
    """
    calls = jump_model_calls(t_T, jump_length, jump_n_sample, below)
    check_calls(calls, f"t_T {t_T}, jump_length {jump_length}, jump_n_sample {jump_n_sample}")
    left = {j: jump_n_sample - 1 for j in jump_points(t_T, jump_length, below)}
    times: list[int] = []
    t = t_T
    while t > 0:
        t -= 1
        times.append(t)
        if left.get(t, 0) > 0:
            left[t] -= 1
            times.extend(range(t + 1, t + jump_length + 1))
            t += jump_length
    times.append(-1)
    return times


def check_times(times: Sequence[int], num_steps: int) -> None:
    """A RePaint schedule: starts going down, moves by one step at a time, ends at -1, in range."""
    if len(times) < 2 or times[-1] != -1 or times[1] >= times[0]:
        raise ValueError("a schedule must start going down and end at -1")
    if any(abs(a - b) != 1 for a, b in zip(times[:-1], times[1:])):
        raise ValueError("a schedule moves by one step at a time")
    if max(times) >= num_steps:
        raise ValueError(f"schedule reaches index {max(times)}, the diffusion has {num_steps} steps")


class RePaint(Sampler):
    """RePaint over a schedule of time indices (:func:`jump_schedule`'s, or any +-1 walk to -1)."""

    name = "repaint"

    def __init__(self, diffusion: Diffusion, times: Sequence[int], *, inject: bool = True):
        times = [int(t) for t in times]
        check_times(times, diffusion.num_steps)
        super().__init__(diffusion, [Move(a, b) for a, b in zip(times[:-1], times[1:])])
        self.inject = inject

    @classmethod
    def jumps(cls, diffusion: Diffusion, t_T: int | None = None, jump_length: int = 10,
              jump_n_sample: int = 10, *, inject: bool = True) -> "RePaint":
        t_T = diffusion.num_steps if t_T is None else t_T
        return cls(diffusion, jump_schedule(t_T, jump_length, jump_n_sample), inject=inject)

    def model_input(self, x, move: Move, known: Known | None, noise: NoiseSource, first: bool):
        return q_known(self.diffusion, known if self.inject else None, x, move.t, noise, first)

    def step(self, x, model_out, move: Move, known: Known | None, z):
        return self.diffusion.p_step(model_out, x, move.t, z)

    def jump(self, x, move: Move, noise: NoiseSource):
        if move.to != move.t + 1:
            raise ValueError(f"RePaint climbs one step at a time, not {move.t} -> {move.to}")
        return self.diffusion.forward_step(x, move.to, noise.normal(x.shape))
