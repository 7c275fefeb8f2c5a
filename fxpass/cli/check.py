"""``fxpass check OUT.onnx``: an ONNX model against PyTorch, ONNX Runtime, TensorRT and golden sets.

Exit codes: 0 every requested comparison passed; 1 a numeric failure (or a target that failed to
run); 3 a requested target is unavailable here (and nothing failed); 2 usage/file errors.
"""

from __future__ import annotations

import importlib.util
import time

from ..errors import FxpassError
from . import args as shared
from .output import console


def add_parser(sub, common) -> None:
    p = sub.add_parser("check", parents=[common],
                       help="compare an ONNX model with PyTorch, ONNX Runtime, TensorRT or a golden set",
                       epilog="exit status: 0 every requested comparison passed; 1 a numeric failure; "
                              "3 a requested target cannot run here (TensorRT missing, no CUDA device) and "
                              "nothing failed; 2 a usage or file error")
    p.add_argument("onnx", metavar="OUT.onnx")
    p.add_argument("--model", metavar="MODEL.pt", help="the checkpoint it was lowered from (the torch reference)")
    shared.add_config(p, "YAML config (default: the ONNX model's fxpass.config metadata, else built-in CAMUS)")
    p.add_argument("--targets", metavar="LIST",
                   help="comma-separated of torch, ort, trt (default: torch,ort; ort alone with only --golden)")
    p.add_argument("--golden", metavar="DIR", help="also compare against a golden set written by fxpass golden")
    p.add_argument("--tolerance", metavar="fp32|fp16|ATOL,RTOL",
                   help="ATOL is a fraction of max|reference| (default: by the model's precision)")
    p.add_argument("--plot", metavar="FILE.png", help="plot ONNX Runtime's error against timestep, every t_index")
    p.add_argument("--all-steps", action="store_true", help="compare at every t_index of the schedule")
    shared.add_model_class(p)
    shared.add_seed(p)
    shared.add_force(p, "overwrite an existing --plot file")
    shared.add_trust(p)
    p.set_defaults(func=run)


def _targets(args) -> list[str]:
    from ..verify import parse_targets

    targets = parse_targets(args.targets) if args.targets else (
        ["torch", "ort"] if args.model or not args.golden else ["ort"])
    if "torch" in targets and not args.model:
        raise FxpassError("--model MODEL.pt is needed for the torch reference (or give --golden DIR "
                          "and --targets without torch)")
    if len(targets) == 1 and targets[0] != "torch" and not args.golden:
        raise FxpassError(f"--targets {targets[0]}: nothing to compare against; add torch or give --golden DIR")
    if targets == ["torch"] and not args.golden:
        raise FxpassError("--targets torch: nothing to compare against; add ort or trt")
    if args.plot:
        if "torch" not in targets or "ort" not in targets:
            raise FxpassError("--plot draws ONNX Runtime against PyTorch: it needs the torch and ort targets")
        if importlib.util.find_spec("matplotlib") is None:
            raise FxpassError("--plot: matplotlib is not installed (pip install 'fxpass[plot]')")
    return targets


def run(args) -> int:
    from ..config import resolve_config
    from ..fileio import plan_outputs
    from ..golden import load_golden
    from ..metadata import read_file
    from ..verify import check_targets, parse_tolerance

    t0 = time.perf_counter()
    info = read_file(args.onnx, require=("table", "fixed"))
    targets = _targets(args)
    plan_outputs({"--plot": args.plot}, inputs=[args.onnx, args.model, args.config, args.golden], force=args.force)
    cfg = resolve_config(args.config, info.config, source=f"{info.path}: metadata")
    tol = parse_tolerance(args.tolerance) if args.tolerance else None
    golden = load_golden(args.golden) if args.golden else None
    model = None
    if "torch" in targets:
        from ..pipeline import load

        model = load(args.model, config=cfg, model_class=args.model_class, model_kwargs=args.model_kwargs,
                     trust_pickle=args.trust_pickle, allow_nonfinite=args.allow_nonfinite)
    every = (args.plot or args.all_steps) and info.mode == "table"
    report = check_targets(info, targets=targets, model=model, model_label=str(args.model), golden=golden,
                           tolerance=tol, seed=args.seed,
                           t_indices=list(range(len(info.timesteps))) if every else None,
                           fp16_build=info.precision == "fp16" or args.tolerance == "fp16",
                           progress=console(stderr=True).print)
    if args.plot:
        from ..plots import plot_errors
        from ..verify import default_tolerance

        plot_errors(args.plot, [r for r in report.torch_rows if r.target.startswith("onnxrt")], info,
                    tol or default_tolerance(info.precision))
    _print(report, info, args, time.perf_counter() - t0)
    return report.exit_code


def _print(report, info, args, seconds: float) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    out = console()
    rows = report.rows
    title = escape(f"fxpass check {info.path}" + (f" (golden: {args.golden})" if args.golden else ""))
    counts = sorted({(r.reference, r.inputs) for r in rows if r.inputs})
    caption = ("rel = max|diff| / max|reference|, which the tolerance bounds; inputs: "
               + ", ".join(f"{n} against {ref}" for ref, n in counts))
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, caption=escape(caption),
                  caption_justify="left")
    for column in ("reference", "target", "max abs", "max rel", "tolerance", "result"):
        table.add_column(column, justify="right" if column in ("max abs", "max rel", "tolerance") else "left",
                         no_wrap=True)
    for row in rows:
        if row.status in ("pass", "FAIL"):
            table.add_row(row.reference, row.target, f"{row.max_abs:.3g}", f"{row.max_rel:.3g}",
                          f"{row.tolerance[0]:.3g}" + (f", rtol {row.tolerance[1]:g}" if row.tolerance[1] else ""),
                          row.status)
        else:
            table.add_row(row.reference, row.target, "", "", "", row.status)
    out.print(table)
    for row in rows:
        if row.status == "FAIL" and row.detail:
            out.print(f"{row.target} vs {row.reference}: FAIL, {row.detail}", soft_wrap=True)
        elif row.status == "FAIL":
            worst = max(row.per_iteration, key=lambda e: e["rel_to_scale"])
            where = ", ".join(f"{k} {worst[k]}" for k in ("t_index", "timestep", "input") if k in worst)
            out.print(f"{row.target} vs {row.reference}: FAIL, worst at {where}: {worst['max_abs']:.3g} abs = "
                      f"{worst['rel_to_scale']:.3g}·max|ref| > {row.tolerance[0]:g}", soft_wrap=True)
        elif row.status in ("unavailable", "error"):
            out.print(f"{row.target}: {row.status}: {row.detail}", soft_wrap=True)
    if args.plot:
        out.print(f"wrote {args.plot}", soft_wrap=True)
    status = "FAIL" if report.failed else ("incomplete (unavailable targets)" if report.unavailable else "pass")
    out.print(f"check: {status} ({seconds:.1f} s)")
