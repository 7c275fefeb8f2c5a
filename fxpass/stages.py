"""The lowering stages, each a function of the run's state (:class:`Lowering`): it reads the request and
the previous stage's artifact and leaves its own.  :data:`fxpass.pipeline.STAGES` lists them in order;
none calls another.

    load ─▶ capture ─▶ passes ─▶ export ─▶ surgery ─▶ precision ─▶ verify ─▶ cut ─▶ write

``load`` reads the checkpoint (when the request names one; the API may hand a module instead);
``capture`` plans the schedule and the model's inputs, then traces the unmodified model
(:mod:`fxpass.capture`; where that refuses the code, ``torch.export``: :mod:`fxpass.capture_export`);
``passes`` runs the fx pass table (:mod:`fxpass.passes`); ``export`` is
``torch.onnx.export(dynamo=True)`` (:mod:`fxpass.export`), of the rewritten graph or the denoising step
around it; ``surgery`` is ``surgery.simplify``; ``precision`` converts to float16 with float32 islands,
marks the float32 file for bf16 inference (checked on OpenVINO) or quantizes it to int8 with a measured
plan (:mod:`fxpass.precision`); ``verify`` compares the runtime with the eager model through Polygraphy
(:mod:`fxpass.gate`) and refuses a failing model; ``cut`` (``--deep-cache``) makes the full and shallow
graphs (:mod:`fxpass.deep_cache`); ``write`` writes the file and the report together
(:mod:`fxpass.write`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from . import metadata
from .config import ModelConfig
from .diffusion import schedule_for
from .errors import FxpassError
from .request import LowerRequest


@dataclass
class Lowering:
    """One run's state: the request it serves and what each stage has made so far."""

    request: LowerRequest
    progress: Any = None
    output: Path | None = None  # the request's paths, as plan_outputs resolved them
    report_path: Path | None = None
    model: torch.nn.Module | None = None
    example_inputs: Any = None
    config: ModelConfig | None = None
    mode: str = ""
    kept: list = field(default_factory=list)  # the schedule's original timesteps
    seen: list = field(default_factory=list)  # what the U-Net sees for each
    signature_plan: Any = None
    gm: Any = None
    proto: onnx.ModelProto | None = None
    source: Any = None
    source_inputs: dict[str, Any] | None = None
    report: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] | None = None
    lowered: Any = None  # the Lowered handed to the write stage
    shallow_path: Path | None = None  # --deep-cache: where the shallow graph goes
    shallow: onnx.ModelProto | None = None


def load_stage(state: Lowering) -> None:
    from .load import load

    src = state.request.source
    state.model = load(src.checkpoint, config=src.config, model_class=src.model_class,
                       model_kwargs=src.model_kwargs, trust_pickle=src.trust_pickle,
                       allow_nonfinite=src.allow_nonfinite, model_factory=src.model_factory)
    state.report["model"] = str(src.checkpoint)


def _schedule(config: ModelConfig | None, timesteps) -> tuple[str, list, list]:
    if config is not None:
        return schedule_for(config, timesteps)
    if isinstance(timesteps, (str, type(None))):
        raise FxpassError("lower: without a config, give timesteps as an int or a sequence")
    if isinstance(timesteps, int):
        return "fixed", [timesteps], [timesteps]
    return "table", list(timesteps), list(timesteps)


