"""``python -m bench``: eager PyTorch vs the naive dynamo export vs fxpass, measured side by side.

    python -m bench                              # CAMUS, 250-step schedule sampled (25 steps, extrapolated)
    python -m bench --full                       # ... every step of the schedule timed
    python -m bench --config small.yml --runs 7  # another config (results file named after it)
    python -m bench --repaint-full               # ... and a whole RePaint run (2,410 calls) on the fastest gated row
    python -m bench --readme                     # regenerate docs/performance.md
    python -m bench --show FILE.json             # print the tables of an earlier run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import SCHEMA
from .cpu import SECTIONS, Options
from .harness import MIN_RUNS, RESULTS_DIR, LoadSampler, machine_info, now_utc, results_path, set_threads, \
    short_error, write_results
from .precision import REPAINT_ROWS, ROW_KEYS, parse_rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--config", metavar="FILE", help="RePaint/guided-diffusion YAML (default: built-in CAMUS)")
    p.add_argument("--runs", type=int, default=MIN_RUNS, help=f"timed runs per measurement (≥ {MIN_RUNS})")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before each measurement")
    p.add_argument("--schedule", choices=("full", "sample"), default=None,
                   help="time every step of the schedule, or a sample extrapolated to the whole "
                        "(default: sample, full with --full)")
    p.add_argument("--full", action="store_true", help="same as --schedule full")
    p.add_argument("--schedule-steps", type=int, default=25, metavar="N",
                   help="steps timed in sample mode, evenly spaced (default 25)")
    p.add_argument("--skip", action="append", default=[], choices=SECTIONS, metavar="SECTION",
                   help=f"leave a section out (repeatable): {', '.join(SECTIONS)}")
    p.add_argument("--precision-images", type=int, default=32, metavar="N",
                   help="precision section: held-out digits the eps-MSE is measured on (default 32)")
    p.add_argument("--precision-rows", metavar="ROW,...",
                   help=f"precision section: only these rows (eager always): {', '.join(ROW_KEYS)}")
    p.add_argument("--repaint-full", nargs="?", const="auto", default=None, metavar="ROW",
                   help="precision section: time a whole RePaint run at the paper setting (t_T 250, jump_length 10, "
                        "jump_n_sample 10: 2,410 model calls) on ROW, by default the fastest ONNX Runtime/OpenVINO "
                        "row within the eps-MSE gate; off by default (about 15 min on CAMUS)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: every core)")
    p.add_argument("--out", metavar="FILE.json", help="results file (default: bench/results/<date>-<host-kind>.json)")
    p.add_argument("--results-dir", metavar="DIR", default=str(RESULTS_DIR))
    p.add_argument("--readme", action="store_true", help="regenerate docs/performance.md (the Performance page) and exit")
    p.add_argument("--readme-path", metavar="FILE.md", default=None,
                   help="with --readme: the file to update (default docs/performance.md)")
    p.add_argument("--results", metavar="FILE.json", help="with --readme: results file (default: the latest CAMUS run)")
    p.add_argument("--show", metavar="FILE.json", help="print the tables of a results file and exit")
    return p


def run_bench(*, config_path: str | None, opts: Options, log=print) -> dict[str, Any]:
    """Every section, in one process; returns the results dict (not yet written)."""
    import torch

    from fxpass.config import CAMUS, load_config

    from .cpu import make_setup, run_cpu
    from .flops import count_flops
    from .gpu import run_gpu, skip_reason
    from .summary import evaluate_targets

    cfg = load_config(config_path)
    threads = set_threads(opts.threads)
    load = LoadSampler()
    load.sample("start")
    started = time.perf_counter()
    name = "CAMUS" if cfg == CAMUS else Path(config_path).stem if config_path else "custom"
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "date": now_utc().isoformat(),
        "machine": machine_info(),
        "config": {"name": name, "path": str(config_path) if config_path else None, "values": cfg.to_dict()},
        "settings": {"runs": opts.runs, "warmup": opts.warmup, "threads": threads,
                     "ort_intra_op_num_threads": threads, "torch_num_threads": torch.get_num_threads(),
                     "schedule": opts.schedule, "schedule_steps": opts.schedule_steps,
                     "skipped_sections": sorted(opts.skip), "seed": opts.seed,
                     "precision_images": opts.precision_images, "precision_rows": opts.precision_rows,
                     "repaint_full": opts.repaint_full},
    }
    setup = make_setup(cfg, seed=opts.seed)
    results["flops"] = {"skipped": "--skip flops"}
    if "flops" not in opts.skip:
        log("flops: FlopCounterMode over one eager forward ...")
        try:
            results["flops"] = count_flops(setup.model, setup.eager_args())
        except Exception as exc:
            results["flops"] = {"error": short_error(exc)}
    results["cpu"] = run_cpu(setup, opts, config_path=config_path, load=load, log=log)
    if "precision" in opts.skip:
        results["precision"] = {"skipped": "--skip precision"}
    else:
        from .precision import run_precision

        try:
            results["precision"] = run_precision(setup, opts, proto=setup.fxpass_proto, load=load, log=log)
        except Exception as exc:
            results["precision"] = {"error": short_error(exc)}
        setup.fxpass_proto = None
    if "gpu" in opts.skip:
        results["gpu"] = {"skipped": "--skip gpu"}
    elif skip_reason():
        results["gpu"] = {"skipped": skip_reason()}
    else:
        log("gpu ...")
        try:
            results["gpu"] = run_gpu(setup, opts, flops_per_step=results.get("flops", {}).get("flops"), log=log)
        except Exception as exc:
            results["gpu"] = {"error": short_error(exc)}
    load.sample("end")
    results["load"] = load.summary()
    results["wall_s"] = time.perf_counter() - started
    results["targets"] = evaluate_targets(results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.readme:
        from . import report

        ns = argparse.Namespace(results=args.results, results_dir=args.results_dir, print_only=False,
                                readme_path=args.readme_path or str(report.REPO / "docs" / "performance.md"))
        return report.run(ns)
    from rich.console import Console

    from .summary import print_results

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    if args.show:
        print_results(json.loads(Path(args.show).read_text(encoding="utf-8")), console)
        return 0
    if args.runs < MIN_RUNS:
        parser.error(f"--runs {args.runs}: at least {MIN_RUNS} timed runs")
    if args.warmup < 0 or args.schedule_steps < 1:
        parser.error("--warmup must be ≥ 0 and --schedule-steps ≥ 1")
    if args.full and args.schedule == "sample":
        parser.error("--full contradicts --schedule sample")
    if args.precision_images < 1:
        parser.error("--precision-images must be ≥ 1")
    try:
        parse_rows(args.precision_rows)
    except ValueError as exc:
        parser.error(f"--precision-rows: {exc}")
    if args.repaint_full not in (None, "auto") and args.repaint_full not in REPAINT_ROWS:
        parser.error(f"--repaint-full {args.repaint_full}: choose one of {', '.join(REPAINT_ROWS)}")
    schedule = "full" if args.full else (args.schedule or "sample")
    opts = Options(runs=args.runs, warmup=args.warmup, schedule=schedule, schedule_steps=args.schedule_steps,
                   skip=frozenset(args.skip), threads=args.threads, precision_images=args.precision_images,
                   precision_rows=args.precision_rows, repaint_full=args.repaint_full)

    from fxpass.errors import FxpassError

    def log(message: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}")

    log(f"schedule section: {schedule}" + ("" if schedule == "full" else
                                           f" ({args.schedule_steps} evenly spaced steps, total EXTRAPOLATED; "
                                           "--full times every step)"))
    try:
        results = run_bench(config_path=args.config, opts=opts, log=log)
        out = Path(args.out) if args.out else results_path(results, Path(args.results_dir))
        write_results(results, out)
    except FxpassError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    print_results(results, console)
    console.print(f"results: {out}")
    return 0
