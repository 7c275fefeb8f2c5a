"""DiffPIR (Zhu, Zhang, Liang, Cao, Wen, Timofte & Van Gool, "Denoising Diffusion Models for
Plug-and-Play Image Restoration", CVPR workshops 2023) for inpainting, with DDNM's time travel and an
optional start from the known pixels.

At every model call: x0 is predicted from the model's eps (clipped to [-1, 1]); the data step for a
noiseless mask is the limit of the paper's closed form as the measurement noise goes to 0, the known
pixels pasted into x0 (x0 <- mask * gt + (1 - mask) * x0, as DDNM's projection); then the walk goes to
the next level s by the paper's re-noising,

    x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s) (sqrt(1 - zeta) eps_hat + sqrt(zeta) z),
    eps_hat = (x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t)

(eps_hat is the noise the data-step x0 implies).  zeta = 1 (the default) re-noises with fresh noise only:
each level's x is the projected x0 forward-noised to that level.  The last step returns the projected
x0.  Time travel is DDNM's (:func:`fxpass.samplers.ddim.skip_plan`): jumps back up by forward noising.

``init="fill"`` starts the walk from the known pixels instead of pure noise (Chung, Sim & Ye, "Come-Closer-
Diffuse-Faster", CVPR 2022): the start x is q(x_{t_T} | fill), the image with every unknown pixel set to
the mean colour of the known ones, noised to the top level with the run's first noise draw.  Without
known pixels (generation) it starts from pure noise.
"""

from __future__ import annotations

import math

import numpy as np

from ..diffusion import Diffusion
from .base import Known, Move, NoiseSource
from .ddim import alpha_bar, eps_and_x0
from .ddnm import DDNM

#: where the walk starts: pure noise, or the mean-colour fill of the known pixels noised to the top level
INITS = ("noise", "fill")


def check_zeta(zeta: float) -> float:
    zeta = float(zeta)
    if not 0.0 <= zeta <= 1.0:  # also refuses nan
        raise ValueError(f"--zeta {zeta:g} is outside [0, 1]")
    return zeta


def check_init(init: str) -> str:
    if init not in INITS:
        raise ValueError(f"--init {init!r}: expected one of {', '.join(INITS)}")
    return init


def mean_fill(known: Known) -> np.ndarray:
    """The known pixels, every unknown pixel the mean colour (per image and channel) of the known ones."""
    keep = known.keep >= 0.5
    count = keep.sum(axis=(2, 3), keepdims=True)
    if (count == 0).any():
        raise ValueError("the mask has no known pixels to start from (--init fill)")
    colour = np.where(keep, known.gt, 0.0).sum(axis=(2, 3), keepdims=True) / count
    return np.where(keep, known.gt, colour).astype(np.float32)


class DiffPIR(DDNM):
    """DiffPIR over ``steps`` evenly spaced levels (of the ``t_T`` lowest) with re-noising weight ``zeta``,
    DDNM's time travel, and a start from ``init`` (``noise`` or ``fill``)."""

    name = "diffpir"

    def __init__(self, diffusion: Diffusion, steps: int | None = None, zeta: float = 1.0, *,
                 travel_length: int = 1, travel_repeat: int = 1, t_T: int | None = None,
                 travel_below: int | None = None, init: str = "noise"):
        super().__init__(diffusion, steps, 1.0, travel_length=travel_length, travel_repeat=travel_repeat,
                         t_T=t_T, travel_below=travel_below)
        self.zeta = check_zeta(zeta)
        self.init = check_init(init)

    def model_input(self, x, move: Move, known: Known | None, noise: NoiseSource, first: bool):
        if not first or known is None or self.init == "noise":
            return x
        ab = alpha_bar(self.diffusion, move.t)  # x is the run's first draw: pure noise
        return np.float32(math.sqrt(ab)) * mean_fill(known) + np.float32(math.sqrt(1.0 - ab)) * x

    def step(self, x, model_out, move: Move, known: Known | None, z):
        _, x0 = eps_and_x0(self.diffusion, x, model_out, move.t)
        if known is not None:
            x0 = known.paste(known.gt, x0)
        if move.to < 0:
            return x0, x0
        ab_s = alpha_bar(self.diffusion, move.to)
        noise = z if self.zeta == 1.0 else (
            np.float32(math.sqrt(1.0 - self.zeta)) * self.diffusion.predict_eps(x, move.t, x0)
            + np.float32(math.sqrt(self.zeta)) * z)
        return np.float32(math.sqrt(ab_s)) * x0 + np.float32(math.sqrt(1.0 - ab_s)) * noise, x0
