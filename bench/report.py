"""Regenerate docs/performance.md's "## Performance" section from the latest results JSON.

    python -m bench.report                     # latest CAMUS results in bench/results/ → docs/performance.md
    python -m bench.report --results FILE --readme-path docs/performance.md
    python -m bench.report --print             # show the section, write nothing

Only the text between ``<!-- perf:start -->`` and ``<!-- perf:end -->`` is replaced; when the file has
no markers, the section and its markers are appended at the end.  The numbers come from the JSON,
never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .harness import RESULTS_DIR
from .summary import evaluate_targets, precision_cells, precision_notes

START = "<!-- perf:start -->"
END = "<!-- perf:end -->"
REPO = Path(__file__).resolve().parent.parent


class MarkerError(ValueError):
    pass


def latest_results(directory: Path = RESULTS_DIR, *, config: str | None = "CAMUS") -> Path:
    """The results file with the newest ``date`` (only runs of ``config`` unless it is None)."""
    best: tuple[str, str, Path] | None = None
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or "date" not in data or "cpu" not in data:
            continue
        if config is not None and data.get("config", {}).get("name") != config:
            continue
        key = (data["date"], path.name)
        if best is None or key > best[:2]:
            best = (*key, path)
    if best is None:
        what = f"{config} " if config else ""
        raise FileNotFoundError(f"{directory}: no {what}results JSON (run python -m bench first)")
    return best[2]


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:,.0f} ms" if seconds >= 0.1 else f"{seconds * 1e3:.1f} ms"


def _s(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def render_section(results: dict[str, Any], source: str = "") -> str:
    """The markdown of the "## Performance" section (without the markers)."""
    m, cpu, settings = results["machine"], results.get("cpu", {}), results["settings"]
    v = m["versions"]
    ram = f", {m['ram_bytes'] / 2**30:.0f} GiB RAM" if m.get("ram_bytes") else ""
    size = cpu.get("image_size")
    lines = [
        "## Performance",
        "",
        f"Measured by `python -m bench` on {m['cpu_model']} ({m['cores']} cores{ram}), {results['date'][:10]}; "
        f"torch {v['torch']}, ONNX Runtime {v['onnxruntime']}, fxpass {v['fxpass']}. Config {results['config']['name']}, "
        f"batch 1, {size}×{size}, float32 on the CPU, {settings['threads']} intra-op threads; "
        f"medians of {settings['runs']} runs after {settings['warmup']} warm-up"
        + (f"; 1-min load average at most {results['load']['max_load1']:.2f} during the run"
           if results.get("load", {}).get("max_load1") is not None else "") + ".",
        "",
        "| per denoising step | latency | vs eager | ONNX nodes |",
        "|---|---:|---:|---:|",
    ]
    eager = cpu.get("eager", {}).get("median_s")
    nodes = cpu.get("nodes", {})
    for label, key, node_key in (("eager PyTorch", "eager", None),
                                 ("naive `torch.onnx.export(dynamo=True)` on ONNX Runtime", "naive_ort", "naive"),
                                 ("fxpass on ONNX Runtime", "fxpass_ort", "fxpass")):
        t = cpu.get(key, {}).get("median_s")
        n = nodes.get(node_key) if node_key else None
        lines.append(f"| {label} | {_ms(t)} | {_x(t / eager) if t and eager else '—'} | {n if n else '—'} |")
    lines.append("")
    notes = []
    ratios = cpu.get("ratios", {})
    if ratios.get("fxpass_over_naive") is not None:
        notes.append(f"Per step, fxpass takes {ratios['fxpass_over_naive']:.2f}× the naive export's time")
    cli = cpu.get("lower_cli", {})
    if cli.get("wall_s") is not None:
        stages = ", ".join(f"{k} {val:.1f} s" for k, val in cli.get("stages_s", {}).items())
        notes.append(f"`fxpass lower` takes {_s(cli['wall_s'])} end to end ({stages}; the rest is start-up, "
                     f"loading the checkpoint and the ONNX Runtime check against PyTorch)")
    naive_build = cpu.get("naive_build", {})
    if naive_build.get("export_s") is not None:
        notes.append(f"The naive export itself takes {_s(naive_build['export_s'])}")
    sched = cpu.get("schedule", {})
    if "fxpass_ort" in sched:
        how = "measured" if not sched["extrapolated"] else (
            f"extrapolated from {sched['steps_timed']} evenly spaced steps")
        notes.append(f"A whole {sched['steps_total']}-step schedule: {_s(sched['fxpass_ort']['total_s'])} on one "
                     f"ONNX Runtime session vs {_s(sched['eager']['total_s'])} eager ({how})")
    flops = results.get("flops", {})
    if flops.get("gflop") is not None:
        notes.append(f"One step is {flops['gflop']:.1f} GFLOP (torch's FlopCounterMode)")
    lines += [f"- {n}." for n in notes]

    precision = render_precision(results.get("precision"))
    if precision:
        lines += ([] if lines[-1] == "" else [""]) + precision

    gpu = results.get("gpu") or {}
    rows = [r for r in gpu.get("rows", []) if "median_s" in r]
    if rows:
        lines += ["", f"On {gpu['device']['name']}:", "", "| runtime | precision | batch | per step | TFLOP/s |",
                  "|---|---|---:|---:|---:|"]
        for r in rows:
            tf = f"{r['achieved_tflops']:.1f}" if "achieved_tflops" in r else "—"
            lines.append(f"| {r['name']} | {r['precision']} | {r['batch']} | {_ms(r['median_s'])} | {tf} |")
    targets = evaluate_targets(results)
    if targets["applies_here"]:
        met = [f"{row['what'].replace('`', '')}: {'met' if row['met'] else 'not met' if row['met'] is False else 'not measured'}"
               for row in targets["rows"]]
        lines += ["", "Targets on this machine: " + "; ".join(met) + "."]
    lines += ["", f"Generated by `python -m bench --readme` from `{source or 'bench/results/'}`; do not edit by hand."]
    return "\n".join(lines)


def render_precision(section: dict[str, Any] | None) -> list[str]:
    """The precision table's markdown lines (none when the section was skipped or is missing)."""
    if not section or "rows" not in section:
        return [] if not section or "skipped" in section else [f"Precision section: error: {section.get('error')}"]
    lat = section.get("latency_config", {})
    size = lat.get("image_size")
    lines = [(f"Every runtime × precision on the CPU (batch 1, {size}×{size}, {section.get('threads')} threads, "
              "interleaved with eager PyTorch in the same process):"), "",
             "| runtime | precision | what | per step | vs eager | eps-MSE vs fp32, worst over t |",
             "|---|---|---|---:|---:|---|"]
    for c in precision_cells(section, _ms):
        lines.append(f"| {c['runtime']} | {c['precision']} | {c['what']} | {_cell(c['latency'])} | {c['vs_eager']} "
                     f"| {_cell(c['eps'])} |")
    lines.append("")
    lines += [f"- {n}." for n in precision_notes(section)]
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def replace_between_markers(text: str, body: str) -> str:
    """``text`` with everything between the perf markers replaced by ``body`` (markers kept)."""
    starts, ends = text.count(START), text.count(END)
    if starts == 0 and ends == 0:
        raise MarkerError(f"no {START} / {END} markers")
    if starts != 1 or ends != 1:
        raise MarkerError(f"expected one {START} and one {END}, found {starts} and {ends}")
    head, rest = text.split(START, 1)
    if END not in rest:
        raise MarkerError(f"{END} comes before {START}")
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body.strip()}\n{END}{tail}"


