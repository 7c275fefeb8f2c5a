"""RePaint inpainting and plain DDPM sampling loops, with NumPy alone (no torch, no runtime).

The model is any :class:`Denoiser`, a callable

    model(x: float32 [N, C, H, W], t_index: int64 [N]) -> float32 [N, 2C or C, H, W]

where ``t_index`` indexes the respaced schedule (0 = least noisy); ``fxpass.denoisers`` has one for
ONNX Runtime, and any other runtime plugs in the same way.  The maths of one step live in
:mod:`fxpass.diffusion`.

The loop and the schedules live in :mod:`fxpass.samplers` (RePaint in :mod:`fxpass.samplers.repaint`,
with DDIM and DDNM beside it); this module keeps the names the rest of fxpass uses.

The maths follows guided-diffusion's Gaussian diffusion (epsilon prediction, learned-range or fixed
variance, x0 clipped to [-1, 1]) on the respaced betas, and RePaint's resampling schedule: a pass
down the schedule that jumps ``jump_length`` steps back up ``jump_n_sample - 1`` times at every
``jump_length``-th step, each step up being forward noising q(x_{t+1} | x_t).  Before every model
call but the first, the known pixels (mask 1) of the current image are replaced by the ground truth
noised to the current step, q(x_t | x_0) (RePaint's ``inpa_inj_sched_prev``).

All randomness comes from a :class:`NoiseSource`, drawn in a fixed order that does not depend on
the model's outputs, so that one seed gives one image and two runs can be fed the very same noise:
the start image, then per model call the step noise followed (when injecting) by the ground-truth
noise, and one draw per step up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .diffusion import Diffusion, Model
from .samplers.base import MAX_MODEL_CALLS, NoiseSource, Progress, run_plan  # noqa: F401  (re-exported)
from .samplers.repaint import RePaint, jump_model_calls, jump_schedule  # noqa: F401  (re-exported)


class Denoiser(Protocol):
    """What the loops call: a table-mode model and the diffusion it was lowered for."""

    diffusion: Diffusion
    image_size: int

    def __call__(self, x: np.ndarray, t_index: np.ndarray) -> np.ndarray: ...


# ---- RePaint's resampling schedule (fxpass.samplers.repaint) -------------------------------
def descent_schedule(num_steps: int) -> list[int]:
    """The plain reverse pass ``num_steps - 1, ..., 0, -1`` (DDPM)."""
    return list(range(num_steps - 1, -2, -1))


def count_model_calls(times: Sequence[int]) -> int:
    """Model calls a schedule makes: one per step down."""
    return sum(1 for a, b in zip(times[:-1], times[1:]) if b < a)


# ---- randomness ----------------------------------------------------------------------------
class GeneratorNoise:
    """Noise from one ``np.random.Generator`` (seeded with an int, or one you pass)."""

    def __init__(self, seed: int | np.random.Generator = 0):
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def normal(self, shape):
        return self.rng.standard_normal(tuple(shape), dtype=np.float32)


class RecordingNoise:
    """Passes another source's draws through and keeps a copy of each, in order."""

    def __init__(self, source: NoiseSource):
        self.source = source
        self.draws: list[np.ndarray] = []

    def normal(self, shape):
        a = np.asarray(self.source.normal(shape), dtype=np.float32)
        self.draws.append(a.copy())
        return a


class ReplayNoise:
    """Hands back pre-drawn arrays in order (e.g. ``RecordingNoise.draws`` of another run)."""

    def __init__(self, draws: Sequence[np.ndarray]):
        self.draws = [np.asarray(d, dtype=np.float32) for d in draws]
        self.used = 0

    def normal(self, shape):
        if self.used >= len(self.draws):
            raise ValueError(f"replayed noise exhausted after {self.used} draws")
        a = self.draws[self.used]
        if a.shape != tuple(shape):
            raise ValueError(f"replayed draw {self.used} has shape {a.shape}, the sampler asks for {tuple(shape)}")
        self.used += 1
        return a.copy()

    @property
    def remaining(self) -> int:
        return len(self.draws) - self.used


# ---- the loops -----------------------------------------------------------------------------
def sample_loop(model: Model, diffusion: Diffusion, times: Sequence[int], shape: tuple[int, ...], *,
                noise: NoiseSource, gt: np.ndarray | None = None, mask: np.ndarray | None = None,
                inpa_inj_sched_prev: bool = True, on_step: Progress | None = None) -> np.ndarray:
    """Walk ``times`` (RePaint's schedule: steps of +-1 ending at -1) from pure noise to x0.

    With ``gt`` and ``mask`` (1 = known pixel to keep, broadcastable to ``shape``) and
    ``inpa_inj_sched_prev``, every model call but the first sees the known pixels replaced by
    q(x_t | gt).  ``on_step(done, total)`` is called after each model call.
    """
    sampler = RePaint(diffusion, times, inject=inpa_inj_sched_prev)
    return run_plan(sampler, model, shape, noise=noise, gt=gt, mask=mask, on_step=on_step)


def repaint(model: Model, diffusion: Diffusion, gt: np.ndarray, mask: np.ndarray, *, noise: NoiseSource,
            t_T: int | None = None, jump_length: int = 10, jump_n_sample: int = 10,
            inpa_inj_sched_prev: bool = True, on_step: Progress | None = None) -> np.ndarray:
    """Inpaint ``gt`` [N, 3, H, W] in [-1, 1] where ``mask`` is 0, keeping it where ``mask`` is 1."""
    gt = np.asarray(gt, dtype=np.float32)
    times = jump_schedule(diffusion.num_steps if t_T is None else t_T, jump_length, jump_n_sample)
    return sample_loop(model, diffusion, times, gt.shape, noise=noise, gt=gt, mask=mask,
                       inpa_inj_sched_prev=inpa_inj_sched_prev, on_step=on_step)


def ddpm(model: Model, diffusion: Diffusion, shape: tuple[int, ...], *, noise: NoiseSource,
         on_step: Progress | None = None) -> np.ndarray:
    """Plain generation over the whole respaced schedule: no resampling, no mask."""
    return sample_loop(model, diffusion, descent_schedule(diffusion.num_steps), shape, noise=noise,
                       on_step=on_step)
