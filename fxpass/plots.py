"""Plots (matplotlib, an optional extra): a check's error against the timestep; quality against time."""

from __future__ import annotations

import io
from pathlib import Path

from .fileio import atomic_write_bytes


def _save_png(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, lambda fh: fh.write(buffer.getvalue()))


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
    _save_png(fig, path)


def plot_eps_mse(path: Path, data: dict, title: str) -> None:
    """eps-MSE per runtime (top) and its ratio to the reference (bottom) against the timestep, as a PNG."""
    from matplotlib.figure import Figure

    rows = data["rows"]
    t = [r["timestep"] for r in rows]
    fig = Figure(figsize=(8, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for name in rows[0]["eps_mse"]:
        top.plot(t, [r["eps_mse"][name] for r in rows], marker=".", linewidth=1, label=name)
    top.set_yscale("log")
    top.set_ylabel("eps-MSE vs the true noise")
    top.legend()
    for name in rows[0]["ratio"]:
        bottom.plot(t, [r["ratio"][name] for r in rows], marker=".", linewidth=1, label=f"{name} / reference")
    if data.get("budget") is not None:
        bottom.axhline(1 + data["budget"], color="tab:red", linestyle="--", linewidth=1, label="budget")
    bottom.axhline(1.0, color="gray", linewidth=0.8)
    bottom.set_xlabel("timestep")
    bottom.set_ylabel("eps-MSE ratio")
    bottom.legend()
    for ax in (top, bottom):
        ax.grid(True, which="both", alpha=0.3)
    top.set_title(f"{title}: {data['images']} held-out images, every schedule step")
    _save_png(fig, path)


def plot_quality_vs_time(path: Path, summary: list[dict], title: str) -> None:
    """Mean PSNR (left) and SSIM (right) against model seconds per image, one labelled point per run
    (``fxpass evaluate --run``'s summary), as a PNG written atomically."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric, unit in zip(axes, ("psnr", "ssim"), ("PSNR (dB)", "SSIM")):
        for row in summary:
            ax.plot(row["seconds_per_case"], row[metric], marker="o", linestyle="none")
            ax.annotate(row["label"], (row["seconds_per_case"], row[metric]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        ax.set_xlabel("model seconds per image")
        ax.set_ylabel(f"mean {unit}, unknown region")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    _save_png(fig, path)
