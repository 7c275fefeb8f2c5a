"""``fxpass lower MODEL.pt -o OUT.onnx``: the whole pipeline (load → … → verify → write) and its summary."""

from __future__ import annotations

from . import args as shared
from .output import console


def add_parser(sub, common) -> None:
    p = sub.add_parser("lower", parents=[common], help="lower MODEL.pt to ONNX (checked against PyTorch)")
    p.add_argument("model", metavar="MODEL.pt")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    shared.add_config(p)
    p.add_argument("--timesteps", default="respaced", metavar="respaced|INT",
                   help="'respaced' (default): the config's whole schedule as tables gathered by t_index; "
                        "an integer: fold that one timestep")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8"), default="fp32",
                   help="fp16: float16 with float32 islands; bf16: the float32 file checked and meant for "
                        "OpenVINO's bf16 inference (CPUs with AVX-512 BF16/AMX); int8: W8A8 QDQ by ONNX Runtime's "
                        "quantizer with timestep-aware calibration and a measured precision plan")
    q = p.add_argument_group("int8 (--precision int8)")
    q.add_argument("--calibration-data", metavar="DIR",
                   help="images to calibrate on and judge the plan by (noised along the schedule); this or "
                        "--calibrate-on-samples is required")
    q.add_argument("--calibrate-on-samples", action="store_true",
                   help="calibrate on and judge the plan by the model's own trajectories instead of images (for "
                        "models with no data at hand, e.g. random weights; the report says so)")
    q.add_argument("--calibration-steps", type=int, default=8, metavar="N",
                   help="schedule positions calibrated at, spread over the schedule (default 8)")
    q.add_argument("--calibration-samples", type=int, default=4, metavar="N",
                   help="images or trajectories calibrated on (default 4)")
    q.add_argument("--eval-samples", type=int, default=4, metavar="N",
                   help="further images or trajectories the plan is judged on (default 4)")
    q.add_argument("--error-budget", type=float, default=0.05, metavar="F",
                   help="largest eps-MSE increase over float32 allowed at any evaluated step (default 0.05 = 5%%)")
    q.add_argument("--reduce-range", choices=("auto", "on", "off"), default="auto",
                   help="7-bit weights (ONNX Runtime's reduce_range): auto (default) where this CPU needs them "
                        "(x86 without VNNI, whose ORT kernels saturate 8-bit weights); on for such targets")
    q.add_argument("--precision-plan", metavar="FILE.json",
                   help="reuse a plan (a plan file or the --report of an earlier int8 lowering) instead of searching")
    p.add_argument("--capture", choices=("auto", "trace", "export"), default="auto",
                   help="how the model becomes a graph: trace (fxpass's example-value tracer: guided-diffusion code), "
                        "export (torch.export, static shapes: einops layers, index assignment, other libraries' "
                        "code), auto (default: trace, then export where the tracer refuses the code)")
    p.add_argument("--opset", type=int, default=21)
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension symbolic")
    shared.add_model_class(p)
    shared.add_user_schedule(p)
    p.add_argument("--simplifier", choices=("onnxslim", "none"), default="onnxslim")
    p.add_argument("--group-norm", choices=("auto", "all", "keep"), default="auto",
                   help="auto: GroupNorms over 2M elements per sample become LayerNormalization on a grouped "
                        "view (ONNX Runtime CPU runs that ~2x faster), all of them for --format ort (static "
                        "shapes the CoreML/NNAPI providers take); all; keep: one GroupNormalization node each")
    p.add_argument("--step-graph", action="store_true",
                   help="export one whole denoising step (U-Net + posterior update, coefficients gathered by "
                        "t_index): inputs x, t_index, noise; outputs x_prev, pred_xstart")
    p.add_argument("--deep-cache", type=shared.positive, nargs="?", const=1, default=None, metavar="LEVEL",
                   help="also write NAME.shallow.onnx: the graph a cached call runs once the deep feature at skip "
                        "connection LEVEL (1, the default: the one nearest the output) is given; the full graph "
                        "outputs that feature as 'cache' (for sample/evaluate --cache-interval)")
    p.add_argument("--format", choices=("onnx", "ort", "pte", "mlpackage", "tflite"), default="onnx",
                   help="onnx (default); ort: ONNX Runtime's mobile format (with the CoreML/NNAPI coverage in the "
                        "report); pte: ExecuTorch with XNNPACK; mlpackage: Core ML (a directory); tflite: LiteRT "
                        "(int8: dynamic-range). ort, pte and mlpackage need pip install 'fxpass[mobile]', tflite "
                        "pip install 'fxpass[tflite]'")
    p.add_argument("--palettize-bits", type=int, choices=(1, 2, 3, 4, 6, 8), metavar="6|8",
                   help="--format mlpackage: k-means palettized weights (2^bits entries per tensor; iOS 16+)")
    p.add_argument("--report", metavar="FILE.json", help="write the summary numbers as JSON")
    shared.add_force(p, "overwrite existing outputs; write even when the ORT check fails (exit 1)")
    shared.add_trust(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..pipeline import run as run_pipeline

    err = console(stderr=True)

    def progress(stage: str, state: str) -> None:
        if stage == "precision" and not state.endswith(" s") and state != "start":
            err.print(f"  {state}")  # the int8 plan search, step by step
        elif state != "start":
            err.print(f"✓ {stage:<9} {state}")

    lowered = run_pipeline(request_from(args), progress=progress)
    _summary(lowered, args)
    return 0 if lowered.passed else 1


def request_from(args):
    """The :class:`~fxpass.request.LowerRequest` of ``fxpass lower``'s flags (the one place they are read)."""
    from ..config import load_config
    from ..export import check_opset
    from ..request import Check, LowerRequest, Output, Rewrite, Source
    from .user import schedule_config, user_spec

    check_opset(args.opset)
    int8 = _int8_options(args)
    user = user_spec(args)
    cfg = schedule_config(args, user) if user else load_config(args.config)
    source = Source(checkpoint=args.model, config=cfg, model_class=args.model_class, model_factory=args.model_factory,
                    model_kwargs=args.model_kwargs, trust_pickle=args.trust_pickle,
                    allow_nonfinite=args.allow_nonfinite, timestep_input=args.timestep_input,
                    inputs=tuple(args.inputs), timestep_values=args.timestep_values,
                    model_output=args.model_output, capture=args.capture)
    rewrite = Rewrite(timesteps=args.timesteps, step_graph=args.step_graph, dynamic_batch=args.dynamic_batch,
                      opset=args.opset, simplifier=None if args.simplifier == "none" else args.simplifier,
                      group_norm=args.group_norm, precision=args.precision, int8=int8, deep_cache=args.deep_cache)
    output = Output(path=args.output, report=args.report, format=args.format, palettize_bits=args.palettize_bits,
                    force=args.force, protected=(args.config, args.precision_plan, args.calibration_data))
    return LowerRequest(source, rewrite, output, Check())


def _int8_options(args):
    from ..errors import FxpassError

    flags = {"--calibration-data": args.calibration_data, "--precision-plan": args.precision_plan,
             "--calibrate-on-samples": args.calibrate_on_samples or None}
    given = [f for f, v in flags.items() if v is not None]
    if args.precision != "int8":
        if given:
            raise FxpassError(f"{given[0]} applies to --precision int8 only")
        return None
    from ..precision import Int8Options

    if args.calibration_data is not None:
        from pathlib import Path

        if not Path(args.calibration_data).is_dir():
            raise FxpassError(f"{args.calibration_data}: --calibration-data needs a directory of images")
    if args.precision_plan is not None:  # read now: a file that is no plan is refused before the lowering
        from ..precision.plan import PrecisionPlan

        PrecisionPlan.load(args.precision_plan)
    options = Int8Options(calibration_data=args.calibration_data, calibration_steps=args.calibration_steps,
                          calibration_samples=args.calibration_samples, eval_samples=args.eval_samples,
                          error_budget=args.error_budget, plan=args.precision_plan, reduce_range=args.reduce_range,
                          self_calibration=args.calibrate_on_samples)
    if args.format != "tflite":  # LiteRT's int8 is dynamic-range: no calibration (the request refuses its flags)
        options.check()
    return options


def _summary(lowered, args) -> None:
    from rich.table import Table

    report, check = lowered.report, lowered.check
    table = Table(title=f"fxpass lower → {args.output}", show_header=False)
    mode = "step graph" if args.step_graph else lowered.mode
    table.add_row("mode", f"{mode} ({len(lowered.timesteps)} timesteps)" if lowered.mode == "table"
                  else "plain (no timestep: nothing folded)" if lowered.mode == "plain"
                  else f"fixed timestep {lowered.timesteps[0]}")
    route = report.get("capture_route") or {}
    if route.get("route") == "export":
        table.add_row("capture", f"torch.export (route 2): {route['why']}")
    elif route:
        table.add_row("capture", "example-value tracer (route 1)")
    table.add_row("precision / opset", f"{args.precision} / {args.opset}")
    table.add_row("fx nodes", f"{report['fx_nodes_captured']} captured → {report['fx_nodes_rewritten']} rewritten")
    nodes = f"{report['onnx_nodes_exported']} exported → {report.get('onnx_nodes_before_precision', report['onnx_nodes'])}" \
        " after surgery"
    if "onnx_nodes_before_precision" in report:
        nodes += f" → {report['onnx_nodes']} with {args.precision}"
    table.add_row("ONNX nodes", nodes)
    for entry in report.get("surgery", {}).get("passes", []):
        kept: dict[str, int] = {}
        for reason, n in (entry.get("skipped") or {}).items():  # "below min_elements (16,384 < …)": by kind
            kind = reason.split(" (")[0]
            kept[kind] = kept.get(kind, 0) + n
        if kept:
            table.add_row(f"  {entry['pass']}", f"{entry['count']} rewritten; left: " + "; ".join(
                f"{n} {reason}" for reason, n in kept.items()))
    plan = report.get("int8", {}).get("plan_lines")
    if plan:
        table.add_row("int8 plan" + (" (reused)" if report["int8"].get("reused_plan") else ""), "\n".join(plan))
    table.add_row("file size", f"{(report.get('file_bytes') or 0) / 2**20:.1f} MiB")
    cut = report.get("deep_cache")
    if cut:
        table.add_row("deep cache", f"level {cut['level']} of {cut['skip_connections']} ({cut['feature']}): shallow graph "
                                    f"{cut['nodes']['shallow']} of {cut['nodes']['full']} nodes, "
                                    f"{cut['gflop']['shallow']:.3g} of {cut['gflop']['full']:.3g} GFLOP, "
                                    f"{cut['latency']['shallow_s'] * 1000:.1f} of {cut['latency']['full_s'] * 1000:.1f} ms; "
                                    f"identity {cut['check']['max_rel_to_scale']:.2g}·max|ref|")
    fmt = report.get("format")
    if fmt:
        check_fmt = fmt.get("check") or {}
        verdict = ("skipped: " + str(check_fmt["skipped"])) if "skipped" in check_fmt else (
            f"{check_fmt.get('max_rel_to_scale', float('nan')):.3g}·max|ref| against "
            + ("the ONNX" if fmt["name"] == "ort" else "the rewritten graph"))
        table.add_row(f"{fmt['name']} file", verdict)
        if "latency_ms" in fmt:  # LiteRT: the interpreter beside ONNX Runtime, same inputs
            table.add_row("  LiteRT latency (CPU)", f"{fmt['latency_ms']:.0f} ms (ONNX Runtime {fmt['ort_latency_ms']:.0f} "
                          f"ms); {fmt['gather_ops']} table gathers")
        for entry in (fmt.get("delegates") or {}).values():  # LiteRT: the delegates' op lists (from their source)
            table.add_row(f"  {entry['name']}", f"{entry['ops_listed']}/{entry['ops']} ops of a listed type; not "
                          f"listed: {', '.join(entry['not_listed']) or 'none'} ({entry['version']})")
        for ep, entry in ((fmt.get("coverage") or {}).get("eps") or {}).items():  # ORT's mobile-usability check
            fixed = entry.get("if_fixed_shapes") or {}
            table.add_row(f"  {ep} EP", f"{entry['nodes_supported']}/{entry['nodes']} nodes in "
                                        f"{len(entry.get('partition_sizes') or [])} partitions"
                          + (f" ({fixed['nodes_supported']} in {len(fixed.get('partition_sizes') or [])} with "
                             "fixed shapes)" if fixed else ""))
    status = "pass" if check["passed"] else "FAIL (written with --force)"
    table.add_row("worst error vs PyTorch",
                  f"{check['max_abs']:.3g} abs, {check['max_rel_to_scale']:.3g}·max|ref| {status}")
    runtime = "OpenVINO bf16" if check.get("runtime", "").startswith("openvino") else "ORT"
    table.add_row(f"{runtime} latency (CPU, batch 1)", f"{check['ort_latency_s'] * 1000:.0f} ms")
    table.add_row("time", f"{report['total_s']:.1f} s (" + ", ".join(
        f"{k} {v:.1f}" for k, v in lowered.stages.items()) + ")")
    console().print(table)