def update_text(text: str, body: str) -> str:
    """Replace between the markers; without markers, append them and the section at the end."""
    try:
        return replace_between_markers(text, body)
    except MarkerError as exc:
        if text.count(START) or text.count(END):
            raise
        del exc
        return text.rstrip("\n") + f"\n\n{START}\n{body.strip()}\n{END}\n"


def update_readme(readme: Path, results_file: Path) -> str:
    from fxpass.fileio import atomic_write_bytes

    results = json.loads(Path(results_file).read_text(encoding="utf-8"))
    try:
        source = str(Path(results_file).resolve().relative_to(REPO))
    except ValueError:
        source = Path(results_file).name
    body = render_section(results, source)
    new = update_text(readme.read_text(encoding="utf-8"), body)
    atomic_write_bytes(readme, lambda fh: fh.write(new.encode("utf-8")))
    return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", metavar="FILE.json", help="results file (default: the latest CAMUS run)")
    parser.add_argument("--results-dir", metavar="DIR", default=str(RESULTS_DIR))
    parser.add_argument("--readme-path", "--readme-file", dest="readme_path", metavar="FILE.md",
                        default=str(REPO / "docs" / "performance.md"))
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the section, write nothing")


def run(args) -> int:
    from fxpass.errors import FxpassError

    try:
        results_file = Path(args.results) if args.results else latest_results(Path(args.results_dir))
        if args.print_only:
            results = json.loads(results_file.read_text(encoding="utf-8"))
            print(render_section(results, results_file.name))
            return 0
        readme = Path(args.readme_path)
        update_readme(readme, results_file)
    except (OSError, MarkerError, json.JSONDecodeError, KeyError, FxpassError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    print(f"{readme}: Performance section regenerated from {results_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
