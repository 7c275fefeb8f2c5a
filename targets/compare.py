"""Comparisons with Polygraphy's Comparator at explicit tolerances, relative to the reference's scale."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from polygraphy.comparator import Comparator, CompareFunc

#: (atol as a fraction of max|reference|, elementwise rtol) per precision
#: int8: a sanity bound for a broken graph, not the quality gate (that is the plan's eps-MSE budget,
#: measured on the task): measured 8.0e-3 on the trained digits reference with its plan; 0.08-0.12 on
#: the random-weight tiny test config fully int8 (ORT's unfused QDQ reference gives the same: random
#: weights quantize badly); 0.29-0.44 for 8-bit weights saturating in ORT's AVX2 kernels (no VNNI).
#: bf16: as OpenVINO's bf16 tolerance (targets.openvino.TOLERANCES).
TOLERANCES = {"fp32": (1e-4, 0.0), "fp16": (2e-2, 0.0), "bf16": (7e-2, 0.0), "int8": (2e-1, 0.0)}


@dataclass
class PairResult:
    """Worst errors of one runner pair over all iterations."""

    reference: str
    target: str
    passed: bool
    max_abs: float
    max_rel_to_scale: float  # max|diff| / max|reference| (divided by the conditioning factor where given)
    per_iteration: list[dict] = field(default_factory=list)
    #: the first NaN/Inf seen, e.g. "onnxrt-cpu output out has NaN at iteration 3" (then passed is False
    #: and the worst errors are inf); None when every number was finite
    nonfinite: str | None = None
    #: set where the reference's output is exactly zero on every input (nothing was compared: an untrained,
    #: zero-initialised output layer makes every graph "match"); then passed is False
    degenerate: str | None = None
    #: the worst relative L2 error over the iterations, ||target - reference|| / ||reference|| per output and
    #: input (each iteration's ``rel_l2``): where max-abs says how far the worst pixel is, this says how far the
    #: whole output is (reported beside the bound, not bounded)
    max_rel_l2: float = 0.0


def parse_tolerance(text: str) -> tuple[float, float]:
    """``fp32`` / ``fp16`` or ``ATOL,RTOL`` (ATOL relative to max|reference|): ATOL finite and > 0,
    RTOL finite and >= 0 (a NaN bound compares false with everything, an infinite or zero one would
    pass anything or nothing)."""
    if text in TOLERANCES:
        return TOLERANCES[text]
    try:
        atol, rtol = (float(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"tolerance '{text}': expected fp32, fp16 or ATOL,RTOL") from None
    if not math.isfinite(atol) or atol <= 0:
        raise ValueError(f"tolerance '{text}': ATOL must be a finite number > 0 (got {atol:g})")
    if not math.isfinite(rtol) or rtol < 0:
        raise ValueError(f"tolerance '{text}': RTOL must be a finite number >= 0 (got {rtol:g})")
    return atol, rtol


def nonfinite_kind(values: np.ndarray) -> str | None:
    """``"NaN"``, ``"Inf"``, ``"NaN and Inf"`` or None for an array of finite numbers."""
    if np.isfinite(values).all():
        return None
    nan, inf = bool(np.isnan(values).any()), bool(np.isinf(values).any())
    return "NaN and Inf" if nan and inf else ("NaN" if nan else "Inf")


@contextmanager
def polygraphy_severity(verbose: bool, errors: bool = True):
    """Polygraphy logs at INFO by default; keep it to errors unless ``verbose`` (nothing short of
    critical with ``errors=False``, for failures that the caller reports itself)."""
    from polygraphy.logger import G_LOGGER

    saved = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else (G_LOGGER.ERROR if errors else G_LOGGER.CRITICAL)
    try:
        yield
    finally:
        G_LOGGER.module_severity = saved


def run_runners(runners: Sequence, feeds: Iterable[dict], verbose: bool = False):
    """Polygraphy ``Comparator.run`` over the feeds (one iteration each)."""
    with polygraphy_severity(verbose):
        return Comparator.run(list(runners), data_loader=list(feeds))


def compare(results, *, reference: str, atol_scale: float, rtol: float = 0.0, meta: Sequence[dict] | None = None,
            verbose: bool = False, conditioning=None) -> list[PairResult]:
    """Compare every runner against ``reference`` with Polygraphy's ``CompareFunc.simple``.

    The absolute tolerance of each output is ``atol_scale * max|reference output|`` (so that
    ``max|diff| <= atol_scale * max|ref|`` is what passes); ``rtol`` is elementwise.
    ``conditioning(iteration, output) -> float`` (default 1) multiplies that bound for outputs that
    amplify float32 error by a known factor (a step graph's ``pred_xstart``: sqrt(1/alpha_bar - 1)).
    A NaN or Inf in the reference's or the runner's output fails the pair and says so: the entry gets
    ``"nonfinite"`` (e.g. "onnxrt-cpu output out has NaN"), its errors and the worst ones are inf, and
    ``PairResult.nonfinite`` names the first such output and iteration.
    """
    ref_runs = next(runs for name, runs in results.items() if name == reference)
    pairs = []
    for name, runs in results.items():
        if name == reference:
            continue
        per_iter = []
        passed = True
        worst_abs = worst_rel = 0.0
        first_nonfinite = None
        worst_l2 = 0.0
        zero: dict[str, bool] = {}  # output -> the reference was 0 everywhere on every input so far
        for i, (ref_run, run) in enumerate(zip(ref_runs, runs)):
            for out_name, ref_value in ref_run.items():
                ref_arr = np.asarray(ref_value, dtype=np.float64)
                out_arr = np.asarray(run[out_name], dtype=np.float64)
                zero[out_name] = zero.get(out_name, True) and ref_arr.size > 0 and not np.any(ref_arr)
                nonfinite = next(
                    (f"{who} output {out_name} has {kind}"
                     for who, arr in ((reference, ref_arr), (name, out_arr)) if (kind := nonfinite_kind(arr))),
                    None,
                )
                finite_ref = np.abs(ref_arr[np.isfinite(ref_arr)])
                scale = (float(finite_ref.max()) if finite_ref.size else 0.0) or 1.0
                factor = max(1.0, float(conditioning(i, out_name))) if conditioning else 1.0
                if nonfinite is None:
                    func = CompareFunc.simple(atol=atol_scale * factor * scale, rtol=rtol if rtol else 0.0,
                                              check_error_stat="max")
                    with polygraphy_severity(verbose, errors=False):  # a mismatch is reported in the PairResult
                        outcome = func(ref_run, run)[out_name]
                    diff = float(np.abs(ref_arr - out_arr).max()) if ref_arr.size else 0.0
                    ok = bool(outcome) and math.isfinite(diff)
                else:  # NaN never compares: it would read as a zero error (max(0, nan) is 0)
                    diff, ok = math.inf, False
                    if first_nonfinite is None:
                        first_nonfinite = f"{nonfinite} at iteration {i}"
                if not math.isfinite(diff):
                    diff = math.inf
                norm = float(np.linalg.norm(ref_arr)) if nonfinite is None else 0.0
                rel_l2 = float(np.linalg.norm(ref_arr - out_arr)) / norm if norm > 0 else (
                    0.0 if nonfinite is None and not np.any(out_arr) else math.inf)
                passed &= ok
                worst_abs = max(worst_abs, diff)
                worst_rel = max(worst_rel, diff / (scale * factor))
                worst_l2 = max(worst_l2, rel_l2)
                entry = {"iteration": i, "output": out_name, "max_abs": diff, "rel_to_scale": diff / scale,
                         "rel_l2": rel_l2, "passed": ok}
                if nonfinite is not None:
                    entry["nonfinite"] = nonfinite
                if factor != 1.0:
                    entry["conditioning"] = factor
                if meta is not None and i < len(meta):
                    entry.update(meta[i])
                per_iter.append(entry)
        blank = next((o for o, z in zero.items() if z), None)
        degenerate = None
        if blank is not None:
            passed = False
            degenerate = (f"{reference} output {blank} is 0 everywhere on all {len(ref_runs)} inputs: nothing was "
                          "compared (an untrained model whose output layer is zero-initialised?)")
        pairs.append(PairResult(reference, name, passed, worst_abs, worst_rel, per_iter, first_nonfinite,
                                degenerate, worst_l2))
    return pairs
