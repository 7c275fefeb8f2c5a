"""``fxpass check OUT.onnx``: an ONNX model against PyTorch, ONNX Runtime, TensorRT and golden sets.

Exit codes: 0 every requested comparison passed; 1 a numeric failure (or a target that failed to
run); 3 a requested target is unavailable here (and nothing failed); 2 usage/file errors.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from ..errors import FxpassError
from ..metadata import PRECISIONS
from . import args as shared
from .output import console

#: images of --data used by default (eps-MSE at every step of the schedule for each)
DATA_COUNT = 32


def add_parser(sub, common) -> None:
    p = sub.add_parser("check", parents=[common],
                       help="compare an ONNX model with PyTorch, ONNX Runtime, TensorRT or a golden set",
                       epilog="exit status: 0 every requested comparison passed; 1 a numeric failure; "
                              "3 a requested target cannot run here (TensorRT missing, no CUDA device) and "
                              "nothing failed; 2 a usage or file error")
    p.add_argument("onnx", metavar="OUT.onnx", help="the lowered model: an ONNX file, or a LiteRT .tflite or "
                   "ORT-format .ort file written by fxpass lower --format tflite|ort (checked in its runtime against "
                   "--model)")
    p.add_argument("--model", metavar="MODEL.pt", help="the checkpoint it was lowered from (the torch reference)")
    shared.add_config(p, "YAML config (default: the ONNX model's fxpass.config metadata, else built-in CAMUS)")
    p.add_argument("--targets", metavar="LIST",
                   help="comma-separated of torch, ort, trt, openvino (OpenVINO CPU, f32), openvino-bf16 "
                        "(OpenVINO CPU, bf16 inference precision), litert (a .tflite file only) (default: torch,ort; "
                        "ort alone with only --golden; torch,litert for a .tflite)")
    p.add_argument("--golden", metavar="DIR", help="also compare against a golden set written by fxpass golden")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the precision the file must be, whose bound it is checked at (default fp32; a file whose "
                        "metadata says otherwise fails: its own label is never trusted)")
    p.add_argument("--lowering-report", metavar="REPORT.json",
                   help="take the expected precision from the --report of the fxpass lower run that made the file")
    p.add_argument("--tolerance", metavar="fp32|fp16|ATOL,RTOL",
                   help="ATOL is a fraction of max|reference| (default: the bound of --precision)")
    p.add_argument("--trust-golden-tolerance", action="store_true",
                   help="with --golden: use the manifest's tolerance even where it is looser than the precision's "
                        "(the output says so)")
    p.add_argument("--plot", metavar="FILE.png", help="plot ONNX Runtime's error against timestep, every t_index")
    p.add_argument("--all-steps", action="store_true", help="compare at every t_index of the schedule")
    p.add_argument("--data", metavar="DIR", help="held-out images: eps-MSE against the true noise at every schedule "
                   "step, ONNX Runtime against the eager model (the task metric for reduced precision)")
    p.add_argument("--data-count", type=shared.positive, metavar="N",
                   help=f"use the first N images of --data (default: all, at most {DATA_COUNT})")
    p.add_argument("--eps-budget", type=float, metavar="FRACTION",
                   help="with --data: fail where eps-MSE exceeds the eager model's by more than this (e.g. 0.05)")
    p.add_argument("--report", metavar="FILE.json", help="write the comparison figures as JSON")
    shared.add_model_class(p)
    shared.add_user_schedule(p)
    shared.add_seed(p)
    shared.add_force(p, "overwrite an existing --plot file")
    shared.add_trust(p)
    p.set_defaults(func=run)


def _targets(args) -> list[str]:
    from ..verify import parse_targets

    targets = parse_targets(args.targets) if args.targets else (
        ["torch", "ort"] if args.model or not args.golden else ["ort"])
    if "litert" in targets:
        raise FxpassError(f"--targets litert: LiteRT runs a .tflite file (fxpass check FILE.tflite), not {args.onnx}")
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
    from ..expected import asked_precision, check_structure
    from ..fileio import plan_outputs
    from ..golden import load_golden
    from ..metadata import read_file
    from ..verify import check_targets, parse_tolerance
    from . import user as user_flags

    t0 = time.perf_counter()
    user = user_flags.user_spec(args)
    suffix = Path(str(args.onnx)).suffix.lower()
    if suffix in MOBILE_FILES:
        return _check_mobile(args, user, t0, suffix)
    info = read_file(args.onnx, require=("table", "fixed", "step", "plain"))
    precision = asked_precision(info, args.precision, args.lowering_report)
    targets = _targets(args)
    if user:  # the schedule flags of the lower command, where given, say what the metadata says
        user_flags.agree_with_lowered(args, info)
    plan_outputs({"--plot": args.plot, "--report": args.report},
                 inputs=[args.onnx, args.model, args.config, args.golden, args.data, args.lowering_report],
                 force=args.force)
    _refuse_data_flags(args, targets)
    cfg = resolve_config(args.config, info.config, source=f"{info.path}: metadata", architecture=not user)
    tol = parse_tolerance(args.tolerance) if args.tolerance else None
    images = None
    if args.data:  # read before any long work: a bad directory fails at once
        from ..images import image_files, load_image_dir

        count = args.data_count or min(len(image_files(args.data)), DATA_COUNT)
        images = load_image_dir(args.data, info.inputs["x"][1][-1], count)
    check_structure(info, precision)  # structure before numbers
    if info.mode == "step":
        if sorted(targets) != ["ort", "torch"] or args.golden or args.data or args.plot or args.model_class \
                or args.model_factory:
            raise FxpassError(f"{info.path}: a step graph is checked against the eager model on ONNX Runtime only "
                              "(--model MODEL.pt; no --targets, --golden, --data, --plot or user class)")
        return _check_step(args, info, cfg, precision, tol)
    golden = load_golden(args.golden) if args.golden else None
    model = None
    if "torch" in targets:
        from ..load import load

        model = load(args.model, config=cfg, model_class=args.model_class, model_kwargs=args.model_kwargs,
                     trust_pickle=args.trust_pickle, allow_nonfinite=args.allow_nonfinite,
                     model_factory=args.model_factory)
        if user:  # called as it was lowered: the graph's inputs, then --input / --timestep-input
            model = user_flags.wrapped_for_graph(model, args, info)
        if precision != "fp32":
            _same_graph(info, model, cfg, precision, args.model, user=bool(user))
    every = ((args.plot and not args.data) or args.all_steps) and info.mode == "table"
    report = check_targets(info, targets=targets, model=model, model_label=str(args.model), golden=golden,
                           tolerance=tol, seed=args.seed, precision=precision,
                           trust_golden_tolerance=args.trust_golden_tolerance,
                           t_indices=list(range(len(info.timesteps))) if every else None,
                           fp16_build=precision == "fp16" or args.tolerance == "fp16",
                           progress=console(stderr=True).print)
    data = None
    if args.data:
        from ..fidelity import check_data

        data = check_data(info, model, args.data, seed=args.seed, budget=args.eps_budget, images=images)
    if args.plot and data is not None:
        from ..plots import plot_eps_mse

        plot_eps_mse(args.plot, data, info.path.name)
    elif args.plot:
        from ..plots import plot_errors
        from ..gate import default_tolerance

        plot_errors(args.plot, [r for r in report.torch_rows if r.target.startswith("onnxrt")], info,
                    tol or default_tolerance(precision))
    _print(report, info, args, time.perf_counter() - t0, data)
    if args.report:
        _write_report(args.report, report, data)
    code = report.exit_code
    return 1 if data is not None and data["failed"] else code


def _refuse_data_flags(args, targets) -> None:
    if args.data and "torch" not in targets:
        raise FxpassError("--data compares with the eager model: it needs --model MODEL.pt")
    if args.eps_budget is not None and (not args.data or not 0 < args.eps_budget < 10):
        raise FxpassError("--eps-budget: a fraction such as 0.05, with --data")


def _same_graph(info, model, cfg, precision: str, label, user: bool = False) -> None:
    """A reduced-precision file must be the float32 graph the model lowers to (fxpass.equivalence); a user's
    model is lowered on inputs of the file's shapes."""
    from ..same_graph import check_same_graph, graph_example

    console(stderr=True).print(f"comparing {info.path}'s graph with the float32 graph of {label} ...", soft_wrap=True)
    example = graph_example(info) if user else None
    console().print(check_same_graph(info, model, cfg, precision, str(label), example), soft_wrap=True)


