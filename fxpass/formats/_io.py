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
