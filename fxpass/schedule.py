"""Timestep respacing (``fxpass.schedule.respaced``): kept as the public name; the maths live in
:mod:`fxpass.diffusion`."""

from .diffusion import model_timesteps, respaced

__all__ = ["model_timesteps", "respaced"]
