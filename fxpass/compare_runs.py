"""Quality against time: several samplers on the same inpainting cases (``fxpass evaluate --run``), torch-free.

Every run (a :class:`fxpass.samplers.Settings`) inpaints the same cases as :func:`fxpass.inpainting.evaluate`
does (image ``k // len(masks)``, mask ``k % len(masks)``, noise ``GeneratorNoise(seed + k)``), and each case
records PSNR and SSIM in the unknown region, the model calls and the model seconds: the wall time spent
inside the denoiser's calls for that case (:class:`TimedDenoiser`, ``time.perf_counter``), so that the
scoring and the sampler's NumPy work are left out.  The summary gives each run's means and, for every run
after the first, the paired difference to the first run: the mean of the per-case differences (run minus
first) and its standard error (the differences' sample standard deviation over sqrt(n); None for one case).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from .errors import FxpassError
from .inpainting import METRICS_NOTE, check_cases, inpaint, score, unknown_fraction

Progress = Callable[[int, int], None]
METRICS = ("psnr", "ssim")


class TimedDenoiser:
    """A denoiser that counts its calls and the wall time spent in them (``reset`` starts a case)."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.calls, self.seconds = 0, 0.0

    def __getattr__(self, name):  # diffusion, image_size, path, ...
        return getattr(self.denoiser, name)

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0

    def _timed(self, call, *args):
        start = time.perf_counter()
        out = call(*args)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def __call__(self, x, t_index):
        return self._timed(self.denoiser, x, t_index)

    def full(self, x, t_index):  # a --deep-cache model's full call: (out, feature)
        return self._timed(self.denoiser.full, x, t_index)

    def shallow(self, x, t_index, feature):
        return self._timed(self.denoiser.shallow, x, t_index, feature)


def paired_difference(first: Sequence[float], other: Sequence[float]) -> dict:
    """``{"mean", "se"}`` of the per-case differences ``other - first``; ``se`` None for fewer than 2 cases."""
    d = np.asarray(other, dtype=np.float64) - np.asarray(first, dtype=np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
    return {"mean": float(d.mean()), "se": se}


def summarize(runs: list[dict]) -> list[dict]:
    """Per run: its label, the mean calls, seconds, PSNR and SSIM per case, and (after the first) the paired
    difference of PSNR and SSIM to the first run."""
    first = runs[0]["cases"]
    out = []
    for r, run in enumerate(runs):
        cases = run["cases"]
        row = {"run": r, "label": run["settings"]["label"], "cases": len(cases),
               "calls_per_case": float(np.mean([c["calls"] for c in cases])),
               "seconds_per_case": float(np.mean([c["seconds"] for c in cases])),
               **{m: float(np.mean([c[m] for c in cases])) for m in METRICS}}
        if r > 0:
            row["diff_to_first"] = {m: paired_difference([c[m] for c in first], [c[m] for c in cases])
                                    for m in METRICS}
        out.append(row)
    return out


def _run_settings(settings, sampler, steps: int) -> dict:
    return {"label": settings.label(steps), "sampler": settings.sampler, **settings.knobs(steps),
            "model_calls_per_case": sampler.calls}


def _samplers(runs, diffusion) -> list:
    samplers = []
    for r, settings in enumerate(runs):
        try:
            samplers.append(settings.build(diffusion))
        except ValueError as exc:
            raise FxpassError(f"evaluate: run {r + 1} ({settings.sampler}): {exc}") from None
    return samplers


def compare(denoiser, images: np.ndarray, masks: dict[str, np.ndarray], runs: Sequence, *, seed: int = 0,
            progress: Progress | None = None, names: Sequence[str] | None = None) -> dict:
    """Inpaint every image × mask case with every run of ``runs`` (Settings) on ``denoiser`` and score each.

    Returns ``{"settings", "masks", "runs", "summary"}``: ``runs[r]`` holds the run's ``settings`` (label,
    sampler, knobs, model calls per case) and its ``cases`` (image, mask, seed, psnr, ssim, calls, seconds);
    ``summary`` is :func:`summarize`'s.  ``progress(done, total)`` counts model calls over all runs.
    """
    if not runs:
        raise FxpassError("evaluate: no runs to compare")
    images = np.asarray(images, dtype=np.float32)
    size = int(denoiser.image_size)
    check_cases(images, masks, size, names)
    steps = denoiser.diffusion.num_steps
    samplers = _samplers(runs, denoiser.diffusion)
    kinds = list(masks)
    n_cases = len(images) * len(kinds)
    total, done = sum(s.calls for s in samplers) * n_cases, 0
    timed = TimedDenoiser(denoiser)
    report_runs = []
    for settings, sampler in zip(runs, samplers):
        rows = []
        for k in range(n_cases):
            i, kind = k // len(kinds), kinds[k % len(kinds)]
            gt, mask = images[i:i + 1], np.asarray(masks[kind], dtype=np.float32)
            on_step = None if progress is None else (lambda d, _t, base=done: progress(base + d, total))
            timed.reset()
            x = inpaint(sampler, timed, gt, mask, seed + k, on_step, f"{settings.sampler}, image {i}, mask {kind}")
            done += timed.calls
            row = {"image": i, "mask": kind, "seed": seed + k, **({} if names is None else {"name": str(names[i])}),
                   **score(gt[0], x[0], mask[0]), "calls": timed.calls, "seconds": timed.seconds}
            rows.append(row)
        report_runs.append({"settings": _run_settings(settings, sampler, steps), "cases": rows})
    return {
        "settings": {"seed": seed, "images": len(images), "image_size": size,
                     "noise": "GeneratorNoise(seed + case), case = image * len(masks) + mask, the same for every run",
                     "metrics": METRICS_NOTE,
                     "seconds": "wall time inside the model's calls for the case (time.perf_counter)"},
        "masks": {kind: {"unknown_fraction": unknown_fraction(masks[kind])} for kind in kinds},
        "runs": report_runs,
        "summary": summarize(report_runs),
    }
