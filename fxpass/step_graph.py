"""One whole denoising step as one graph: the rewritten U-Net and p(x_{t-1} | x_t), gathered by t_index."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .config import ModelConfig
from .metadata import STEP_OUTPUTS  # noqa: F401  (fxpass.step_graph.STEP_OUTPUTS: its outputs)

STEP_INPUTS = ("x", "t_index", "noise")


class DenoisingStep(nn.Module):
    """``x_prev, pred_xstart = step(x, t_index, noise[, y])`` as guided-diffusion's ``p_sample`` does it.

    ``unet`` is a table-mode graph (inputs ``x``, ``t_index``[, ``y``]); the posterior coefficients of the
    respaced schedule are float32 tables gathered by ``t_index``; no noise is added at ``t_index`` 0;
    ``pred_xstart`` is clipped to [-1, 1].  RePaint's known-region merge stays outside (merge ``x``
    before the call), so an app loops one call per model evaluation.
    """

    def __init__(self, unet: nn.Module, config: ModelConfig):
        super().__init__()
        from .diffusion import Diffusion

        d = Diffusion.from_config(config.to_dict())
        self.unet = unet
        self.learn_sigma = d.learn_sigma
        self.class_cond = config.class_cond
        tables = {
            "sqrt_recip_ac": d.sqrt_recip_alphas_cumprod,
            "sqrt_recipm1_ac": d.sqrt_recipm1_alphas_cumprod,
            "coef1": d.posterior_mean_coef1,
            "coef2": d.posterior_mean_coef2,
            "max_log": d.log_betas,
            "min_log": d.posterior_log_variance_clipped,
            "fixed_log": d.fixed_log_variance,
            "nonzero": (np.arange(d.num_steps) > 0).astype(np.float64),
        }
        for name, table in tables.items():
            self.register_buffer(f"step_{name}", torch.from_numpy(np.asarray(table, dtype=np.float32)))

    def _at(self, name: str, t_index: torch.Tensor) -> torch.Tensor:
        return torch.index_select(getattr(self, f"step_{name}"), 0, t_index).reshape(-1, 1, 1, 1)

    def with_unet(self, unet: nn.Module) -> "DenoisingStep":
        """The same step around another U-Net (e.g. one computing in float16); the tables are shared."""
        step = DenoisingStep.__new__(DenoisingStep)
        nn.Module.__init__(step)
        step.unet = unet
        step.learn_sigma, step.class_cond = self.learn_sigma, self.class_cond
        for name, buffer in self.named_buffers(recurse=False):
            step.register_buffer(name, buffer)
        return step.train(self.training)

    def forward(self, x, t_index, noise, y=None):
        out = self.unet(x, t_index, y) if self.class_cond else self.unet(x, t_index)
        c = x.shape[1]
        eps = out[:, :c]
        if self.learn_sigma:
            frac = (out[:, c:] + 1.0) / 2.0
            log_var = frac * self._at("max_log", t_index) + (1.0 - frac) * self._at("min_log", t_index)
        else:
            log_var = self._at("fixed_log", t_index).expand_as(x)
        pred = self._at("sqrt_recip_ac", t_index) * x - self._at("sqrt_recipm1_ac", t_index) * eps
        pred = torch.clamp(pred, -1.0, 1.0)
        mean = self._at("coef1", t_index) * pred + self._at("coef2", t_index) * x
        x_prev = mean + self._at("nonzero", t_index) * torch.exp(0.5 * log_var) * noise
        return x_prev, pred


def step_module(unet: nn.Module, config: ModelConfig, example_inputs, *, seed: int = 0):
    """(the :class:`DenoisingStep` around a table-mode ``unet``, its example inputs ``x``, ``t_index``,
    ``noise``[, ``y``]): ``x``/``t_index``/``y`` from the U-Net's example inputs, ``noise`` seeded normal
    (not zeros, so a check of the written step sees the noise term at every t_index but 0)."""
    inputs = dict(example_inputs)
    x = inputs["x"]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=x.dtype)
    step_inputs = {"x": x, "t_index": inputs["t_index"], "noise": noise}
    if "y" in inputs:
        step_inputs["y"] = inputs["y"]
    return DenoisingStep(unet, config).eval(), step_inputs
