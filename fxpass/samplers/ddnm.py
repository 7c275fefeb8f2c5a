"""DDNM (Wang, Yu & Zhang, "Zero-Shot Image Restoration Using Denoising Diffusion Null-Space Model",
ICLR 2023) for inpainting, over DDIM's skip-step update (Song et al., ICLR 2021).

At every model call the x0 predicted from eps (clipped to [-1, 1]) gets the range-null-space
projection of the mask operator A = A^+ = diag(mask): x0 <- A^+ y + (I - A^+ A) x0, that is
x0 <- mask * gt + (1 - mask) * x0, so the known pixels enter x0, not x_t.  The step to the next
level is DDIM's with sigma(eta) from that x0 and the model's eps (:func:`fxpass.samplers.ddim.ddim_update`);
the last step returns the projected x0, whose known pixels are the ground truth exactly.

Time travel (the paper's section 3.3): at every ``travel_length``-th level on the way down, the walk
jumps back up ``travel_length`` levels ``travel_repeat - 1`` times (RePaint's jump schedule over the
levels), each level up by forward noising of the current x_t through the product of the alphas
between the two levels, and walks down again.  ``travel_repeat=1`` is no time travel;
``travel_below=N`` travels only from the N least noisy walked levels (the rest is a plain descent).
"""

from __future__ import annotations

from ..diffusion import Diffusion
from .base import Known, Move, NoiseSource, Sampler
from .ddim import check_eta, ddim_update, eps_and_x0, renoise, skip_plan


class DDNM(Sampler):
    """DDNM over ``steps`` evenly spaced levels (of the ``t_T`` lowest), eta, and time travel
    (``travel_length``, ``travel_repeat``)."""

    name = "ddnm"

    def __init__(self, diffusion: Diffusion, steps: int | None = None, eta: float = 0.85, *,
                 travel_length: int = 1, travel_repeat: int = 1, t_T: int | None = None,
                 travel_below: int | None = None):
        super().__init__(diffusion, skip_plan(diffusion.num_steps, steps, travel_length, travel_repeat, t_T,
                                              travel_below))
        self.eta = check_eta(eta)
        self.travel_length, self.travel_repeat = travel_length, travel_repeat

    def step(self, x, model_out, move: Move, known: Known | None, z):
        eps, x0 = eps_and_x0(self.diffusion, x, model_out, move.t)
        if known is not None:
            x0 = known.paste(known.gt, x0)
        return ddim_update(self.diffusion, x0, eps, move, self.eta, z), x0

    def jump(self, x, move: Move, noise: NoiseSource):
        return renoise(self.diffusion, x, move, noise)