def plan_inputs(state: Lowering) -> None:
    """The schedule (mode, timesteps, what the model sees) and, without example inputs, the model's
    inputs from its ``forward`` signature (:mod:`fxpass.signature`), the model wrapped to take them."""
    from .load import sized_config

    src, rw = state.request.source, state.request.rewrite
    if src.config is not None and src.config.plain:
        from .signature import refuse_timestep

        refuse_timestep(state.model, src.timestep_input)  # no schedule: a network with no timestep
    state.config = config = sized_config(src.config, state.model)
    state.mode, state.kept, state.seen = _schedule(config, rw.timesteps)
    if src.timestep_values != "index":  # a continuous-timestep model sees the noise level of each timestep
        from .diffusion import noise_levels

        if config is None:
            raise FxpassError(f"--timestep-values {src.timestep_values}: needs the config's noise schedule")
        state.seen = noise_levels(config, state.kept, src.timestep_values)
        state.report["timestep_values"] = src.timestep_values
    if state.mode == "plain" and (rw.precision == "int8" or rw.deep_cache is not None or rw.timesteps != "respaced"):
        what = "--precision int8 (calibrated over the schedule)" if rw.precision == "int8" else (
            "--deep-cache" if rw.deep_cache is not None else f"--timesteps {rw.timesteps}")
        raise FxpassError(f"{what}: needs a diffusion model; {src.model_class or src.model_factory or src.checkpoint} "
                          "is lowered with no timestep (no --diffusion-steps)")
    if rw.step_graph and (config is None or state.mode != "table"):
        raise FxpassError("--step-graph needs a config and the respaced schedule (table mode)")
    if rw.step_graph and config.prediction_type != "epsilon":
        raise FxpassError(f"--step-graph: the model predicts {config.prediction_type}; the step graph's "
                          "posterior takes eps (lower without --step-graph: sample turns it into eps)")
    if state.example_inputs is None:
        from .signature import plan, wrap

        if config is None:
            raise FxpassError("lower: give example_inputs or a config")
        state.signature_plan = plan(state.model, image_size=config.image_size, timestep_input=src.timestep_input,
                                    inputs=src.inputs, output=src.model_output, plain=state.mode == "plain")
        state.model = wrap(state.model, state.signature_plan)
        state.example_inputs = state.signature_plan.example_inputs(state.seen[-1] if state.seen else None)
    state.report.update(mode=state.mode)
    if config is not None:
        state.report["config"] = config.to_dict()
    plan_ = state.signature_plan
    if plan_ is not None and not plan_.standard:
        state.report["signature"] = {"x": plan_.x_name, "timestep": plan_.t_name,
                                     "timestep_dtype": str(plan_.t_dtype).removeprefix("torch."),
                                     "inputs": {k: list(v.shape) for k, v in state.example_inputs.items()}}


def capture_stage(state: Lowering) -> None:
    plan_inputs(state)
    torch.nn.Module.train(state.model, False)  # never the return value of a method the model may override
    try:
        state.gm, state.report["capture_route"] = _capture(state)
    except FxpassError as exc:
        left = state.signature_plan.omitted if state.signature_plan is not None else ()
        if not left:
            raise
        from .conditioning import SEQUENCE_NAMES, sequence_example

        first = next((n for n in left if n in SEQUENCE_NAMES), left[0])  # a cross-attention input first
        hint = sequence_example(state.model, first, 1) or f"--input {first}=SHAPE"
        raise FxpassError(f"{exc}; forward ran with {', '.join(left)} left at its default: if the model "
                          f"needs it, give its shape with {hint}") from None
    _refuse_half(state.gm, state.model)
    _output_channels(state)
    state.report["fx_nodes_captured"] = len(state.gm.graph.nodes)


def _output_channels(state: Lowering) -> None:
    """A user's model records what its output is: ``learn_sigma`` from its output channels (twice x's: eps
    and the variance; as many: eps, v or x0 alone), not guided-diffusion's default."""
    config = state.config
    if config is None or not config.model_class:
        return
    out = next(n for n in reversed(state.gm.graph.nodes) if n.op == "output").args[0]
    out_shape = out.meta.get("fxpass_shape") if isinstance(out, torch.fx.Node) else None
    x = (state.example_inputs or {}).get("x") if isinstance(state.example_inputs, dict) else None
    if out_shape is None or x is None or len(out_shape) < 2:
        return
    channels, x_channels = int(out_shape[1]), int(x.shape[1])
    if channels in (x_channels, 2 * x_channels) and config.learn_sigma != (channels == 2 * x_channels):
        state.config = config.replace(learn_sigma=channels == 2 * x_channels)
        state.report["config"] = state.config.to_dict()


def _capture(state: Lowering) -> tuple[Any, dict[str, str]]:
    """(the captured graph, which route made it and why): route 1, the example-value tracer
    (:mod:`fxpass.capture`), unless ``--capture export``; route 2, torch.export
    (:mod:`fxpass.capture_export`), where asked for or where route 1 refused the code (``auto``)."""
    from .capture import capture
    from .capture_export import capture_exported

    route = state.request.source.capture
    if route == "export":
        return capture_exported(state.model, state.example_inputs), {"route": "export", "why": "--capture export"}
    try:
        return capture(state.model, state.example_inputs), {"route": "trace", "why": f"--capture {route}"}
    except FxpassError as exc:
        if route == "trace" or exc.model_refused:
            raise
        first = str(exc)
    if state.request.rewrite.dynamic_batch:
        raise FxpassError(f"capture: {first}; route 2 (torch.export) captures static shapes, and --dynamic-batch "
                          "needs route 1") from None
    try:
        gm = capture_exported(state.model, state.example_inputs)
    except FxpassError as exc:
        raise FxpassError(f"capture: neither route takes the model: route 1 (trace): {first}; route 2 "
                          f"(torch.export): {exc}") from None
    return gm, {"route": "export", "why": f"route 1 (trace) refused: {first}"}


