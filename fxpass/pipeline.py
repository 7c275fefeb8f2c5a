"""The lowering pipeline, one straight line; ``fxpass.lower()`` and ``fxpass lower`` both run it.

    load ─▶ capture ─▶ passes ─▶ export ─▶ surgery ─▶ precision ─▶ verify ─▶ write

Each stage is named in :data:`STAGES`, timed and reported.  ``load`` reads a checkpoint (CLI and
:func:`lower_checkpoint`; the API may hand a module instead); ``capture`` traces the unmodified model
(:mod:`fxpass.capture`); ``passes`` runs the fx pass table (:mod:`fxpass.passes`); ``export`` is
``torch.onnx.export(dynamo=True)`` (:mod:`fxpass.export`); ``surgery`` is ``surgery.simplify``;
``precision`` converts to float16 with float32 islands (``--precision fp16``), marks the float32 file
for bf16 inference (``bf16``, checked on OpenVINO) or quantizes it to int8 with a measured precision
plan (``int8``, :mod:`fxpass.precision`); ``verify`` compares the runtime (ONNX Runtime; OpenVINO for
bf16) with the eager model through Polygraphy (:mod:`fxpass.verify`; the API may opt out with
``verify=False``); ``write`` writes the ONNX file and the JSON report, only after a passing check
(or with ``force``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from . import metadata
from .config import ModelConfig
from .diffusion import schedule_for
from .errors import FxpassError
from .export import DEFAULT_OPSET, check_opset, export

STAGES = ("load", "capture", "passes", "export", "surgery", "precision", "verify", "write")
#: what the write stage can write: the ONNX file, or a mobile format made from the verified lowering
FORMATS = ("onnx", "ort", "pte", "mlpackage")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
#: auto: for the target (CPU: the GroupNorms of at least 2^21 elements as LayerNormalization on a grouped
#: view; --format ort: all of them, whose static shapes CoreML/NNAPI take); all; keep: one node each
GROUP_NORM_FORMS = ("auto", "all", "keep")

Progress = Callable[[str, str], None]


@dataclass
class Lowered:
    """The lowered model and what the pipeline measured on the way."""

    model: onnx.ModelProto
    mode: str  # "table", "fixed" or "step"
    timesteps: list  # schedule (original timesteps) in table mode, [T] in fixed mode
    model_timesteps: list  # what the U-Net sees (rescaled when rescale_timesteps)
    stages: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] | None = None
    graph_module: Any = None  # the rewritten fx graph
    #: the module the ONNX was exported from (the rewritten graph, or the DenoisingStep around it with
    #: --step-graph) and its example inputs: what .pte / .mlpackage are made from
    source: Any = None
    source_inputs: dict[str, Any] | None = None

    @property
    def step_graph(self) -> bool:
        return metadata.read_props(self.model).get(metadata.MODE) == "step"

    @property
    def passed(self) -> bool:
        return self.check is None or bool(self.check["passed"])


def example_inputs_for(config: ModelConfig, first_timestep, seed: int = 0, batch: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = {"x": torch.randn(batch, 3, config.image_size, config.image_size, generator=gen)}
    dtype = torch.float32 if isinstance(first_timestep, float) and not float(first_timestep).is_integer() else torch.int64
    inputs["timesteps"] = torch.full((batch,), first_timestep, dtype=dtype)
    if config.class_cond:
        inputs["y"] = torch.zeros(batch, dtype=torch.int64)
    return inputs


class _Run:
    """Stage timing and progress for one pipeline run."""

    def __init__(self, progress: Progress | None, stages: dict[str, float] | None = None):
        self.progress = progress
        self.stages: dict[str, float] = stages if stages is not None else {}

    @contextmanager
    def stage(self, name: str):
        assert name in STAGES, name
        if self.progress:
            self.progress(name, "start")
        start = time.perf_counter()
        yield
        self.stages[name] = time.perf_counter() - start
        if self.progress:
            self.progress(name, f"{self.stages[name]:.1f} s")


def _validate(precision: str, group_norm: str, opset: int, fmt: str = "onnx", step_graph: bool = False) -> None:
    check_opset(opset)
    if precision not in PRECISIONS:
        raise FxpassError(f"--precision {precision}: expected {', '.join(PRECISIONS)}")
    if precision == "bf16" and (fmt != "onnx" or step_graph):  # a runtime hint only OpenVINO takes
        raise FxpassError(f"--precision bf16: an OpenVINO inference precision for the table-mode ONNX model "
                          f"(not {'--step-graph' if step_graph else '--format ' + fmt}); use --precision fp16 "
                          "for the mobile formats")
    if precision == "int8" and step_graph:
        raise FxpassError("--precision int8: its plan is measured on the U-Net along the schedule, so it is "
                          "written as the table-mode graph (not --step-graph)")
    if precision == "int8" and fmt not in ("onnx", "ort"):
        raise FxpassError(f"--precision int8: ONNX Runtime's QDQ model, written as --format onnx or ort (not "
                          f"{fmt}; for a smaller Core ML package use --palettize-bits)")
    if precision == "bf16":
        from targets.openvino import openvino_unavailable_reason

        reason = openvino_unavailable_reason("bf16")
        if reason:  # the bf16 model is checked on OpenVINO: without it nothing could vouch for the file
            raise FxpassError(f"unavailable: --precision bf16: {reason}", exit_code=3)
    if group_norm not in GROUP_NORM_FORMS:
        raise FxpassError(f"--group-norm {group_norm}: expected {' or '.join(GROUP_NORM_FORMS)}")


def _schedule(config: ModelConfig | None, timesteps) -> tuple[str, list, list]:
    if config is not None:
        return schedule_for(config, timesteps)
    if isinstance(timesteps, (str, type(None))):
        raise FxpassError("lower: without a config, give timesteps as an int or a sequence")
    if isinstance(timesteps, int):
        return "fixed", [timesteps], [timesteps]
    return "table", list(timesteps), list(timesteps)


def lower_with_report(
    model: torch.nn.Module,
    example_inputs: dict[str, torch.Tensor] | Sequence[torch.Tensor] | None = None,
    *,
    config: ModelConfig | None = None,
    timesteps: str | int | Sequence[int] | None = "respaced",
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    simplifier: str | None = "onnxslim",
    group_norm: str = "auto",
    surgery_options: dict[str, dict[str, Any]] | None = None,
    step_graph: bool = False,
    format: str = "onnx",
    verify: bool = True,
    tolerance: tuple[float, float] | None = None,
    output: str | Path | None = None,
    report_path: str | Path | None = None,
    force: bool = False,
    inputs: Sequence[str | Path | None] = (),
    report_extra: dict[str, Any] | None = None,
    progress: Progress | None = None,
    stages: dict[str, float] | None = None,
    started: float | None = None,
    timestep_input: str | None = None,
    model_inputs: Sequence[str] | dict[str, tuple] = (),
    timestep_values: str = "index",
    int8: Any = None,
    palettize_bits: int | None = None,
) -> Lowered:
    """Run the pipeline from capture on; see :func:`lower` for the options.

    ``output``/``report_path``: the write stage writes the ONNX file and the JSON report there, together
    (both or neither), after a passing check; a failing check raises (exit code 1) and writes nothing
    unless ``force``, which writes and returns a :class:`Lowered` whose ``passed`` is False.  Both are
    checked before any work by :func:`fxpass.fileio.plan_outputs`: neither may be one of ``inputs``
    and an existing file is replaced only with ``force``.  Without ``output`` a failing
    check raises too.  ``stages`` carries times of earlier stages (load) into the report.

    Without ``example_inputs`` they are inferred from the model's ``forward`` signature
    (:mod:`fxpass.signature`): ``timestep_input`` names the timestep parameter where its name is not a
    known one, ``model_inputs`` gives shapes of other inputs (``["low_res=1,3,16,16"]``).
    """
    from . import __version__
    from .capture import capture
    from .fileio import plan_outputs
    from .passes import check_no_guards_left, rewrite

    _validate(precision, group_norm, opset, format, step_graph)
    _validate_format(format, step_graph)
    if palettize_bits is not None and format != "mlpackage":
        raise FxpassError(f"--palettize-bits {palettize_bits}: applies to --format mlpackage only")
    planned = plan_outputs({"-o": output, "--report": report_path}, inputs=inputs, force=force,
                           directories=("-o",) if format == "mlpackage" else ())
    output, report_path = planned.get("-o"), planned.get("--report")
    config = sized_config(config, model)
    mode, kept, seen = _schedule(config, timesteps)
    if timestep_values != "index":  # a continuous-timestep model sees the noise level of each timestep
        from .diffusion import noise_levels

        if config is None:
            raise FxpassError(f"--timestep-values {timestep_values}: needs the config's noise schedule")
        seen = noise_levels(config, kept, timestep_values)
    if step_graph and (config is None or mode != "table"):
        raise FxpassError("--step-graph needs a config and the respaced schedule (table mode)")
    signature_plan = None
    if example_inputs is None:
        from .signature import plan, wrap

        if config is None:
            raise FxpassError("lower: give example_inputs or a config")
        signature_plan = plan(model, image_size=config.image_size, timestep_input=timestep_input, inputs=model_inputs)
        model = wrap(model, signature_plan)
        example_inputs = signature_plan.example_inputs(seen[-1])

    run = _Run(progress, stages)
    started = time.perf_counter() if started is None else started
    report: dict[str, Any] = {"fxpass_version": __version__, "opset": opset, "precision": precision, "mode": mode,
                              **(report_extra or {})}
    if timestep_values != "index":
        report["timestep_values"] = timestep_values
    if config is not None:
        report["config"] = config.to_dict()
    if signature_plan is not None and not signature_plan.standard:
        report["signature"] = {"x": signature_plan.x_name, "timestep": signature_plan.t_name,
                               "timestep_dtype": str(signature_plan.t_dtype).removeprefix("torch."),
                               "inputs": {k: list(v.shape) for k, v in example_inputs.items()}}
    model = model.eval()
    with run.stage("capture"):
        try:
            gm = capture(model, example_inputs)
        except FxpassError as exc:
            left = signature_plan.omitted if signature_plan is not None else ()
            if not left:
                raise
            raise FxpassError(f"{exc}; forward ran with {', '.join(left)} left at its default: if the model "
                              f"needs it, give its shape with --input {left[0]}=SHAPE") from None
    _refuse_half(gm, model)
    report["fx_nodes_captured"] = len(gm.graph.nodes)
    with run.stage("passes"):
        gm = rewrite(gm, timesteps=seen[0] if mode == "fixed" else seen, dynamic_batch=dynamic_batch)
    report["fx_nodes_rewritten"] = len(gm.graph.nodes)
    report["fx_rewrites"] = dict(gm.meta.get("fxpass_rewrites", {}))
    check_no_guards_left(gm)  # a decision on input data (or on the batch size, when dynamic) refuses here

    meta = metadata.ModelMeta("step" if step_graph else mode, tuple(kept), tuple(seen),
                              config.to_dict() if config is not None else None, "fp32")  # precision stage marks its own
    with run.stage("export"):
        proto, source, source_inputs = _export(gm, config, meta, opset=opset, dynamic_batch=dynamic_batch,
                                               step_graph=step_graph)
    report["onnx_nodes_exported"] = len(proto.graph.node)

    import surgery

    with run.stage("surgery"):
        form, options = _group_norm_form(group_norm, format, surgery_options)
        try:
            proto, surgery_report = surgery.simplify(proto, opset=opset, simplifier=simplifier, group_norm=form,
                                                     options=options)
        except ValueError as exc:  # an unknown pass or option name
            raise FxpassError(f"surgery options: {exc}") from None
    report["surgery"] = surgery_report
    report["onnx_nodes"] = len(proto.graph.node)
    if precision != "fp32":
        with run.stage("precision"):
            proto = _precision_stage(proto, precision, mode, config, model, int8, report, progress)
        report["onnx_nodes_before_precision"] = report["onnx_nodes"]
        report["onnx_nodes"] = len(proto.graph.node)

    check = None
    if verify:
        from .verify import check_against_eager, default_tolerance

        with run.stage("verify"):
            check = check_against_eager(proto, model, config=config, tolerance=tolerance or default_tolerance(precision),
                                        runtime="openvino-bf16" if precision == "bf16" else "ort")
        report["check"] = check
    lowered = Lowered(proto, mode, kept, seen, run.stages, report, check, gm, source, source_inputs)
    if check is not None and not check["passed"] and not (force and output is not None):
        where = f"{output}: not written: " if output is not None else "lower: "
        why = f"output has non-finite values ({check['nonfinite']})" if check.get("nonfinite") else \
            f"differs from PyTorch by {check['max_rel_to_scale']:.3g}·max|ref|"
        raise FxpassError(f"{where}{'OpenVINO (bf16)' if precision == 'bf16' else 'ONNX Runtime'} {why} (tolerance {check['tolerance']['atol_scale']:g})"
                          + ("; --force writes it anyway" if output is not None else ""), exit_code=1)
    report["stages_s"] = dict(run.stages)
    report["total_s"] = time.perf_counter() - started
    if output is not None:
        with run.stage("write"):
            if format == "onnx":
                _write(lowered, output, report_path, run.stages)
            else:
                _write_format(lowered, format, output, report_path, run.stages, precision, palettize_bits)
    return lowered


def _group_norm_form(group_norm: str, fmt: str, options: dict | None) -> tuple[str, dict | None]:
    """(surgery's group_norm form, surgery options) for ``--group-norm``: "all" expands every GroupNorm
    (``expand_group_norm`` at min_elements 1), which "auto" picks for the ORT mobile format: measured on
    the tiny config, ORT's usability checker gives CoreML ML Program 623/1152 nodes in 34 partitions
    with GroupNormalization (ORT inlines it into Shape chains it cannot size), 359/360 in 2 expanded."""
    if group_norm == "all" or (group_norm == "auto" and fmt == "ort"):
        expand = {**((options or {}).get("expand_group_norm") or {}), "min_elements": 1}
        return "auto", {**(options or {}), "expand_group_norm": expand}
    return group_norm, options


def _validate_format(fmt: str, step_graph: bool) -> None:
    if fmt not in FORMATS:
        raise FxpassError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        return
    from .formats import format_unavailable_reason

    reason = format_unavailable_reason(fmt)
    if reason:
        raise FxpassError(reason)


def _write_format(lowered: Lowered, fmt: str, output: Path, report_path: Path | None, stages: dict[str, float],
                  precision: str, palettize_bits: int | None = None) -> None:
    """A mobile format from the verified lowering, checked by the format's own runtime where this machine
    has one (``fxpass.formats``), then the report."""
    from . import formats
    from .fileio import atomic_write_bytes

    t0 = time.perf_counter()
    if fmt == "ort":
        # Runtime style: the file holds the graph ORT's mobile check counts, for the CoreML/NNAPI EPs to take;
        # int8 runs on the CPU EP (CoreML has no QDQ): Fixed saves its fused int8 kernels, which equal the ONNX
        # run (Runtime's replay at load differed by 0.08·max|ref| on the tiny config)
        result = formats.to_ort(lowered.model, output, optimization_style="Fixed" if precision == "int8" else "Runtime")
        result["coverage"] = {k: v for k, v in formats.mobile_coverage(lowered.model).items() if k != "log"}
    else:
        from .step_graph import STEP_OUTPUTS

        rows = len(lowered.timesteps) if lowered.mode == "table" else None
        example = dict(lowered.source_inputs)
        if fmt == "pte":
            result = formats.to_pte(lowered.source, example, output, fp16=precision == "fp16", rows=rows)
        else:
            result = formats.to_mlpackage(lowered.source, example, output, precision="fp16", rows=rows,
                                          palettize_bits=palettize_bits,
                                          output_names=STEP_OUTPUTS if lowered.step_graph else ("out",))
    stages["write"] = time.perf_counter() - t0
    lowered.report["output"] = str(output)
    lowered.report["format"] = {"name": fmt, **result}
    lowered.report["file_bytes"] = result.get("bytes")
    lowered.report["stages_s"] = dict(stages)
    if report_path is not None:  # both or neither: a report that cannot be written takes the format file back
        text = json.dumps(lowered.report, indent=2, sort_keys=True, default=str)
        try:
            atomic_write_bytes(report_path, lambda fh: fh.write(text.encode()))
        except BaseException:
            _discard(output)
            raise


def _discard(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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


def sized_config(config: ModelConfig | None, model) -> ModelConfig | None:
    """A user class's config without an image size (``image_size`` 0, see
    :func:`fxpass.config.user_class_config`) takes the model's ``image_size`` attribute."""
    if config is None or config.image_size != 0:
        return config
    import dataclasses

    size = getattr(model, "image_size", None)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise FxpassError(f"{type(model).__name__}: image size unknown (the model has no image_size attribute); "
                          "pass --image-size N or --config FILE")
    return dataclasses.replace(config, image_size=size)