def _check_step(args, info, cfg, precision: str, tol, runner=None) -> int:
    """A --step-graph file: ONNX Runtime (or ``runner``: a step-graph .tflite in LiteRT) against the eager model +
    the NumPy sampler's posterior, every output (x_prev, pred_xstart), at the asked precision's bound (the
    lowering gate's comparison)."""
    import onnx

    from ..gate import check_step_against_numpy, default_tolerance
    from ..load import load

    model = load(args.model, config=cfg, trust_pickle=args.trust_pickle, allow_nonfinite=args.allow_nonfinite)
    if precision != "fp32" and runner is None:
        _same_graph(info, model, cfg, precision, args.model)
    elif precision != "fp32":  # a mobile step file: the float32 graph it records
        _recorded_graph(info, model, cfg, args.model)
    litert = runner is not None and str(info.path).lower().endswith(".tflite")
    tolerance = tol or (_tflite_tolerance(precision) if litert else default_tolerance(precision))
    every = list(range(len(info.timesteps))) if args.all_steps else None
    result = check_step_against_numpy(info if runner is not None else onnx.load(str(info.path)), model, config=cfg,
                                      t_indices=every, seed=args.seed, tolerance=tolerance, runner=runner)
    status = "pass" if result["passed"] else "FAIL"
    console().print(f"fxpass check {info.path} (step graph, {precision}): {result['runtime']} vs {result['reference']}: "
                    f"{result['max_rel_to_scale']:.3g}·max|ref| (pred_xstart divided by sqrt(1/abar - 1)), "
                    f"tolerance {tolerance[0]:g}: {status}", soft_wrap=True)
    if args.report:
        import json

        from ..fileio import atomic_write_bytes

        text = json.dumps({"step_graph": result, "precision": precision}, indent=2, default=float) + "\n"
        atomic_write_bytes(args.report, lambda fh: fh.write(text.encode()))
    return 0 if result["passed"] else 1


