"""ONNX Runtime's ORT format (``.ort``) and its mobile-usability check, with ONNX Runtime's own tools.

:func:`to_ort` calls ``onnxruntime.tools.convert_onnx_models_to_ort.convert_onnx_models_to_ort`` (the
Python function behind ``python -m onnxruntime.tools.convert_onnx_models_to_ort``) on a copy of the
model in a temporary directory, then runs the ``.ort`` file with ONNX Runtime against the ONNX model
on seeded inputs before moving it into place.

:func:`mobile_coverage` runs the checks of ``python -m onnxruntime.tools.check_onnx_model_mobile_usability``
and returns them as data.  That tool only logs its findings (``analyze_model`` returns a bool), so
instead of parsing the log this calls the same functions it calls, from
``onnxruntime.tools.mobile_helpers.usability_checker`` — ``optimize_model`` (ORT's BASIC level, as the
tool does unless ``--skip_optimize``), ``ModelProtoWithShapeInfo``, ``check_shapes``,
``check_nnapi_partitions`` and ``check_coreml_partitions`` with the ML Program and NeuralNetwork op
tables — and reads their ``PartitioningInfo`` objects; the tool's own log lines for each EP
(``PartitioningInfo.print_analysis``) are kept under ``"log"``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pathlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FxpassError
from ._deps import require
from ..fileio import staged_path
from ._io import gate, spread, worst_error

OPTIMIZATION_STYLES = ("Fixed", "Runtime")
TARGET_PLATFORMS = ("arm", "amd64")
#: gates for the .ort file against the ONNX model, by the model's fxpass.precision.  fp32: same runtime,
#: same kernels, tight.  fp16: ORT's CPU optimizer (level "all": replayed at load in the Runtime style,
#: applied before saving in the Fixed one) runs the float16 nodes in float32 behind inserted Casts, so
#: it differs from the ONNX run by the float16 rounding it skips (1.0e-3·max|ref| on the tiny config).
#: int8: the same QDQ kernels on both sides (measured 0.0)
ORT_TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2, "int8": 1e-2}
#: EP name as the mobile-usability tool calls it -> op table file in onnxruntime/tools/mobile_helpers
COREML_TABLES = {"CoreML MLProgram": "coreml_supported_mlprogram_ops.md",
                 "CoreML NeuralNetwork": "coreml_supported_neuralnetwork_ops.md"}


def _as_onnx_file(model, tmp: Path) -> Path:
    """A path to the model: the given file, or the ModelProto saved into ``tmp``."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        path = tmp / "model.onnx"
        onnx.save_model(model, str(path))  # a >2 GiB proto would need external data; fxpass's U-Nets are not
        return path
    path = Path(model)
    if not path.is_file():
        raise FxpassError(f"{path}: no such ONNX file")
    return path


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32"}