def _export(gm, config, meta: metadata.ModelMeta, *, opset: int, dynamic_batch: bool, step_graph: bool):
    """The ONNX model and the torch module it was exported from with that module's example inputs
    (the rewritten graph, or the :class:`~fxpass.step_graph.DenoisingStep` around it): the mobile
    formats are made from the same module."""
    props = metadata.encode(meta)
    if not step_graph:
        return export(gm, opset=opset, dynamic_batch=dynamic_batch, metadata=props), gm, \
            dict(gm.meta["fxpass_example_inputs"])
    from .step_graph import STEP_OUTPUTS, step_module

    step, step_inputs = step_module(gm, config, gm.meta["fxpass_example_inputs"])
    proto = export(step, step_inputs, opset=opset, dynamic_batch=dynamic_batch, metadata=props,
                   output_names=STEP_OUTPUTS)
    return proto, step, step_inputs


def _precision_stage(proto: onnx.ModelProto, precision: str, mode: str, config, model, int8, report: dict,
                     progress: Progress | None) -> onnx.ModelProto:
    """fp16: float32 islands; bf16: the float32 graph marked for bf16 inference; int8: a measured plan."""
    if precision == "fp16":
        proto, report["fp16_nodes"] = _to_fp16(proto)
        return proto
    if precision == "bf16":
        metadata.write_props(proto, {**metadata.read_props(proto), metadata.PRECISION: "bf16"})
        return proto
    if mode != "table":
        raise FxpassError("--precision int8: needs the respaced schedule in one graph (table mode); its "
                          "calibration and plan are measured along the schedule")
    from .precision import Int8Options, quantize_int8
    from .verify import num_classes_of

    say = (lambda msg: progress("precision", msg)) if progress else None
    proto, info = quantize_int8(proto, config, int8 or Int8Options(), progress=say, num_classes=num_classes_of(model))
    report["precision_plan"] = info.pop("plan")
    report["int8"] = info
    return proto


