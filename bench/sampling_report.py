"""The results of ``python -m bench.sampling_time``: speed-ups against the paper row, the target, the table,
and the latest results file (``python docs/figures.py sampling-time`` prints its table).  Reads JSON only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .harness import RESULTS_DIR

KIND = "fxpass-bench-sampling/1"
#: the issue's target, on the 256×256 CAMUS config: --preset fast within these
TARGET = {"preset": "fast", "wall_s": 20.0, "peak_rss_mib": 1024.0, "image_size": 256}


def add_speedups(rows: list[dict[str, Any]]) -> str | None:
    """``vs_paper``: the reference paper row's time (fp32 · ort, timed where ``--paper-full`` timed it, else
    estimated; else the first paper row with a time) over each row's; ``vs_paper_same`` against the paper
    row of the row's own lowering and runtime.  Returns the reference's name."""
    papers = [r for r in rows if r["preset"] == "paper" and r.get("wall_s")]
    papers.sort(key=lambda r: (r["precision"] != "fp32" or r["runtime"] != "ort", r["estimated"]))
    if not papers:
        return None
    ref = papers[0]
    for row in rows:
        if not row.get("wall_s"):
            continue
        row["vs_paper"] = ref["wall_s"] / row["wall_s"]
        same = [p for p in papers if (p["precision"], p["runtime"]) == (row["precision"], row["runtime"])]
        row["vs_paper_same"] = same[0]["wall_s"] / row["wall_s"] if same else None
    return f"{ref['precision']} · {ref['runtime']} · paper" + (" (estimate)" if ref["estimated"] else "")


def evaluate_target(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's target on each ``--preset fast`` row with a time: met / not met (never asserted)."""
    size = results["config"]["image_size"]
    rows = []
    for r in results["rows"]:
        if r["preset"] == TARGET["preset"] and r.get("wall_s") is not None and not r["estimated"]:
            met = r["wall_s"] <= TARGET["wall_s"] and r["peak_rss_mib"] <= TARGET["peak_rss_mib"]
            rows.append({"row": _row_name(r), "met": met})
    return {**TARGET, "applies_here": size == TARGET["image_size"], "rows": rows}


def _row_name(r: dict[str, Any]) -> str:
    cache = f", --cache-interval {r['cache_interval']}" if r.get("cache_interval", 1) > 1 else ""
    return f"{r['precision']} · {r['runtime']} · {r['preset']}{cache}"


def _fmt_row(r: dict[str, Any]) -> str:
    preset = r["preset"] + (" (estimate)" if r["estimated"] else "")
    if r.get("cache_interval", 1) > 1:
        preset += f", `--cache-interval {r['cache_interval']}`"
    head = f"| {r['precision']} | {r['runtime']} | {preset} | {r['calls']:,} |"
    if r.get("wall_s") is None:
        why = (r.get("skipped") and f"skipped: {r['skipped']}") or f"error: {r.get('error')}"
        return f"{head} {why.replace('|', '/')} | — | — |"
    wall = f"{r['wall_s']:,.0f}" if r["wall_s"] >= 100 else f"{r['wall_s']:.1f}"
    wall = f"≈ {wall}" if r["estimated"] else wall
    rss = "—" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:,.0f}"
    ratio = r.get("vs_paper")
    vs = "—" if ratio is None else f"{ratio:.2f}×" if ratio < 10 else f"{ratio:.1f}×"
    return f"{head} {wall} | {rss} | {vs} |"


def render(results: dict[str, Any], source: str = "") -> str:
    """The markdown table of a results file, with how the paper rows were obtained and the machine line."""
    lines = ["| lowering | runtime | preset | model calls | wall s / image | peak RSS MiB | vs paper |",
             "|---|---|---|---:|---:|---:|---:|"]
    lines += [_fmt_row(r) for r in results["rows"]]
    s, c, m = results["settings"], results["config"], results["machine"]
    estimate = next((r for r in results["rows"] if r["estimated"] and r.get("per_call_s")), None)
    paper = (f"Paper rows (estimate): RePaint's paper setting, {estimate['calls']:,} model calls × the median of "
             f"{s['paper_calls']} calls of the same model and runtime in one process, at t_index spread over the "
             "table (no process start, model load or PNG write)" if estimate else "Paper rows: none estimated")
    if s["paper_full"]:
        paper += "; the paper rows without \"(estimate)\" ran `fxpass sample --preset paper` end to end"
    ref = results.get("paper_reference")
    lines += ["", paper + (f". \"vs paper\" is the time of {ref} over the row's." if ref else ".")]
    met = [f"{t['row']}: {'met' if t['met'] else 'not met'}" for t in results["target"]["rows"]]
    if met and results["target"]["applies_here"]:
        lines += ["", f"Target (`--preset fast` ≤ {TARGET['wall_s']:g} s per image, peak RSS ≤ "
                      f"{TARGET['peak_rss_mib'] / 1024:g} GiB): " + "; ".join(met) + "."]
    v = m["versions"]
    ram = f", {m['ram_bytes'] / 2**30:.0f} GiB RAM" if m.get("ram_bytes") else ""
    load = results.get("load", {}).get("max_load1")
    lines += ["", f"Measured by `python -m bench.sampling_time` on {m['cpu_model']} ({m['cores']} cores{ram}), "
                  f"{results['date'][:10]}; fxpass {v['fxpass']}, ONNX Runtime {v['onnxruntime']}, OpenVINO "
                  f"{v.get('openvino')}. Config {c['name']} ({c['image_size']}×{c['image_size']}, "
                  f"{c['respaced_steps']} respaced steps), random weights (`{s['weights']}`), lowered with "
                  "`--deep-cache`; wall time from the start of the sampling process to its written PNG, peak RSS "
                  "its high-water mark (`VmHWM`)"
                  + (f"; 1-min load average at most {load:.2f}" if load is not None else "")
                  + (f". From `{source}`." if source else ".")]
    return "\n".join(lines)


def latest_sampling_results(directory: Path = RESULTS_DIR, *, config: str | None = "CAMUS") -> Path:
    """The ``*-sampling.json`` results file with the newest date (only runs of ``config`` unless None)."""
    best = None
    for path in sorted(Path(directory).glob("*-sampling.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or data.get("kind") != KIND:
            continue
        if config is None or data.get("config", {}).get("name") == config:
            best = max(best or (data["date"], path.name, path), (data["date"], path.name, path))
    if best is None:
        raise FileNotFoundError(f"{directory}: no {config + ' ' if config else ''}*-sampling.json results "
                                "(run python -m bench.sampling_time first)")
    return best[2]
