"""Plots (matplotlib, an optional extra): a check's error against the timestep."""

from __future__ import annotations

import io
from pathlib import Path

from .fileio import atomic_write_bytes


def plot_errors(path: Path, rows: list, info, tol: tuple[float, float]) -> None:
    """Each row's error against the timestep (log scale) with the tolerance line, as a PNG written atomically."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for row in rows:
        points = sorted((e["timestep"], max(e["rel_to_scale"], 1e-12)) for e in row.per_iteration)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", linewidth=1,
                label=f"{row.target} vs {row.reference}")
    ax.axhline(tol[0], color="tab:red", linestyle="--", linewidth=1, label=f"tolerance {tol[0]:g}·max|ref|")
    ax.set_yscale("log")
    ax.set_xlabel("timestep" + (" (fixed)" if info.mode == "fixed" else f" ({len(info.timesteps)} steps, every t_index)"))
    ax.set_ylabel("max |diff| / max |reference|")
    ax.set_title(f"{info.path.name}: error against PyTorch over the schedule")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, lambda fh: fh.write(buffer.getvalue()))