def seeded_feeds(session, *, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """fxpass's one seeded input source (:func:`fxpass.inputs.seeded_feeds`) for a session's inputs, at the
    first, middle and last entry of the model's schedule (from its fxpass metadata)."""
    from .. import metadata
    from ..inputs import InputSpec
    from ..inputs import seeded_feeds as feeds_for

    specs = []
    for inp in session.get_inputs():
        if inp.type not in _ORT_TYPES:
            raise FxpassError(f"input {inp.name}: type {inp.type} has no seeded values")
        specs.append(InputSpec(inp.name, _ORT_TYPES[inp.type],
                               tuple(d if isinstance(d, int) and d > 0 else -1 for d in inp.shape)))
    props = dict(session.get_modelmeta().custom_metadata_map)
    if metadata.is_fxpass(props):
        meta = metadata.parse(props, "model")
        timesteps, seen = list(meta.timesteps), list(meta.model_timesteps)
    else:
        timesteps = seen = [0]
    has_index = any(spec.name == "t_index" for spec in specs)
    return feeds_for(specs, seed=seed, timesteps=timesteps, model_timesteps=seen,
                     t_indices=spread(len(timesteps)) if has_index else None, count=1).feeds


def _session(path: Path):
    ort = require("ort")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _precision(path: Path) -> str:
    """The model's fxpass precision (fp32, fp16, int8) from its metadata; for another model fp16 when
    it takes a float16 input, int8 when it holds QuantizeLinear nodes, else fp32."""
    sess = _session(path)
    meta = sess.get_modelmeta().custom_metadata_map
    from .. import metadata

    if meta.get(metadata.PRECISION) in ORT_TOLERANCE:  # fxpass wrote it: no need to read the graph again
        return meta[metadata.PRECISION]
    if any(i.type == "tensor(float16)" for i in sess.get_inputs()):
        return "fp16"
    import onnx

    graph = onnx.load_model(str(path), load_external_data=False).graph
    return "int8" if any(n.op_type == "QuantizeLinear" for n in graph.node) else "fp32"


def compare_ort(onnx_path: str | Path, ort_path: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """Run the ``.ort`` file and the ONNX model with ONNX Runtime (CPU) on the same seeded inputs;
    the worst max|diff|/max|ref| over the inputs and outputs, and the t_index values used."""
    ref_sess, ort_sess = _session(Path(onnx_path)), _session(Path(ort_path))
    worst, used = 0.0, []
    names = [o.name for o in ref_sess.get_outputs()]
    if names != [o.name for o in ort_sess.get_outputs()]:
        raise FxpassError(f"{ort_path}: outputs {[o.name for o in ort_sess.get_outputs()]} differ from the ONNX's {names}")
    amplification = _step_amplification(ref_sess)
    for feeds in seeded_feeds(ref_sess, seed=seed):
        ref, out = ref_sess.run(None, feeds), ort_sess.run(None, feeds)
        t_index = int(feeds["t_index"].flat[0]) if "t_index" in feeds else None
        worst = max(worst, worst_error(out, ref, names, t_index=t_index, sqrt_recipm1=amplification))
        if t_index is not None:
            used.append(t_index)
    return {"max_rel_to_scale": worst, "t_index": used, "outputs": names}


def _step_amplification(session):
    """sqrt(1/alpha_bar - 1) per t_index of a step graph (from its fxpass metadata), else None."""
    from .. import metadata

    props = dict(session.get_modelmeta().custom_metadata_map)
    if props.get(metadata.MODE) != "step":
        return None
    from ..config import from_dict
    from ..diffusion import Diffusion

    meta = metadata.parse(props, "model", require=("step",))
    return Diffusion.from_config(from_dict(meta.config).to_dict()).sqrt_recipm1_alphas_cumprod


def to_ort(onnx_path_or_proto, out_path: str | Path, *, optimization_style: str = "Runtime",
           target_platform: str = "arm", verify: bool = True, tolerance: float | None = None,
           seed: int = 0) -> dict[str, Any]:
    """Convert an ONNX model (a file or a ``ModelProto``) to ONNX Runtime's ORT format at ``out_path``.

    ``optimization_style``: "Runtime" (default: basic optimizations saved, the rest replayed at load for
    the nodes the CPU provider gets — what ORT recommends for the NNAPI/CoreML EPs) or "Fixed"
    (optimizations for the CPU provider applied before saving).  Measured on the tiny config: Fixed
    saves 51 contrib-op nodes (FusedConv, QuickGelu, FusedMatMul) that the CoreML EP has no kernel
    for, so the mobile-usability check of the ONNX would overstate what CoreML takes of the file, and
    it stores a float16 model's weights as float32 (6.7 MB against Runtime's 3.7 MB).
    ``verify``: the ``.ort`` file runs with ONNX Runtime against the ONNX model at three t_index
    values; above ``tolerance``·max|ref| (default by the model's ``fxpass.precision``: fp32 1e-5, fp16
    1e-2) or with NaN/Inf nothing is written and FxpassError (exit 1) is raised.  Returns ``{"path", "bytes", "onnx_bytes", "optimization_style", "check"}``.
    """
    if optimization_style not in OPTIMIZATION_STYLES:
        raise FxpassError(f"optimization style {optimization_style}: expected {' or '.join(OPTIMIZATION_STYLES)}")
    if target_platform not in TARGET_PLATFORMS:
        raise FxpassError(f"target platform {target_platform}: expected {' or '.join(TARGET_PLATFORMS)}")
    require("ort")
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="fxpass-ort-") as tmp:
        tmp = Path(tmp)
        src = _as_onnx_file(onnx_path_or_proto, tmp)
        work = tmp / "in"
        work.mkdir()
        model = work / "model.onnx"  # the tool converts every .onnx it finds beside: give it one alone
        model.write_bytes(src.read_bytes())  # fxpass writes single-file models (no external data)
        converted_dir = tmp / "out"
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):  # the tool prints its progress
                convert_onnx_models_to_ort(model, output_dir=converted_dir,
                                           optimization_styles=[OptimizationStyle[optimization_style]],
                                           target_platform=target_platform)
        except Exception as exc:  # noqa: BLE001 - third-party converters raise many types; re-raised as FxpassError
            from ..errors import first_line

            raise FxpassError(f"{out_path}: ONNX Runtime's ORT-format converter failed: {first_line(exc)}") from None
        produced = sorted(converted_dir.glob("*.ort"))
        if len(produced) != 1:
            raise FxpassError(f"{out_path}: the ORT-format converter wrote {len(produced)} .ort files "
                              f"({log.getvalue().strip()[-300:]})")
        report: dict[str, Any] = {"optimization_style": optimization_style, "target_platform": target_platform,
                                  "onnx_bytes": src.stat().st_size, "bytes": produced[0].stat().st_size,
                                  "ops": ort_file_ops(produced[0])}
        if verify:
            if tolerance is None:
                tolerance = ORT_TOLERANCE[_precision(src)]
            report["check"] = gate(compare_ort(src, produced[0], seed=seed), tolerance, out_path,
                                   "the ORT-format model", "the ONNX")
        with staged_path(out_path) as staged:
            staged.write_bytes(produced[0].read_bytes())
    report["path"] = str(out_path)
    return report


