"""ONNX-side surgery: graph passes on ``onnx_graphsurgeon.Graph`` and the ``simplify`` stage.

Each pass lives in its own module, is named verb-first and has the shape
``name(graph: gs.Graph) -> tuple[gs.Graph, int]`` (the int counts its rewrites); every pass ends
with ``graph.cleanup().toposort()`` and finds its pattern by structure, never by tensor names.
This package does not import torch.

``simplify(model, opset=21)`` runs, in order: fold_constants, remove_identity, remove_cast_pairs,
rewrite_einsum_attention, fuse_group_norm, fold_norm_scale_shift, expand_group_norm,
rewrite_upsample_conv, merge_table_gathers, fold_constants again, then onnxslim as the last stage
(``simplifier=None`` skips it; ``group_norm="keep"`` skips expand_group_norm, so every GroupNorm
stays one node).

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

Models over 2 GB: protobuf cannot serialize them, so ``simplify`` runs the model-level tools
(version converter, shape inference) on a copy whose large initializers are moved to external data
in a temporary folder, skips the simplifier stage with a warning, and ``save_model`` writes such
models with external data (``<name>.onnx.data`` next to the file).
"""

from __future__ import annotations

import collections
import copy
import os
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from .fold_constants import fold_constants as _fold_constants
from ._graph import has_untyped_gaps, typed_graph
from .expand_group_norm import expand_group_norm as _expand_group_norm
from .fold_norm_scale_shift import fold_norm_scale_shift as _fold_norm_scale_shift
from .fuse_group_norm import fuse_group_norm as _fuse_group_norm
from .merge_table_gathers import merge_table_gathers as _merge_table_gathers
from .remove_cast_pairs import remove_cast_pairs as _remove_cast_pairs
from .remove_identity import remove_identity as _remove_identity
from .rewrite_einsum_attention import rewrite_einsum_attention as _rewrite_einsum_attention
from .rewrite_upsample_conv import rewrite_upsample_conv as _rewrite_upsample_conv

# Each pass is imported under a private alias so that ``surgery.<pass>`` stays the module (and
# ``from surgery.<pass> import <pass>`` the function); ``convert_precision`` is a separate stage.
__all__ = ["PASSES", "SIMPLIFIERS", "op_histogram", "save_model", "simplify"]

# the order simplify runs the graph passes in
PASSES = (
    _fold_constants,
    _remove_identity,
    _remove_cast_pairs,
    _rewrite_einsum_attention,
    _fuse_group_norm,
    _fold_norm_scale_shift,
    _expand_group_norm,
    _rewrite_upsample_conv,
    _merge_table_gathers,
    _fold_constants,
)
SIMPLIFIERS = ("onnxslim",)
GROUP_NORM_FORMS = ("auto", "keep")