def _refuse_half(gm, model) -> None:
    """fxpass lowers in float32 (``--precision fp16`` converts afterwards): a model that still computes
    in float16 after its float32 conversion (a cast fxpass could not undo) is refused, never lowered as a mix."""
    from .passes._util import source_of

    halves = (torch.float16, torch.bfloat16)
    node = next((n for n in gm.graph.nodes if n.meta.get("fxpass_dtype") in halves), None)
    if node is not None:
        where = source_of(node) or node.name
        raise FxpassError(f"{where}: {type(model).__name__} still computes in {node.meta['fxpass_dtype']} after "
                          "its conversion to float32; construct it with use_fp16 false (--model-kwargs) or make "
                          "its dtype attribute float32")


def passes_stage(state: Lowering) -> None:
    from .passes import check_no_guards_left, rewrite

    timesteps = state.seen[0] if state.mode == "fixed" else state.seen
    state.gm = gm = rewrite(state.gm, timesteps=timesteps, dynamic_batch=state.request.rewrite.dynamic_batch)
    state.report["fx_nodes_rewritten"] = len(gm.graph.nodes)
    state.report["fx_rewrites"] = dict(gm.meta.get("fxpass_rewrites", {}))
    check_no_guards_left(gm)  # a decision on input data (or on the batch size, when dynamic) refuses here


def export_stage(state: Lowering) -> None:
    """The ONNX model and the torch module it was exported from with that module's example inputs
    (the rewritten graph, or the :class:`~fxpass.step_graph.DenoisingStep` around it): the mobile
    formats are made from the same module."""
    from .export import export

    rw, gm, config = state.request.rewrite, state.gm, state.config
    meta = metadata.ModelMeta("step" if rw.step_graph else state.mode, tuple(state.kept), tuple(state.seen),
                              config.to_dict() if config is not None else None, "fp32",  # precision marks its own
                              request=state.request.to_dict(portable=True))
    props = metadata.encode(meta)
    if rw.step_graph:
        from .step_graph import STEP_OUTPUTS, step_module

        state.source, state.source_inputs = step_module(gm, config, gm.meta["fxpass_example_inputs"])
        state.proto = export(state.source, state.source_inputs, opset=rw.opset, dynamic_batch=rw.dynamic_batch,
                             metadata=props, output_names=STEP_OUTPUTS)
    else:
        state.proto = export(gm, opset=rw.opset, dynamic_batch=rw.dynamic_batch, metadata=props)
        state.source, state.source_inputs = gm, dict(gm.meta["fxpass_example_inputs"])
    state.report["onnx_nodes_exported"] = len(state.proto.graph.node)


def surgery_stage(state: Lowering) -> None:
    import surgery

    rw = state.request.rewrite
    form, options = _group_norm_form(rw.group_norm, state.request.output.format, rw.surgery_options)
    try:
        state.proto, state.report["surgery"] = surgery.simplify(state.proto, opset=rw.opset, simplifier=rw.simplifier,
                                                                group_norm=form, options=options)
    except ValueError as exc:  # an unknown pass or option name
        raise FxpassError(f"surgery options: {exc}") from None
    state.report["onnx_nodes"] = len(state.proto.graph.node)
    digest = state.report["float32_graph"] = metadata.graph_digest(state.proto)  # before any precision's change
    metadata.write_props(state.proto, {metadata.FLOAT32_GRAPH: digest})


def _group_norm_form(group_norm: str, fmt: str, options: dict | None) -> tuple[str, dict | None]:
    """(surgery's group_norm form, surgery options) for ``--group-norm``: "all" expands every GroupNorm
    (``expand_group_norm`` at min_elements 1), which "auto" picks for the ORT mobile format: measured on
    the tiny config, ORT's usability checker gives CoreML ML Program 623/1152 nodes in 34 partitions
    with GroupNormalization (ORT inlines it into Shape chains it cannot size), 359/360 in 2 expanded."""
    if group_norm == "all" or (group_norm == "auto" and fmt == "ort"):
        expand = {**((options or {}).get("expand_group_norm") or {}), "min_elements": 1}
        return "auto", {**(options or {}), "expand_group_norm": expand}
    return group_norm, options


def precision_stage(state: Lowering) -> None:
    """fp16: float32 islands; bf16: the float32 graph marked for bf16 inference; int8: a measured plan."""
    precision, report = state.request.rewrite.precision, state.report
    if _onnx_precision(state) != precision:  # --format tflite int8: quantized by LiteRT's tools when written
        report["precision_note"] = ("int8 is LiteRT's dynamic-range quantization of the float32 graph, made and "
                                    "checked in the write stage; the ONNX graph stays float32")
        return
    float32 = state.proto
    if precision == "fp16":
        state.proto, report["fp16_nodes"] = _to_fp16(state.proto)
    elif precision == "bf16":
        metadata.write_props(state.proto, {**metadata.read_props(state.proto), metadata.PRECISION: "bf16"})
    else:
        state.proto = _to_int8(state)
    report["structure"] = _same_structure(state.proto, float32, precision)
    report["onnx_nodes_before_precision"] = report["onnx_nodes"]
    report["onnx_nodes"] = len(state.proto.graph.node)