#: mobile files ``check`` runs here, by suffix: (what it is, its runtime's --targets name)
MOBILE_FILES = {".tflite": ("a LiteRT file", "litert"), ".ort": ("an ORT-format file", "ort")}


def _check_mobile(args, user, t0: float, suffix: str) -> int:
    """A LiteRT file (``fxpass lower --format tflite``) in LiteRT's interpreter, or an ORT-format file (``--format
    ort``) in ONNX Runtime, against the eager model: table, fixed or step mode, at the asked precision's bound,
    after the structure its precision makes (the fxpass metadata stored in the file says its schedule and
    config)."""
    from ..config import resolve_config
    from ..expected import asked_precision
    from ..fileio import plan_outputs
    from ..load import load
    from ..verify import check_targets, parse_targets, parse_tolerance

    what, runtime = MOBILE_FILES[suffix]
    if runtime == "litert":
        from ..formats.tflite_file import read_tflite as read
    else:
        from ..formats.ort_file import read_ort as read
    info = read(args.onnx, require_modes=("table", "fixed", "step"))
    precision = asked_precision(info, args.precision, args.lowering_report)
    targets = parse_targets(args.targets) if args.targets else ["torch", runtime]
    if sorted(targets) != sorted(["torch", runtime]) or not args.model or args.golden or args.data or args.plot \
            or user or args.model_class or args.model_factory:
        raise FxpassError(f"{info.path}: {what} is checked against the eager model in its runtime (--model MODEL.pt; "
                          f"--targets torch,{runtime}; no --golden, --data, --plot or user model flags)")
    plan_outputs({"--report": args.report}, inputs=[args.onnx, args.model, args.config, args.lowering_report],
                 force=args.force)
    _mobile_structure(info, precision, runtime)
    cfg = resolve_config(args.config, info.config, source=f"{info.path}: metadata")
    tol = parse_tolerance(args.tolerance) if args.tolerance else None
    if info.mode == "step":  # x_prev and pred_xstart in the runtime against the eager model + the NumPy posterior
        return _check_step(args, info, cfg, precision, tol, runner=_step_runner(info.path, runtime))
    model = load(args.model, config=cfg, trust_pickle=args.trust_pickle, allow_nonfinite=args.allow_nonfinite)
    if precision != "fp32":  # structure before numbers: the recorded float32 graph is the model's
        _recorded_graph(info, model, cfg, args.model)
    every = args.all_steps and info.mode == "table"
    report = check_targets(info, targets=targets, model=model, model_label=str(args.model), seed=args.seed,
                           tolerance=tol, precision=precision,
                           t_indices=list(range(len(info.timesteps))) if every else None,
                           progress=console(stderr=True).print)
    _print(report, info, args, time.perf_counter() - t0)
    if args.report:
        _write_report(args.report, report, None)
    return report.exit_code


