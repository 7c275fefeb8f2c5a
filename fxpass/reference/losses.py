"""Torch training objective of a learned-variance guided-diffusion model (the "hybrid" loss).

The schedule tables come from fxpass's NumPy ``Diffusion`` (``fxpass.diffusion``; ``fxpass.sampler`` before) on the full, unrespaced betas
(``base_betas``), so training and fxpass's NumPy sampler share one definition of the maths.

Per example, with t uniform in [0, T):

    loss = mean over pixels (eps - eps_hat)^2  +  (T / 1000) * L_t

where L_t, in bits per dimension, is the term of the variational bound at t computed with the
model's mean built from a stop-gradient eps (so only the variance channels learn from it):

* t > 0: KL( q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t) ),
* t = 0: the negative log-likelihood of x_0 under the discretized Gaussian decoder (256 bins
  of width 2/255 on [-1, 1], the edge bins open-ended).

Since L_vlb = sum over the T steps of L_t = T * E_t[L_t], ``(T / 1000) * L_t`` is, in expectation,
lambda * L_vlb with lambda = 0.001: the L_hybrid of Nichol & Dhariwal, the same weighting as
guided-diffusion's ``hybrid`` loss.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..diffusion import Diffusion, base_betas


class Tables:
    """float32 torch copies of the unrespaced schedule, indexed by original timestep."""

    NAMES = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
             "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
             "posterior_log_variance_clipped", "log_betas", "alphas_cumprod")

    def __init__(self, noise_schedule: str = "linear", diffusion_steps: int = 1000):
        self.diffusion = Diffusion(base_betas(noise_schedule, diffusion_steps), learn_sigma=True)
        self.num_timesteps = diffusion_steps
        for name in self.NAMES:
            setattr(self, name, torch.from_numpy(np.asarray(getattr(self.diffusion, name), dtype=np.float32)))

    def at(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """table[t] shaped [N, 1, 1, 1]."""
        return getattr(self, name)[t].view(-1, 1, 1, 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.at("sqrt_alphas_cumprod", t) * x0 + self.at("sqrt_one_minus_alphas_cumprod", t) * noise


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_nll(x, mean, log_var, bin_half_width: float = 1.0 / 255.0):
    """-log P(x) for x in [-1, 1] under N(mean, e^log_var) integrated over x's bin, in nats.

    Bins of width 2 * bin_half_width around x; the lowest (x < -0.999) and highest (x > 0.999)
    bins extend to -inf and +inf.  Normal CDFs through ``torch.special.ndtr`` / ``log_ndtr``.
    """
    inv_std = torch.exp(-0.5 * log_var)
    upper = inv_std * (x - mean + bin_half_width)
    lower = inv_std * (x - mean - bin_half_width)
    log_below_upper = torch.special.log_ndtr(upper)          # log P(X < upper edge)
    log_above_lower = torch.special.log_ndtr(-lower)         # log P(X > lower edge)
    mass = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp_min(1e-12)
    log_p = torch.where(x < -0.999, log_below_upper, torch.where(x > 0.999, log_above_lower, torch.log(mass)))
    return -log_p


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def model_log_variance(tables: Tables, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Learned-range log variance: v = -1 the clipped posterior variance, v = 1 beta_t."""
    frac = (v + 1.0) / 2.0
    return frac * tables.at("log_betas", t) + (1.0 - frac) * tables.at("posterior_log_variance_clipped", t)


def hybrid_losses(tables: Tables, model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                  t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example ``mse``, ``vb`` (bits/dim, already times T/1000) and ``loss`` = mse + vb."""
    c = x0.shape[1]
    eps, v = model_out[:, :c], model_out[:, c:]
    mse = mean_flat((noise - eps) ** 2)

    # The variational-bound term with a frozen mean: only v gets its gradient.
    eps_frozen = eps.detach()
    pred_x0 = tables.at("sqrt_recip_alphas_cumprod", t) * x_t - tables.at("sqrt_recipm1_alphas_cumprod", t) * eps_frozen
    model_mean = tables.at("posterior_mean_coef1", t) * pred_x0 + tables.at("posterior_mean_coef2", t) * x_t
    log_var = model_log_variance(tables, v, t)
    true_mean = tables.at("posterior_mean_coef1", t) * x0 + tables.at("posterior_mean_coef2", t) * x_t
    true_log_var = tables.at("posterior_log_variance_clipped", t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, log_var)) / math.log(2.0)
    nll = mean_flat(discretized_gaussian_nll(x0, model_mean, log_var)) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl) * (tables.num_timesteps / 1000.0)
    return {"mse": mse, "vb": vb, "loss": mse + vb}
