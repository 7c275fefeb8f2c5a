"""Small helpers shared by the format writers: relative error, schedule positions, the check of a
written file against the torch module it was made from."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FxpassError


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    """max|out - ref| / max|ref| (inf when either has NaN/Inf)."""
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise FxpassError(f"output shape {list(out.shape)} differs from the reference's {list(ref.shape)}")
    if not (np.isfinite(out).all() and np.isfinite(ref).all()):
        return float("inf")
    scale = float(np.abs(ref).max()) or 1.0
    return float(np.abs(out - ref).max() / scale)


def worst_error(outs, refs, names, *, t_index: int | None = None, sqrt_recipm1=None) -> float:
    """The worst :func:`rel_error` over a model's outputs.  A step graph's ``pred_xstart`` error is divided
    by sqrt(1/alpha_bar - 1) at ``t_index`` (``sqrt_recipm1``: that table, None for other graphs):
    pred_xstart = sqrt(1/alpha_bar) x - sqrt(1/alpha_bar - 1) eps multiplies the U-Net's float error
    by it, and fxpass lower's step-graph gate judges it the same way."""
    outs, refs, names = list(outs), list(refs), list(names)
    if not len(outs) == len(refs) == len(names):
        raise FxpassError(f"{len(outs)} outputs, the reference gives {len(refs)}")
    worst = 0.0
    for out, ref, name in zip(outs, refs, names):
        err = rel_error(out, ref)
        if name == "pred_xstart" and sqrt_recipm1 is not None and t_index is not None:
            err /= max(float(np.asarray(sqrt_recipm1).ravel()[t_index]), 1.0)
        worst = max(worst, err)
    return worst


def spread(n: int, count: int = 3) -> list[int]:
    """``count`` indices over range(n): first, middle, last (deduplicated, in order)."""
    picks = [0, (n - 1) // 2, n - 1][:count] if count <= 3 else list(np.linspace(0, n - 1, count).round().astype(int))
    return list(dict.fromkeys(int(i) for i in picks))


def tree_bytes(path: str | Path) -> int:
    """Size of a file, or of every file under a directory (an .mlpackage)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def table_rows(module) -> int | None:
    """Rows of the timestep tables of an fxpass-rewritten graph (None when it has none)."""
    meta = getattr(module, "meta", {}) or {}
    if meta.get("fxpass_mode") == "table" and isinstance(meta.get("fxpass_timesteps"), (list, tuple)):
        return len(meta["fxpass_timesteps"])
    return None


def schedule_positions(inputs: Sequence, rows: int) -> list[tuple]:
    """The inputs (tensors) with ``t_index`` (the first integer input) at the first, middle and last of ``rows``."""
    import torch

    ints = [i for i, a in enumerate(inputs) if not a.is_floating_point()]
    if not ints:
        return [tuple(inputs)]
    k = ints[0]
    return [tuple(torch.full_like(a, row) if i == k else a for i, a in enumerate(inputs)) for row in spread(rows)]


def step_outputs(module) -> tuple[list[str] | None, np.ndarray | None]:
    """(output names, sqrt(1/alpha_bar - 1) per t_index) of a step graph; (None, None) for other modules."""
    from ..step_graph import STEP_OUTPUTS, DenoisingStep

    if isinstance(module, DenoisingStep):
        return list(STEP_OUTPUTS), module.step_sqrt_recipm1_ac.detach().numpy()
    return None, None


def compare_module(run: Callable[[tuple], list], reference, inputs: Sequence, *, rows: int | None,
                   where: str) -> dict[str, Any]:
    """``run(case)`` (the written file's outputs as arrays) against ``reference(*case)`` at the first,
    middle and last t_index (``rows``: table rows; default from the graph's metadata, else the given
    t_index only); the worst :func:`worst_error` and the t_index values used."""
    import torch

    rows = rows or table_rows(reference)
    cases = schedule_positions(inputs, rows) if rows else [tuple(inputs)]
    names, amplification = step_outputs(reference)
    worst, used = 0.0, []
    for case in cases:
        with torch.no_grad():
            ref = reference(*case)
        refs = [r.numpy() for r in (ref if isinstance(ref, (tuple, list)) else [ref])]
        outs = run(case)
        if len(outs) != len(refs):
            raise FxpassError(f"{where}: {len(outs)} outputs, PyTorch gives {len(refs)}")
        ints = [a for a in case if not a.is_floating_point()]
        t_index = int(ints[0].flatten()[0]) if ints else None
        worst = max(worst, worst_error(outs, refs, names or [f"output_{i}" for i in range(len(refs))],
                                       t_index=t_index, sqrt_recipm1=amplification))
        if t_index is not None:
            used.append(t_index)
    return {"max_rel_to_scale": worst, "t_index": used}


def gate(check: dict[str, Any], tolerance: float, out_path, runtime: str, against: str = "PyTorch") -> dict[str, Any]:
    """``check`` (a compare's result) with its ``tolerance`` and verdict; FxpassError (exit 1), naming
    ``out_path`` as not written, where ``runtime`` differs from ``against`` by more than the tolerance."""
    check["tolerance"] = tolerance
    check["passed"] = check["max_rel_to_scale"] <= tolerance
    if not check["passed"]:
        raise FxpassError(f"{out_path}: not written: {runtime} differs from {against} by "
                          f"{check['max_rel_to_scale']:.3g}·max|ref| (tolerance {tolerance:g})", exit_code=1)
    return check
