"""Small diffusion U-Nets of other libraries, as their users build them (``--model-factory library_models:NAME``).

The library models are ``bench.libraries``' (the figures in docs/lowering.md come from the same models);
``TwoOutputs`` returns a dict of two tensors (neither named ``sample``).
"""

from __future__ import annotations

import torch

from bench.libraries import (  # noqa: F401
    ddpm,
    ddpm_classes,
    monai_context,
    monai_ddpm,
    monai_segmentation,
    randomized,
    text_conditioned,
)


class TwoOutputs(torch.nn.Module):
    """forward returns {"eps": ..., "aux": ...}: which one to lower is the user's to say."""

    image_size = 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.emb = torch.nn.Linear(1, 3)

    def forward(self, x, timesteps):
        h = self.conv(x) + self.emb(timesteps.float()[:, None])[:, :, None, None]
        return {"eps": h, "aux": h.mean(dim=(2, 3))}


class OverridesTo(TwoOutputs):
    """PatchDDM-style: ``.to()`` spreads blocks over devices and returns nothing; so do eval() and float()."""

    def to(self, *args, **kwargs):  # noqa: D401  (returns None, as PatchDDM's does)
        super().to(*args, **kwargs)

    def eval(self):
        super().eval()

    def float(self):
        super().float()

    def forward(self, x, timesteps):
        return super().forward(x, timesteps)["eps"]


def patchddm_like(**kwargs):
    """A factory returning :class:`OverridesTo` (the issue's case was built through --model-factory)."""
    return OverridesTo(**kwargs)