def _same_structure(proto: onnx.ModelProto, float32: onnx.ModelProto, precision: str) -> str:
    """The reduced-precision graph must be the float32 one plus quantization or casts (fxpass.equivalence);
    FxpassError (exit 1) otherwise: nothing is written."""
    from .equivalence import ADDED, compare

    if precision == "bf16":
        return "the float32 graph itself, labelled for OpenVINO's bf16 inference"
    problem = compare(proto, float32)
    if problem:
        raise FxpassError(f"--precision {precision}: the {precision} graph is not the float32 graph with "
                          f"quantization or casts ({problem}); nothing written", exit_code=1)
    what = ADDED[precision]
    return f"the float32 graph with {precision}'s {what}, constants within their rounding (fxpass.equivalence)"


def _onnx_precision(state: Lowering) -> str:
    """The ONNX graph's precision: the request's, but float32 under a LiteRT int8 file (which LiteRT's
    quantizer makes from the float32 graph)."""
    precision = state.request.rewrite.precision
    return "fp32" if precision == "int8" and state.request.output.format == "tflite" else precision


def _to_fp16(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    import onnx_graphsurgeon as gs

    from surgery.convert_precision import convert_precision

    props = metadata.read_props(proto)
    graph, converted = convert_precision(gs.import_onnx(proto))
    proto = gs.export_onnx(graph)
    metadata.write_props(proto, {**props, metadata.PRECISION: "fp16"})
    return proto, converted


def _to_int8(state: Lowering) -> onnx.ModelProto:
    if state.mode != "table":
        raise FxpassError("--precision int8: needs the respaced schedule in one graph (table mode); its "
                          "calibration and plan are measured along the schedule")
    from .inputs import num_classes_of
    from .precision import Int8Options, quantize_int8

    progress = state.progress
    say = (lambda msg: progress("precision", msg)) if progress else None
    proto, info = quantize_int8(state.proto, state.config, state.request.rewrite.int8 or Int8Options(),
                                progress=say, num_classes=num_classes_of(state.model))
    state.report["precision_plan"] = info.pop("plan")
    state.report["int8"] = info
    return proto


def verify_stage(state: Lowering) -> None:
    """The gate: the runtime against the eager model; a failing model is refused here (exit 1) unless
    ``force`` writes it anyway."""
    from .gate import check_against_eager, default_tolerance

    precision = _onnx_precision(state)
    tolerance = state.request.check.tolerance or default_tolerance(precision)
    check = check_against_eager(state.proto, state.model, config=state.config, tolerance=tolerance,
                                runtime="openvino-bf16" if precision == "bf16" else "ort")
    state.check = state.report["check"] = check
    if check["passed"] or (state.request.output.force and state.output is not None):
        return
    where = f"{state.output}: not written: " if state.output is not None else "lower: "
    why = f"output has non-finite values ({check['nonfinite']})" if check.get("nonfinite") else \
        f"cannot be checked: {check['degenerate']}" if check.get("degenerate") else \
        f"differs from PyTorch by {check['max_rel_to_scale']:.3g}·max|ref|"
    raise FxpassError(f"{where}{'OpenVINO (bf16)' if precision == 'bf16' else 'ONNX Runtime'} {why} "
                      f"(tolerance {check['tolerance']['atol_scale']:g})"
                      + ("; --force writes it anyway" if state.output is not None else ""), exit_code=1)


def cut_stage(state: Lowering) -> None:
    """``--deep-cache``: the verified graph cut into the full graph (+ the ``cache`` output) and the
    shallow graph, the identity between them checked (:mod:`fxpass.deep_cache`)."""
    from .deep_cache import cut

    if state.mode != "table":
        raise FxpassError("--deep-cache: cuts a table-mode model")
    state.proto, state.shallow, state.report["deep_cache"] = cut(state.proto, state.request.rewrite.deep_cache,
                                                                 force=state.request.output.force)
    if state.shallow_path is not None:
        state.report["deep_cache"]["shallow_output"] = str(state.shallow_path)


def write_stage(state: Lowering) -> None:
    from .write import write_lowered

    write_lowered(state.lowered, state.request, state.output, state.report_path, state.lowered.stages,
                  state.shallow_path)
