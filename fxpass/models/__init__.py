"""fxpass's own guided-diffusion U-Net (state dicts compatible with upstream checkpoints)."""

from .unet import UNetModel

__all__ = ["UNetModel"]
