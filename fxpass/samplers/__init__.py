"""Samplers for lowered table-mode models, one module per method behind one contract (NumPy only).

:mod:`.base` holds the contract (a plan of moves computed up front, one ``step``) and the only loop,
:func:`run_plan`; :mod:`.repaint` is RePaint (Lugmayr et al., CVPR 2022), :mod:`.ddim` DDIM (Song et
al., ICLR 2021), :mod:`.ddnm` DDNM (Wang et al., ICLR 2023), :mod:`.diffpir` DiffPIR (Zhu et al., CVPRW 2023)
with DDNM's time travel and an optional start from the known pixels.  :class:`Settings` is what the commands
choose (``--sampler`` and its knobs): it checks them against a model and builds the sampler.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..diffusion import Diffusion
from .base import MAX_MODEL_CALLS, Known, Move, Sampler, count_calls, positive_interval, run_plan  # noqa: F401
from .ddim import DDIM
from .ddnm import DDNM
from .diffpir import INITS, DiffPIR  # noqa: F401
from .repaint import RePaint

#: the samplers ``--sampler`` offers, the default first
SAMPLERS = ("repaint", "ddim", "ddnm", "diffpir")
#: DDNM's eta (the paper's setting), also DDIM's default here
DEFAULT_ETA = 0.85
#: the knobs each sampler reads (the others must be left at their defaults)
KNOBS = {"repaint": ("t_T", "jump_length", "jump_n_sample", "cache_interval"),
         "ddim": ("t_T", "steps", "eta", "cache_interval"),
         "ddnm": ("t_T", "steps", "eta", "travel_length", "travel_repeat", "travel_below", "cache_interval"),
         "diffpir": ("t_T", "steps", "zeta", "travel_length", "travel_repeat", "travel_below", "init",
                     "cache_interval")}
#: each knob's default where a report leaves it out
QUIET_DEFAULTS = (("cache_interval", 1), ("travel_below", None), ("init", "noise"))


@dataclass(frozen=True)
class Settings:
    """One sampler and its knobs: ``t_T`` (None: all steps; the start level is ``t_T - 1``), RePaint's
    ``jump_length``, ``jump_n_sample``; DDIM's and DDNM's ``steps`` (None: all ``t_T``) and ``eta``;
    DDNM's ``travel_length`` and ``travel_repeat`` (1: no time travel)."""

    sampler: str = "repaint"
    t_T: int | None = None
    jump_length: int = 10
    jump_n_sample: int = 10
    steps: int | None = None
    eta: float = DEFAULT_ETA
    travel_length: int = 1
    travel_repeat: int = 1
    #: DDNM's time travel only from the travel_below least noisy walked levels (None: from all of them)
    travel_below: int | None = None
    #: every cache_interval-th model call full, the others shallow (a --deep-cache model; 1: no cache)
    cache_interval: int = 1
    #: DiffPIR's re-noising weight (1: fresh noise only) and where its walk starts ("noise" or "fill")
    zeta: float = 1.0
    init: str = "noise"
    #: a preset's start, as a fraction of the lowered table (t_T = round(start * its steps)), so one preset
    #: suits a 50-step and a 250-step schedule; and the preset's name, for labels
    start: float | None = None
    preset: str | None = None

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler {self.sampler}: expected one of {', '.join(SAMPLERS)}")

    def check_knobs(self) -> None:
        """ValueError naming both flags where ``steps`` is more than ``t_T`` (needs no model)."""
        if self.sampler != "repaint" and None not in (self.steps, self.t_T) and self.steps > self.t_T:
            raise ValueError(f"--steps {self.steps} is more than --t-T {self.t_T}")

    def resolved(self, num_steps: int) -> Settings:
        """These settings for a table of ``num_steps``: a preset's ``start`` made a ``t_T`` (and its
        ``steps`` at most that), as if the flags had been given."""
        if self.start is None:
            return self
        t_T = min(num_steps, max(1, round(self.start * num_steps)))
        steps = None if self.steps is None else min(self.steps, t_T)
        return dataclasses.replace(self, t_T=t_T, steps=steps, start=None)

    def check(self, num_steps: int) -> None:
        """ValueError naming the flag where a knob does not fit a model of ``num_steps`` respaced steps."""
        resolved = self.resolved(num_steps)
        for flag, value in (("--t-T", resolved.t_T), ("--steps", resolved.steps)):
            if value is not None and value > num_steps:
                raise ValueError(f"{flag} {value} is more than the model's {num_steps} respaced steps")

    def build(self, diffusion: Diffusion) -> Sampler:
        """The sampler, its plan made (ValueError where the knobs are bad or the plan too long)."""
        self.check(diffusion.num_steps)
        s = self.resolved(diffusion.num_steps)
        if s.sampler == "repaint":
            sampler = RePaint.jumps(diffusion, s.t_T, s.jump_length, s.jump_n_sample)
        elif s.sampler == "ddim":
            sampler = DDIM(diffusion, s.steps, s.eta, t_T=s.t_T)
        elif s.sampler == "ddnm":
            sampler = DDNM(diffusion, s.steps, s.eta, travel_length=s.travel_length, travel_repeat=s.travel_repeat,
                           t_T=s.t_T, travel_below=s.travel_below)
        else:
            sampler = DiffPIR(diffusion, s.steps, s.zeta, travel_length=s.travel_length,
                              travel_repeat=s.travel_repeat, t_T=s.t_T, travel_below=s.travel_below, init=s.init)
        sampler.cache_interval = positive_interval(s.cache_interval)
        return sampler

    def knobs(self, num_steps: int) -> dict:
        """The knobs this sampler reads, defaults resolved against the model (for reports); DDIM's and
        DDNM's ``t_T`` only where it was given."""
        s = self.resolved(num_steps)
        values = {name: getattr(s, name) for name in KNOBS[s.sampler]}
        if s.sampler != "repaint" and s.t_T is None:
            del values["t_T"]
        for name, default in QUIET_DEFAULTS:
            if name in values and values[name] == default:
                del values[name]
        for name in ("t_T", "steps"):
            if name in values and values[name] is None:
                values[name] = num_steps if s.t_T is None else s.t_T
        return values

    def label(self, num_steps: int) -> str:
        """``RePaint (t_T 10, jump_length 10, jump_n_sample 10)``, ``DDNM (steps 10, eta 0.85, ...)``."""
        title = {"repaint": "RePaint", "ddim": "DDIM", "ddnm": "DDNM", "diffpir": "DiffPIR"}[self.sampler]
        knobs = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in self.knobs(num_steps).items())
        return f"{self.preset + ': ' if self.preset else ''}{title} ({knobs})"


#: ``--preset``: ``paper`` is RePaint's paper setting (every step, jump length 10, 10 resamplings);
#: ``balanced`` and ``fast`` were chosen by measurement on the trained digits reference, paired against paper on
#: held-out images the report sets do not use (docs/sampling.md says which, and how each was chosen):
#: both are DiffPIR started from the known pixels at half the table with fresh re-noising and time travel:
#: balanced 4 x 4 over 20 levels (68 calls), fast 3 x 3 over 13 levels (37 calls).
PRESETS = {
    "paper": Settings("repaint", preset="paper"),
    "balanced": Settings("diffpir", steps=20, travel_length=4, travel_repeat=4, start=0.5, init="fill",
                         preset="balanced"),
    "fast": Settings("diffpir", steps=13, travel_length=3, travel_repeat=3, start=0.5, init="fill", preset="fast"),
}
