"""The ``simplify`` stage: opset conversion, shape inference, the pass table, the simplifier, a report.

``simplify(model, opset=21)`` upgrades the model to ``opset`` (``onnx.version_converter``), runs
shape inference, imports it into onnx-graphsurgeon (typing the tensors onnx leaves untyped after a
``GroupNormalization``-21), runs the passes of ``surgery.passes.PASSES`` that its settings enable,
in the table's order after checking it against ``surgery.passes.CONSTRAINTS`` — today
fold_constants, remove_identity, remove_cast_pairs, rewrite_einsum_attention, fuse_group_norm,
fold_norm_scale_shift, expand_group_norm (``group_norm="auto"`` only), rewrite_upsample_conv,
merge_table_gathers, fold_constants again — and then onnxslim as the last stage
(``simplifier=None`` skips it).  ``options={"expand_group_norm": {"min_elements": 2**20}}``
reaches a pass's keyword options (``print(surgery.passes.describe())`` lists them).

fold_norm_scale_shift, expand_group_norm and rewrite_upsample_conv are there for speed on ONNX
Runtime's CPU provider (each module's docstring has its own measurement); merge_table_gathers
turns the table mode's one-Gather-per-vector (88 on CAMUS) into one Gather + Split per table shape.

Why onnxslim and not onnxsim (measured with onnxslim 0.1.98 / onnxsim 0.8.1, one thread): on the
CAMUS-width U-Net exported at 64 px (torch 2.13, dynamo, 1,367 nodes at opset 18; 1,471 with a
dynamic batch), before or after these passes, at opset 18 or 21, neither removes a single node
(the exporter's own optimizer already folded what they would) and both keep the outputs bit-exact;
on a float16-converted graph both drop the same 46 of 304 Casts.  Times were comparable
(onnxslim 1.0-2.1 s, onnxsim 1.6-2.3 s per run).  onnxsim adds ``onnxsim.*`` metadata_props to the
model; onnxslim is pure Python and already a declared dependency.  So only onnxslim is kept.

Models over 2 GB (``surgery.modelio.is_large``): protobuf cannot serialize them, so the
model-level tools (version converter, shape inference) run on a copy whose large initializers
live in a temporary folder (``modelio.light_call``), the simplifier stage is skipped with a
warning, and ``surgery.save_model`` writes such models with external data.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from fxpass.errors import first_line

from . import passes
from ._graph import has_untyped_gaps, typed_graph
from .modelio import default_opset, graph_io_names, io_metadata, is_large, light_call, op_histogram, restore_metadata


SIMPLIFIERS = ("onnxslim",)
GROUP_NORM_FORMS = ("auto", "keep")


def _convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    current = default_opset(model)
    if current == opset or current == 0:
        return model
    try:
        return light_call(model, lambda m: onnx.version_converter.convert_version(m, opset))
    except Exception as exc:  # noqa: BLE001 - the converter raises several types
        warnings.warn(
            f"surgery.simplify: could not convert the model from opset {current} to {opset} "
            f"({type(exc).__name__}: {first_line(exc)}); keeping opset {current}",
            stacklevel=3,
        )
        return model


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return light_call(model, lambda m: onnx.shape_inference.infer_shapes(m, data_prop=True))
    except Exception:  # noqa: BLE001 - shape inference is a help, not a requirement
        return model


def _run_simplifier(name: str, model: onnx.ModelProto) -> onnx.ModelProto:
    if name == "onnxslim":
        import onnxslim

        return onnxslim.slim(model)
    raise ValueError(f"unknown simplifier {name!r} (known: {', '.join(SIMPLIFIERS)} or None)")


def run_passes(graph: gs.Graph, chosen: list[tuple[passes.Pass, dict[str, Any]]]) -> tuple[gs.Graph, list[dict]]:
    """Run ``chosen`` (from ``passes.plan``) in order; the report entry of each run."""
    entries = []
    for entry, options in chosen:
        run = entry.run(graph, **options)
        graph = run.graph
        entries.append({"pass": entry.name, "count": run.count, "nodes": len(graph.nodes), "skipped": run.skipped})
    return graph, entries


def _simplifier_stage(name: str | None, result: onnx.ModelProto, saved: dict, io_names) -> tuple[onnx.ModelProto, dict]:
    status = {"name": name, "status": "skipped", "seconds": 0.0, "nodes_before": len(result.graph.node)}
    if name is not None:
        if is_large(result):
            warnings.warn("surgery.simplify: model over 2 GB, simplifier stage skipped", stacklevel=3)
            status["status"] = "skipped: model over 2 GB"
        else:
            t0 = time.perf_counter()
            try:
                simplified = _run_simplifier(name, copy.deepcopy(result))
                if graph_io_names(simplified) != io_names:
                    raise RuntimeError("it changed the graph's input/output names")
                restore_metadata(simplified, saved)
                result = simplified
                status["status"] = "ok"
            except Exception as exc:  # noqa: BLE001 - any simplifier failure falls back
                warnings.warn(
                    f"surgery.simplify: {name} failed ({type(exc).__name__}: {first_line(exc)}); "
                    "keeping the graph without it",
                    stacklevel=3,
                )
                status["status"] = f"failed: {type(exc).__name__}: {first_line(exc)}"
            status["seconds"] = round(time.perf_counter() - t0, 3)
    status["nodes_after"] = len(result.graph.node)
    return result, status


def simplify(
    model: onnx.ModelProto,
    opset: int = 21,
    *,
    simplifier: str | None = "onnxslim",
    group_norm: str = "auto",
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[onnx.ModelProto, dict]:
    """Run the surgery passes and the simplifier on ``model``; return the new model and a report.

    ``opset`` is the default-domain opset the result should have: a model exported at a lower
    opset is upgraded with ``onnx.version_converter`` first (a failure keeps the model's opset,
    with a warning; ``fuse_group_norm`` then skips below 21).  A failing simplifier falls back
    to the graph the passes produced, with a warning.  ``group_norm="keep"`` leaves every
    ``GroupNormalization`` as one node ("auto" expands the large ones for ONNX Runtime's CPU
    provider, see ``expand_group_norm``).  ``options`` maps a pass name to keyword options for
    it (``{"expand_group_norm": {"min_elements": 2**20}}``); an unknown pass or option name, a
    bad ``group_norm`` or simplifier, or a table that breaks its ordering rules raises
    ``ValueError`` before anything runs.  Graph input/output names and ``metadata_props``
    (model-level and on the graph inputs/outputs) are preserved.

    The report holds ``passes`` (an ordered list of ``{"pass", "count", "nodes", "skipped"}``,
    ``skipped`` mapping a reason to how many candidates it kept, most frequent first), ``nodes``
    and ``ops`` (``{"before", "after"}``: node count / op histogram), ``opset`` (before/after),
    ``simplifier`` (``{"name", "status", "seconds", "nodes_before", "nodes_after"}``) and
    ``seconds`` for the whole call.
    """
    if group_norm not in GROUP_NORM_FORMS:
        raise ValueError(f"unknown group_norm form {group_norm!r} (known: {', '.join(GROUP_NORM_FORMS)})")
    if simplifier is not None and simplifier not in SIMPLIFIERS:
        raise ValueError(f"unknown simplifier {simplifier!r} (known: {', '.join(SIMPLIFIERS)} or None)")
    chosen = passes.plan({"group_norm": group_norm}, options)
    started = time.perf_counter()
    saved = io_metadata(model)
    io_names = graph_io_names(model)
    report: dict = {
        "nodes": {"before": len(model.graph.node)},
        "ops": {"before": op_histogram(model)},
        "opset": {"before": default_opset(model)},
        "passes": [],
    }

    work = _convert_opset(model, opset)
    work = _infer_shapes(work)
    graph = gs.import_onnx(work)
    if has_untyped_gaps(graph):  # e.g. no value_info after a GroupNormalization-21: the passes need shapes
        graph, _ = typed_graph(graph)
    graph, report["passes"] = run_passes(graph, chosen)
    result = gs.export_onnx(graph)
    restore_metadata(result, saved)

    result, report["simplifier"] = _simplifier_stage(simplifier, result, saved, io_names)
    report["nodes"]["after"] = len(result.graph.node)
    report["ops"]["after"] = op_histogram(result)
    report["opset"]["after"] = default_opset(result)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return result, report
