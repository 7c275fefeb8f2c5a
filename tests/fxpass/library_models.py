"""Small diffusion U-Nets of other libraries, as their users build them (``--model-factory library_models:NAME``).

diffusers' ``UNet2DModel`` (DDPM-style with attention blocks, and class-conditional) and MONAI's
``DiffusionModelUNet``; ``TwoOutputs`` returns a dict of two tensors (neither named ``sample``).
MONAI zero-initialises its output convolution, so :func:`randomized` gives every weight a value.
"""

from __future__ import annotations

import torch


def ddpm(**kwargs):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8, **kwargs)


def ddpm_classes(**kwargs):
    return ddpm(num_class_embeds=5, **kwargs)


def monai_ddpm(**kwargs):
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32),
                              attention_levels=(False, True), num_res_blocks=1, num_head_channels=16,
                              norm_num_groups=8, **kwargs)


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


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn anew (N(0, 0.2^2)): a zero-initialised layer would make any graph pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def monai_segmentation(**kwargs):
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1,
                **kwargs)