# protobuf's hard limit is 2 GiB; stay clear of it
LARGE_MODEL_BYTES = 2**31 - 2**26


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Op-type counts of the model's main graph, most frequent first."""
    counts = collections.Counter(n.op_type for n in model.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def _model_bytes(model: onnx.ModelProto) -> int:
    try:
        return model.ByteSize()
    except Exception:  # noqa: BLE001 - some protobuf builds refuse to size huge messages
        return LARGE_MODEL_BYTES + 1


def _is_large(model: onnx.ModelProto) -> bool:
    return _model_bytes(model) >= LARGE_MODEL_BYTES


def _light_call(model: onnx.ModelProto, fn):
    """Run ``fn(model) -> model`` on a copy whose big initializers live in a temp folder."""
    if not _is_large(model):
        return fn(model)
    with tempfile.TemporaryDirectory(prefix="surgery_") as tmp:
        light = copy.deepcopy(model)
        onnx.external_data_helper.convert_model_to_external_data(
            light, all_tensors_to_one_file=True, location="weights.bin", size_threshold=1024
        )
        onnx.external_data_helper.write_external_data_tensors(light, tmp)
        result = fn(light)
        onnx.external_data_helper.load_external_data_for_model(result, tmp)
        return result


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` atomically; over 2 GB its tensors go to ``<name>.data`` beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        if _is_large(model):
            data_name = path.name + ".data"
            # onnx.save_model moves the tensors of the proto it writes: work on a copy
            onnx.save_model(copy.deepcopy(model), staged, save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, staged)
        os.replace(staged, path)


def _io_metadata(model: onnx.ModelProto):
    return {
        "inputs": [(v.name, [(p.key, p.value) for p in v.metadata_props]) for v in model.graph.input],
        "outputs": [(v.name, [(p.key, p.value) for p in v.metadata_props]) for v in model.graph.output],
        "model": [(p.key, p.value) for p in model.metadata_props],
        "doc_string": model.doc_string,
        "domain": model.domain,
        "model_version": model.model_version,
    }


def _restore_metadata(model: onnx.ModelProto, saved) -> None:
    for values, kept in ((model.graph.input, saved["inputs"]), (model.graph.output, saved["outputs"])):
        by_name = dict(kept)
        for v in values:
            if v.name in by_name and not len(v.metadata_props):
                for key, value in by_name[v.name]:
                    v.metadata_props.add(key=key, value=value)
    present = {p.key for p in model.metadata_props}
    for key, value in saved["model"]:
        if key not in present:
            model.metadata_props.add(key=key, value=value)
    model.doc_string = model.doc_string or saved["doc_string"]
    model.domain = model.domain or saved["domain"]
    model.model_version = model.model_version or saved["model_version"]


def _graph_io_names(model: onnx.ModelProto):
    inits = {t.name for t in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in inits], [v.name for v in model.graph.output]


def _convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    current = _default_opset(model)
    if current == opset or current == 0:
        return model
    try:
        return _light_call(model, lambda m: onnx.version_converter.convert_version(m, opset))
    except Exception as exc:  # noqa: BLE001 - the converter raises several types
        warnings.warn(
            f"surgery.simplify: could not convert the model from opset {current} to {opset} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); keeping opset {current}",
            stacklevel=3,
        )
        return model


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return _light_call(model, lambda m: onnx.shape_inference.infer_shapes(m, data_prop=True))
    except Exception:  # noqa: BLE001 - shape inference is a help, not a requirement
        return model


def _run_simplifier(name: str, model: onnx.ModelProto) -> onnx.ModelProto:
    if name == "onnxslim":
        import onnxslim

        return onnxslim.slim(model)
    raise ValueError(f"unknown simplifier {name!r} (known: {', '.join(SIMPLIFIERS)} or None)")


def simplify(
    model: onnx.ModelProto,
    opset: int = 21,
    *,
    simplifier: str | None = "onnxslim",
    group_norm: str = "auto",
) -> tuple[onnx.ModelProto, dict]:
    """Run the surgery passes and the simplifier on ``model``; return the new model and a report.

    ``opset`` is the default-domain opset the result should have: a model exported at a lower
    opset is upgraded with ``onnx.version_converter`` first (a failure keeps the model's opset,
    with a warning; ``fuse_group_norm`` then skips below 21).  A failing simplifier falls back
    to the graph the passes produced, with a warning.  ``group_norm="keep"`` leaves every
    ``GroupNormalization`` as one node ("auto" expands the large ones for ONNX Runtime's CPU
    provider, see ``expand_group_norm``).  Graph input/output names and
    ``metadata_props`` (model-level and on the graph inputs/outputs) are preserved.

    The report holds ``passes`` (an ordered list of ``{"pass", "count", "nodes"}``), ``nodes``
    and ``ops`` (``{"before", "after"}``: node count / op histogram), ``opset`` (before/after),
    ``simplifier`` (``{"name", "status", "seconds", "nodes_before", "nodes_after"}``) and
    ``seconds`` for the whole call.
    """
    if group_norm not in GROUP_NORM_FORMS:
        raise ValueError(f"unknown group_norm form {group_norm!r} (known: {', '.join(GROUP_NORM_FORMS)})")
    if simplifier is not None and simplifier not in SIMPLIFIERS:
        raise ValueError(f"unknown simplifier {simplifier!r} (known: {', '.join(SIMPLIFIERS)} or None)")
    started = time.perf_counter()
    saved = _io_metadata(model)
    in_names, out_names = _graph_io_names(model)
    report: dict = {
        "nodes": {"before": len(model.graph.node)},
        "ops": {"before": op_histogram(model)},
        "opset": {"before": _default_opset(model)},
        "passes": [],
    }

    work = _convert_opset(model, opset)
    work = _infer_shapes(work)
    graph = gs.import_onnx(work)
    if has_untyped_gaps(graph):  # e.g. no value_info after a GroupNormalization-21: the passes need shapes
        graph, _ = typed_graph(graph)
    for graph_pass in PASSES:
        if graph_pass is _expand_group_norm and group_norm == "keep":
            continue
        graph, count = graph_pass(graph)
        report["passes"].append({"pass": graph_pass.__name__, "count": int(count), "nodes": len(graph.nodes)})
    result = gs.export_onnx(graph)
    _restore_metadata(result, saved)

    status = {"name": simplifier, "status": "skipped", "seconds": 0.0, "nodes_before": len(result.graph.node)}
    if simplifier is not None:
        if _is_large(result):
            warnings.warn("surgery.simplify: model over 2 GB, simplifier stage skipped", stacklevel=2)
            status["status"] = "skipped: model over 2 GB"
        else:
            t0 = time.perf_counter()
            try:
                simplified = _run_simplifier(simplifier, copy.deepcopy(result))
                if _graph_io_names(simplified) != (in_names, out_names):
                    raise RuntimeError("it changed the graph's input/output names")
                _restore_metadata(simplified, saved)
                result = simplified
                status["status"] = "ok"
            except Exception as exc:  # noqa: BLE001 - any simplifier failure falls back
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                warnings.warn(
                    f"surgery.simplify: {simplifier} failed ({type(exc).__name__}: {first}); "
                    "keeping the graph without it",
                    stacklevel=2,
                )
                status["status"] = f"failed: {type(exc).__name__}: {first}"
            status["seconds"] = round(time.perf_counter() - t0, 3)
    status["nodes_after"] = len(result.graph.node)
    report["simplifier"] = status
    report["nodes"]["after"] = len(result.graph.node)
    report["ops"]["after"] = op_histogram(result)
    report["opset"]["after"] = _default_opset(result)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return result, report