def _to_fp16(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    import onnx_graphsurgeon as gs

    from surgery.convert_precision import convert_precision

    props = metadata.read_props(proto)
    graph, converted = convert_precision(gs.import_onnx(proto))
    proto = gs.export_onnx(graph)
    metadata.write_props(proto, {**props, metadata.PRECISION: "fp16"})
    return proto, converted


def _write(lowered: Lowered, output: Path, report_path: Path | None, stages: dict[str, float]) -> None:
    """The ONNX file and the report as one transaction (a model over 2 GiB is written first, with its
    external data file, and removed again if the report cannot be written)."""
    from surgery.modelio import save_model, serialized

    from .fileio import Transaction

    t0 = time.perf_counter()
    data = serialized(lowered.model)
    lowered.report["output"] = str(output)
    with Transaction() as tx:
        if data is not None:
            tx.add_bytes(output, lambda fh: fh.write(data))
            lowered.report["file_bytes"] = len(data)
        stages["write"] = time.perf_counter() - t0
        lowered.report["stages_s"] = dict(stages)
        if report_path is not None:
            if data is None:
                lowered.report["file_bytes"] = None  # written below, with external data
            text = json.dumps(lowered.report, indent=2, sort_keys=True, default=str)
            tx.add_bytes(report_path, lambda fh: fh.write(text.encode()))
    if data is None:
        save_model(lowered.model, output)
        lowered.report["file_bytes"] = output.stat().st_size


def load(checkpoint: str | Path, *, config: ModelConfig, model_class: str | None = None,
         model_kwargs: str | None = None, trust_pickle: bool = False, allow_nonfinite: bool = False,
         model_factory: str | None = None) -> torch.nn.Module:
    """The load stage: fxpass's U-Net for ``config``, ``model_class`` (``pkg.mod:Class``) or what
    ``model_factory`` (``pkg.mod:function``) returns, weights from ``checkpoint``, float32, eval mode;
    weights with NaN/Inf are refused unless ``allow_nonfinite``."""
    if model_class and model_factory:
        raise FxpassError("give --model-class or --model-factory, not both")
    if model_class or model_factory:
        from .user_model import load_user_model

        return load_user_model(model_class or model_factory, model_kwargs, Path(checkpoint), trust_pickle,
                               allow_nonfinite=allow_nonfinite, factory=bool(model_factory))
    if model_kwargs:
        raise FxpassError("--model-kwargs needs --model-class or --model-factory")
    from .checkpoint import load_model

    return load_model(checkpoint, config, trust_pickle=trust_pickle, allow_nonfinite=allow_nonfinite)


def lower_checkpoint(checkpoint: str | Path, output: str | Path | None = None, *, config: ModelConfig,
                     model_class: str | None = None, model_kwargs: str | None = None, trust_pickle: bool = False,
                     allow_nonfinite: bool = False, progress: Progress | None = None,
                     model_factory: str | None = None, **options) -> Lowered:
    """The whole pipeline from a checkpoint file: load, then :func:`lower_with_report` (what the CLI runs)."""
    from .fileio import plan_outputs

    options["inputs"] = [checkpoint, *options.get("inputs", ())]
    plan_outputs({"-o": output, "--report": options.get("report_path")}, force=options.get("force", False),
                 inputs=options["inputs"],  # before loading: a refused output costs nothing
                 directories=("-o",) if options.get("format") == "mlpackage" else ())
    started = time.perf_counter()
    run = _Run(progress)
    with run.stage("load"):
        model = load(checkpoint, config=config, model_class=model_class, model_kwargs=model_kwargs,
                     trust_pickle=trust_pickle, allow_nonfinite=allow_nonfinite, model_factory=model_factory)
    return lower_with_report(model, config=config, output=output, progress=progress, stages=run.stages,
                             started=started, report_extra={"model": str(checkpoint)}, **options)


def lower(
    model: torch.nn.Module,
    example_inputs: dict[str, torch.Tensor] | Sequence[torch.Tensor] | None = None,
    *,
    timesteps: str | int | Sequence[int] | None = "respaced",
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    config: ModelConfig | None = None,
    simplifier: str | None = "onnxslim",
    step_graph: bool = False,
    group_norm: str = "auto",
    surgery_options: dict[str, dict[str, Any]] | None = None,
    verify: bool = True,
    timestep_input: str | None = None,
    inputs: Sequence[str] | dict[str, tuple] = (),
    int8: Any = None,
) -> onnx.ModelProto:
    """Lower a guided-diffusion / RePaint U-Net (ours or a user's class) to an ONNX ModelProto.

    ``timesteps``: ``"respaced"`` (the config's schedule, needs ``config``), a sequence of timesteps
    (table mode: inputs ``x``, ``t_index``) or an int (fixed mode: input ``x``).  ``example_inputs``
    default to a seeded ``x`` of the config's size and the last schedule entry.  ``step_graph``
    exports one whole denoising step instead (inputs ``x``, ``t_index``, ``noise``; outputs ``x_prev``,
    ``pred_xstart``; see :mod:`fxpass.step_graph`).  ``group_norm="keep"`` keeps every GroupNorm as
    one ``GroupNormalization`` node; the default "auto" expands the large ones into a
    ``LayerNormalization`` form that ONNX Runtime's CPU provider runs about twice as fast.
    ``surgery_options`` reach the surgery passes by name, e.g. ``{"expand_group_norm": {"min_elements":
    2**20}}`` (see ``surgery.passes``).  ``verify`` (default True) checks ONNX Runtime against the eager model, as ``fxpass lower`` does,
    and raises :class:`FxpassError` when they differ; ``verify=False`` opts out.

    Any guided-diffusion-family model: without ``example_inputs``, its inputs are inferred from its
    ``forward`` signature, first convolution and ``config`` (:mod:`fxpass.signature`); ``timestep_input``
    names a timestep parameter fxpass does not know, ``inputs`` gives other inputs' shapes
    (``["low_res=1,3,16,16"]``).  A user class's config: :func:`fxpass.config.user_class_config`.
    """
    return lower_with_report(
        model, example_inputs, config=config, timesteps=timesteps, precision=precision, opset=opset,
        dynamic_batch=dynamic_batch, simplifier=simplifier, step_graph=step_graph, group_norm=group_norm,
        surgery_options=surgery_options, verify=verify, timestep_input=timestep_input, model_inputs=inputs,
        int8=int8,
    ).model
