"""``fxpass evaluate --run``'s output: a table of quality against time, the JSON report and ``--plot``.

Prints and writes what :func:`fxpass.compare_runs.compare` returns; computes nothing.
"""

from __future__ import annotations

import json

from .output import console


def write_json(out, report: dict, *, force: bool = False) -> None:
    """``report`` as strict JSON at ``out``, written atomically (without ``force``, only if ``out`` still does
    not exist when it is written: of two runs racing for one new path, one fails)."""
    from ..fileio import atomic_write_bytes

    text = json.dumps(report, indent=1, allow_nan=False) + "\n"
    atomic_write_bytes(out, lambda fh: fh.write(text.encode("utf-8")), exclusive=not force)


def _diff(diff: dict | None, digits: int) -> str:
    if diff is None:
        return "—"
    se = "n/a" if diff["se"] is None else f"{diff['se']:.{digits}f}"
    return f"{diff['mean']:+.{digits}f} ± {se}"


def table(report: dict):
    """A row per run: calls and model seconds per image, mean PSNR and SSIM, the paired difference to the
    first run ± its standard error."""
    from rich import box
    from rich.table import Table

    s = report["settings"]
    cases = report["summary"][0]["cases"]
    t = Table(title=f"inpainted region, {cases} case(s) ({s['images']} image(s) x {len(report['masks'])} mask(s)), "
                    f"seed {s['seed']}: mean per image, differences to run 1 paired by case ± standard error",
              box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for name in ("run", "calls\n/image", "model s\n/image", "PSNR\n(dB)", "PSNR\nvs run 1", "SSIM", "SSIM\nvs run 1"):
        t.add_column(name, justify="left" if name == "run" else "right")
    for row in report["summary"]:
        diff = row.get("diff_to_first") or {}
        t.add_row(f"{row['run'] + 1}. {row['label']}", f"{row['calls_per_case']:g}", f"{row['seconds_per_case']:.3g}",
                  f"{row['psnr']:.2f}", _diff(diff.get("psnr"), 2), f"{row['ssim']:.3f}", _diff(diff.get("ssim"), 3))
    return t


def show(report: dict, outs: dict, seconds: float, force: bool = False) -> int:
    """Print the table; write ``-o`` and ``--plot`` where planned."""
    console().print(table(report), soft_wrap=True)
    summary = f"{len(report['runs'])} runs x {report['summary'][0]['cases']} cases, {seconds:.1f} s"
    if outs.get("-o") is not None:
        write_json(outs["-o"], report, force=force)
        summary = f"wrote {outs['-o']}: {summary}"
    if outs.get("--plot") is not None:
        from ..plots import plot_quality_vs_time

        plot_quality_vs_time(outs["--plot"], report["summary"], f"{report['model']}: quality against model time")
        summary += f"; wrote {outs['--plot']}"
    console().print(summary, soft_wrap=True)
    return 0