def ort_file_ops(path: str | Path) -> dict[str, int]:
    """Op types (``domain:op``) and their counts in an ``.ort`` file's main graph, read with ONNX
    Runtime's own flatbuffer bindings (``onnxruntime.tools.ort_format_model``)."""
    require("ort")
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py import fbs

    data = Path(path).read_bytes()
    try:
        graph = fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(data, 0).Model().Graph()
        counts: dict[str, int] = {}
        for i in range(graph.NodesLength()):
            node = graph.Nodes(i)
            key = f"{(node.Domain() or b'').decode() or 'ai.onnx'}:{node.OpType().decode()}"
            counts[key] = counts.get(key, 0) + 1
    except Exception as exc:  # noqa: BLE001 - a malformed flatbuffer raises many types
        from ..errors import first_line

        raise FxpassError(f"{path}: not an ORT-format model ONNX Runtime's tools can read: {first_line(exc)}") from None
    return dict(sorted(counts.items()))


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _partitioning(info) -> dict[str, Any]:
    total = int(info.num_nodes)
    return {
        "nodes": total,
        "nodes_supported": int(info.num_supported_nodes),
        "fraction_supported": (info.num_supported_nodes / total) if total else 0.0,
        "partitions": int(info.num_partitions),
        "partition_sizes": [len(group) for group in info.supported_groups],
        "unsupported_ops": sorted(info.unsupported_ops),
        "nodes_unsupported_due_to_op": int(info.nodes_unsupported_due_to_op),
        "nodes_unsupported_due_to_dynamic_shape": int(info.nodes_unsupported_due_to_dynamic_input),
        "nodes_unsupported_due_to_rank": int(info.num_unsupported_nodes_due_to_rank),
        "ops_with_unsupported_rank": sorted(info.ops_with_unsupported_rank),
        "caveats": list(info.supported_ops_checker.get_caveats()),
        "suitability": info.suitability().name,  # the tool's verdict: YES / MAYBE / NO
    }


def mobile_coverage(onnx_path_or_proto, *, skip_optimize: bool = False) -> dict[str, Any]:
    """ONNX Runtime's mobile-usability check as data, per execution provider ("NNAPI", "CoreML
    MLProgram", "CoreML NeuralNetwork"): nodes it would take / total, partitions and their sizes,
    unsupported ops, nodes refused for dynamic shapes or rank, the op caveats it did not check, and
    its suitability verdict; ``"if_fixed_shapes"`` repeats the numbers with shapes ignored (the tool
    does so when an input is dynamic; here also when any value inside is, e.g. the Shape→Reshape
    chains of an inlined ``GroupNormalization`` function body).  The model is first optimized at ORT's BASIC level, as the tool
    does (``skip_optimize`` skips that).  ``"log"``: the tool's own report lines.

    An estimate by op type and shape, as the tool's is: a node may still be refused by the EP at load
    for an attribute the table's caveats mention.
    """
    require("ort")
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import (
        ModelProtoWithShapeInfo,
        optimize_model,
    )

    logger = logging.getLogger("fxpass.formats.mobile_coverage")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = _ListHandler()
    logger.addHandler(handler)
    try:
        with tempfile.TemporaryDirectory(prefix="fxpass-mobile-") as tmp:
            tmp = Path(tmp)
            path = _as_onnx_file(onnx_path_or_proto, tmp)
            if not skip_optimize:
                optimized = tmp / "optimized.onnx"
                optimize_model(path, optimized, use_external_initializers=True)
                path = optimized
            model = ModelProtoWithShapeInfo(pathlib.Path(path).resolve(strict=True)).model_with_shape_info
            dynamic_inputs, dynamic_values = uc.check_shapes(model.graph)
            checkers = {"NNAPI": uc.check_nnapi_partitions,
                        **{ep: (lambda m, fixed, table=table: uc.check_coreml_partitions(m, fixed, table))
                           for ep, table in COREML_TABLES.items()}}
            eps: dict[str, Any] = {}
            for ep, check in checkers.items():
                info = check(model, True)
                info.print_analysis(logger, ep)
                eps[ep] = _partitioning(info)
                if dynamic_inputs or dynamic_values:
                    eps[ep]["if_fixed_shapes"] = _partitioning(check(model, False))
    finally:
        logger.removeHandler(handler)
    return {
        "nodes": len(model.graph.node),
        "optimized": not skip_optimize,
        "dynamic_inputs": [i.name for i in dynamic_inputs],
        "dynamic_values": int(dynamic_values),
        "eps": eps,
        "log": handler.lines,
    }
