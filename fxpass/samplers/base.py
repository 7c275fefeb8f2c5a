"""The contract every sampler meets, and the one loop that drives them (NumPy only).

A sampler is one method of walking a lowered table-mode model's schedule (``t_index`` 0 = least
noisy, ``diffusion.num_steps - 1`` = most), in the spirit of diffusers' ``SchedulerMixin.step()``:

- :attr:`Sampler.plan`, computed up front before any model call: a list of :class:`Move`, each
  either a model call at ``t`` stepping down to ``to`` (``to == -1``: the clean image) or a jump
  up from ``t`` to ``to``.  So the number of calls, the progress total and the call limit are known
  before the model runs;
- :meth:`Sampler.model_input`: what the model sees at a call (where known pixels enter x_t, for the
  methods that put them there);
- :meth:`Sampler.step`: from x, the denoiser's output and the known pixels, the next x and the
  predicted x0 (where known pixels enter x0, for the methods that put them there);
- :meth:`Sampler.jump`: how the method climbs back up.

:func:`run_plan` is the loop, the only one: it draws the start image, then per model call the step
noise (always, even where a method does not use it, so that the order of draws depends on the plan
alone), then whatever :meth:`Sampler.model_input` draws; a jump draws what :meth:`Sampler.jump`
draws.  ``on_step(done, total)`` reports each call.

Cached calls (DeepCache, Ma et al., CVPR 2024, over a ``--deep-cache`` lowering): with
``cache_interval`` N > 1, call k of a run is a full call when k % N == 0 (the model's ``full(x, t)``
returns the output and the deep feature) and a shallow call otherwise (``shallow(x, t, feature)`` with
the last full call's feature).  N = 1 calls the model as it always did.  The noise draws do not depend
on N, so only the shallow calls' outputs differ between intervals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import numpy as np

from ..diffusion import Diffusion, Model

Progress = Callable[[int, int], None]

#: the longest sampling run fxpass builds (RePaint's paper setting over 250 steps makes 2,410 calls)
MAX_MODEL_CALLS = 1_000_000


class NoiseSource(Protocol):
    def normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """Standard normal float32 samples of ``shape``."""


class Move(NamedTuple):
    """A model call at ``t`` down to ``to`` (``to < t``), or a jump up from ``t`` to ``to`` (``to > t``)."""

    t: int
    to: int

    @property
    def call(self) -> bool:
        return self.to < self.t


class Known:
    """The known pixels: ground truth ``gt`` kept where ``keep`` is 1, broadcast to the sample's shape."""

    def __init__(self, gt: np.ndarray, mask: np.ndarray, shape: tuple[int, ...]):
        self.gt = np.broadcast_to(np.asarray(gt, dtype=np.float32), shape)
        self.keep = np.broadcast_to(np.asarray(mask, dtype=np.float32), shape)
        self.drop = np.float32(1.0) - self.keep

    def paste(self, known: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``known`` where the mask is 1, ``x`` where it is 0 (mask * known + (1 - mask) * x)."""
        return self.keep * known + self.drop * x


def count_calls(plan: Sequence[Move]) -> int:
    return sum(1 for move in plan if move.call)


def check_calls(calls: int, what: str) -> None:
    if calls > MAX_MODEL_CALLS:
        raise ValueError(f"this schedule makes {calls:,} model calls ({what}); at most {MAX_MODEL_CALLS:,} "
                         "are allowed")


def moves_over(levels: Sequence[int], walk: Sequence[int]) -> list[Move]:
    """The moves of ``walk`` (positions into ``levels``, +-1 at a time, ending at -1) as t_index
    values: position ``p`` is ``levels[p]`` and -1 stays -1 (the clean image)."""
    at = [levels[p] if p >= 0 else -1 for p in walk]
    return [Move(a, b) for a, b in zip(at[:-1], at[1:])]


def q_known(diffusion: Diffusion, known: Known | None, x: np.ndarray, t: int, noise: NoiseSource,
            first: bool) -> np.ndarray:
    """RePaint's injection: before every call but the first, the known pixels of x_t replaced by
    q(x_t | gt) (one noise draw); ``x`` itself otherwise."""
    if known is None or first:
        return x
    return known.paste(diffusion.q_sample(known.gt, t, noise.normal(x.shape)), x)


class Sampler:
    """The base of the samplers: a diffusion, a plan, and the defaults (no injection, no jumps)."""

    name = "sampler"
    #: every cache_interval-th model call is full, the others shallow (1: every call is a plain call)
    cache_interval = 1

    def __init__(self, diffusion: Diffusion, plan: Sequence[Move]):
        self.diffusion = diffusion
        self.plan = list(plan)
        if not self.plan or not self.plan[0].call or self.plan[-1].to != -1:
            raise ValueError("a plan must start with a model call and end at -1")
        for a, b in zip(self.plan[:-1], self.plan[1:]):
            if a.to != b.t:
                raise ValueError(f"a plan's moves must chain: {a} then {b}")
        if max(m.t for m in self.plan) >= diffusion.num_steps:
            raise ValueError(f"the plan reaches index {max(m.t for m in self.plan)}, the diffusion has "
                             f"{diffusion.num_steps} steps")

    @property
    def calls(self) -> int:
        return count_calls(self.plan)

    def model_input(self, x: np.ndarray, move: Move, known: Known | None, noise: NoiseSource,
                    first: bool) -> np.ndarray:
        return x

    def step(self, x: np.ndarray, model_out: np.ndarray, move: Move, known: Known | None,
             z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def jump(self, x: np.ndarray, move: Move, noise: NoiseSource) -> np.ndarray:
        raise ValueError(f"{self.name} makes no jumps up")


def positive_interval(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"--cache-interval must be a positive integer, got {value!r}")
    return int(value)


def run_plan(sampler: Sampler, model: Model, shape: tuple[int, ...], *, noise: NoiseSource,
             gt: np.ndarray | None = None, mask: np.ndarray | None = None,
             on_step: Progress | None = None) -> np.ndarray:
    """Walk ``sampler.plan`` from pure noise to x0 with ``model``; ``gt`` and ``mask`` (1 = known
    pixel to keep, broadcastable to ``shape``) give the known pixels, or neither for generation."""
    if (gt is None) != (mask is None):
        raise ValueError("pass both gt and mask, or neither")
    known = None if gt is None else Known(gt, mask, shape)
    total = sampler.calls
    interval = positive_interval(sampler.cache_interval)
    done = 0
    feature = None
    x = np.asarray(noise.normal(shape), dtype=np.float32)
    for move in sampler.plan:
        if not move.call:
            x = sampler.jump(x, move, noise)
            continue
        z = noise.normal(shape)
        x = sampler.model_input(x, move, known, noise, done == 0)
        t = np.full((shape[0],), move.t, dtype=np.int64)
        if interval == 1:
            out = model(x, t)
        elif done % interval == 0:
            out, feature = model.full(x, t)
        else:
            out = model.shallow(x, t, feature)
        x, _ = sampler.step(x, np.asarray(out, dtype=np.float32), move, known, z)
        done += 1
        if on_step is not None:
            on_step(done, total)
    return x
