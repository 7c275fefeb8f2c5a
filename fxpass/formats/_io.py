"""Small helpers shared by the format writers: output paths, seeded inputs, relative error."""

from __future__ import annotations

from pathlib import Path

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