def _recorded_graph(info, model, cfg, label) -> None:
    from ..same_graph import check_recorded_graph

    console(stderr=True).print(f"re-deriving the float32 graph of {label} that {info.path} records ...", soft_wrap=True)
    console().print(check_recorded_graph(info, model, cfg, str(label)), soft_wrap=True)


def _mobile_structure(info, precision: str, runtime: str) -> None:
    """Structure before numbers: what ``precision`` makes of the file (LiteRT: float16 / int8 weights; ORT format:
    the ONNX rule on its op types and weight types)."""
    from ..expected import check_structure

    if runtime == "ort":
        check_structure(info, precision)
        return
    from ..formats.tflite_file import structure_problem

    problem = structure_problem(info.tflite, precision)
    if problem:
        raise FxpassError(f"{info.path}: checked as {precision}, but {problem}", exit_code=1)


def _step_runner(path, runtime: str):
    if runtime == "litert":
        from targets.litert import litert_runner

        from ..metadata import STEP_OUTPUTS

        return litert_runner(path, output_names=STEP_OUTPUTS)
    from targets.ort import ort_runner

    return ort_runner(str(path), cuda=False, name="onnxrt-cpu")


def _write_report(path, report, data) -> None:
    import dataclasses
    import json

    from ..fileio import atomic_write_bytes

    payload = {"rows": [dataclasses.asdict(r) for r in report.rows], "data": data, "exit_code": report.exit_code,
               "notes": report.notes}
    text = json.dumps(payload, indent=2, default=float) + "\n"
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def _print_data(out, data) -> None:
    from rich import box
    from rich.table import Table

    rows = data["rows"]
    names = list(rows[0]["eps_mse"])
    table = Table(title=f"eps-MSE on {data['images']} images of {data['data']} (seed {data['seed']})",
                  title_justify="left", box=box.SIMPLE_HEAD)
    for column in ["t_index", "timestep", *names, *(f"{n} / ref" for n in rows[0]["ratio"])]:
        table.add_column(column, justify="right")
    shown = sorted({*range(0, len(rows), max(1, len(rows) // 10)), len(rows) - 1})
    for k in shown:
        r = rows[k]
        table.add_row(str(r["t_index"]), str(r["timestep"]), *(f"{r['eps_mse'][n]:.4g}" for n in names),
                      *(f"{v:.4f}" for v in r["ratio"].values()))
    out.print(table)
    for name, worst in data["summary"]["worst_ratio"].items():
        out.print(f"{name}: eps-MSE ratio to torch-fp32 furthest from 1 at t_index {worst['t_index']} "
                  f"(timestep {worst['timestep']}): {worst['ratio']:.4f}", soft_wrap=True)
    for line in data["failed"]:
        out.print(f"FAIL {line}", soft_wrap=True)


def _print(report, info, args, seconds: float, data=None) -> None:
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
    for note in report.notes:
        out.print(f"note: {note}", soft_wrap=True)
    if data is not None:
        _print_data(out, data)
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
    failed = report.failed or bool(data and data["failed"])
    status = "FAIL" if failed else ("incomplete (unavailable targets)" if report.unavailable else "pass")
    out.print(f"check: {status} ({seconds:.1f} s)")


def _tflite_tolerance(precision: str) -> tuple[float, float]:
    """The bound a LiteRT file of ``precision`` is written at (:func:`fxpass.formats.tflite.tolerance_for`)."""
    from ..formats.tflite import tolerance_for

    return tolerance_for(precision), 0.0
