"""``fxpass lower``: load → capture → passes → export → surgery → ORT check → write."""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

from .errors import FxpassError
from .fileio import atomic_write_bytes, check_writable_target


def load_user_model(spec: str, kwargs_json: str | None, checkpoint: Path, trust_pickle: bool):
    """Instantiate ``pkg.mod:Class(**kwargs)`` and load ``checkpoint`` into it (strict)."""
    import torch

    from .checkpoint import _read_checkpoint, extract_state_dict

    if ":" not in spec:
        raise FxpassError(f"--model-class {spec}: expected pkg.module:ClassName")
    module_name, _, class_name = spec.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise FxpassError(f"--model-class {spec}: cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    cls = getattr(module, class_name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise FxpassError(f"--model-class {spec}: {class_name} is not an nn.Module class in {module_name}")
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json else {}
    except json.JSONDecodeError as exc:
        raise FxpassError(f"--model-kwargs: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(kwargs, dict):
        raise FxpassError("--model-kwargs: expected a JSON object of keyword arguments")
    try:
        model = cls(**kwargs)
    except Exception as exc:
        raise FxpassError(f"--model-class {spec}: constructor failed ({type(exc).__name__}: {exc})") from None
    obj = _read_checkpoint(checkpoint, trust_pickle)
    state = extract_state_dict(obj, checkpoint)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append("missing " + ", ".join(result.missing_keys[:3]))
        if result.unexpected_keys:
            parts.append("unexpected " + ", ".join(result.unexpected_keys[:3]))
        raise FxpassError(f"{checkpoint}: does not match {class_name}({kwargs_json or ''}): " + "; ".join(parts))
    return model.float().eval()


def cmd_lower(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .checkpoint import load_model
    from .config import load_config
    from .export import check_opset
    from .pipeline import check_against_eager, lower_with_report

    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    out = check_writable_target(args.output)
    if args.report:
        check_writable_target(args.report)
    check_opset(args.opset)
    cfg = load_config(args.config)
    started = time.perf_counter()

    def progress(stage: str, state: str) -> None:
        if state != "start":
            err.print(f"[green]✓[/] {stage:<8} {state}")

    t0 = time.perf_counter()
    if args.model_class:
        model = load_user_model(args.model_class, args.model_kwargs, Path(args.model), args.trust_pickle)
    else:
        if args.model_kwargs:
            raise FxpassError("--model-kwargs needs --model-class")
        model = load_model(args.model, cfg, trust_pickle=args.trust_pickle)
    progress("load", f"{time.perf_counter() - t0:.1f} s")

    timesteps = args.timesteps
    lowered = lower_with_report(
        model, config=cfg, timesteps=timesteps, precision=args.precision, opset=args.opset,
        dynamic_batch=args.dynamic_batch, simplifier=None if args.simplifier == "none" else args.simplifier,
        group_norm=args.group_norm,
        progress=progress, step_graph=args.step_graph,
    )
    from targets.compare import TOLERANCES

    t0 = time.perf_counter()
    check = check_against_eager(lowered.model, model, config=cfg, tolerance=TOLERANCES[args.precision])
    progress("check", f"{time.perf_counter() - t0:.1f} s")
    from targets.ort import SERIALIZE_LIMIT, byte_size

    data = lowered.model.SerializeToString() if byte_size(lowered.model) < SERIALIZE_LIMIT else None
    report = {
        "model": str(args.model),
        "output": str(out),
        "config": cfg.to_dict(),
        **lowered.report,
        "check": check,
    }
    if not check["passed"] and not args.force:
        raise FxpassError(
            f"{out}: not written: ONNX Runtime differs from PyTorch by {check['max_rel_to_scale']:.3g}·max|ref| "
            f"(tolerance {check['tolerance']['atol_scale']:g}); --force writes it anyway",
            exit_code=1,
        )
    t0 = time.perf_counter()
    if data is not None:
        atomic_write_bytes(out, lambda fh: fh.write(data))
    else:
        import surgery

        surgery.save_model(lowered.model, out)
    lowered.stages["write"] = time.perf_counter() - t0
    report["file_bytes"] = out.stat().st_size
    report["total_s"] = time.perf_counter() - started
    report["stages_s"] = dict(lowered.stages)
    if args.report:
        text = json.dumps(report, indent=2, sort_keys=True, default=str)
        atomic_write_bytes(Path(args.report), lambda fh: fh.write(text.encode()))

    table = Table(title=f"fxpass lower → {out}", show_header=False)
    mode = "step graph" if args.step_graph else lowered.mode
    table.add_row("mode", f"{mode} ({len(lowered.timesteps)} timesteps)" if lowered.mode == "table"
                  else f"fixed timestep {lowered.timesteps[0]}")
    table.add_row("precision / opset", f"{args.precision} / {args.opset}")
    table.add_row("fx nodes", f"{report['fx_nodes_captured']} captured → {report['fx_nodes_rewritten']} rewritten")
    table.add_row("ONNX nodes", f"{report['onnx_nodes_exported']} exported → {report['onnx_nodes']} after surgery")
    table.add_row("file size", f"{report['file_bytes'] / 2**20:.1f} MiB")
    status = "[green]pass[/]" if check["passed"] else "[red]FAIL (written with --force)[/]"
    table.add_row("worst error vs PyTorch", f"{check['max_abs']:.3g} abs, {check['max_rel_to_scale']:.3g}·max|ref| {status}")
    table.add_row("ORT latency (CPU, batch 1)", f"{check['ort_latency_s'] * 1000:.0f} ms")
    table.add_row("time", f"{report['total_s']:.1f} s (" + ", ".join(
        f"{k} {v:.1f}" for k, v in lowered.stages.items()) + ")")
    console.print(table)
    return 0 if check["passed"] else 1


def add_commands(sub, common) -> None:
    p = sub.add_parser("lower", parents=[common], help="lower MODEL.pt to ONNX (checked against PyTorch)")
    p.add_argument("model", metavar="MODEL.pt")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    p.add_argument("--config", metavar="FILE", help="RePaint/guided-diffusion YAML (default: built-in CAMUS)")
    p.add_argument("--timesteps", default="respaced", metavar="respaced|INT",
                   help="'respaced' (default): the config's whole schedule as tables gathered by t_index; "
                        "an integer: fold that one timestep")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--opset", type=int, default=21)
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch dimension symbolic")
    p.add_argument("--model-class", metavar="pkg.mod:Class", help="your own U-Net class instead of fxpass's")
    p.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments for --model-class")
    p.add_argument("--simplifier", choices=("onnxslim", "none"), default="onnxslim")
    p.add_argument("--group-norm", choices=("auto", "keep"), default="auto",
                   help="auto: GroupNorms over 2M elements per sample become LayerNormalization on a grouped "
                        "view (ONNX Runtime CPU runs that ~2x faster); keep: one GroupNormalization node each")
    p.add_argument("--step-graph", action="store_true",
                   help="export one whole denoising step (U-Net + posterior update, coefficients gathered by "
                        "t_index): inputs x, t_index, noise; outputs x_prev, pred_xstart")
    p.add_argument("--report", metavar="FILE.json", help="write the summary numbers as JSON")
    p.add_argument("--force", action="store_true", help="write even when the ORT check fails (exit 1)")
    p.add_argument("--trust-pickle", action="store_true", help="allow checkpoints that are full pickled modules")
    p.set_defaults(func=cmd_lower)
