"""Core ML ``.mlpackage`` (ML Program) with coremltools: the rewritten fx graph (or any module with the
same inputs) through ``torch.export.export`` and ``ct.convert(..., convert_to="mlprogram")``, float16
compute precision by default, optional 6/8-bit k-means weight palettization
(``ct.optimize.coreml.palettize_weights``).

On Linux conversion and the spec are checked; predictions need macOS (Core ML's runtime), so
:func:`predict_mlpackage` — and the numeric check of :func:`to_mlpackage` — run there only and say so
elsewhere.  ``t_index`` is an int32 input (Core ML has no int64 inputs); the graph casts it back.
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FxpassError, first_line
from ._deps import require
from ..fileio import staged_path
from ._io import compare_module, tree_bytes

PRECISIONS = ("fp16", "fp32")
PALETTIZE_BITS = (None, 1, 2, 3, 4, 6, 8)  # what OpPalettizerConfig accepts; 6 and 8 are the sensible ones
#: numeric gates (max|diff| ≤ tol·max|ref|) when predictions can run (macOS)
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
MACOS_ONLY = "Core ML predictions need macOS (coremltools has no Core ML runtime on {system})"


def predictions_unavailable_reason() -> str | None:
    """Why Core ML predictions cannot run here (None on macOS)."""
    system = platform.system()
    return None if system == "Darwin" else MACOS_ONLY.format(system=system or "this system")


class _Int32Index(torch.nn.Module):
    """Integer inputs arrive as int32 (Core ML has no int64 inputs) and are widened to int64 inside."""

    def __init__(self, module: torch.nn.Module, int_positions: Sequence[int]):
        super().__init__()
        self.module = module
        self.int_positions = tuple(int_positions)

    def forward(self, *args):
        args = [a.long() if i in self.int_positions else a for i, a in enumerate(args)]
        return self.module(*args)


def _named(example_inputs, module) -> dict[str, torch.Tensor]:
    if isinstance(example_inputs, Mapping):
        return dict(example_inputs)
    import inspect

    names = list(inspect.signature(module.forward).parameters)
    return {names[i] if i < len(names) else f"input_{i}": a for i, a in enumerate(example_inputs)}


def to_mlpackage(module: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                 out_path: str | Path, *, palettize_bits: int | None = None, precision: str = "fp16",
                 minimum_deployment_target: str = "iOS16", output_names: Sequence[str] = ("out",),
                 verify: bool = True, tolerance: float | None = None, rows: int | None = None) -> dict[str, Any]:
    """Convert ``module`` (the rewritten fx graph, a traced module or any ``nn.Module`` taking the example
    inputs positionally) to a Core ML ML Program package at ``out_path`` (a directory ``*.mlpackage``).

    ``precision``: Core ML compute precision, "fp16" (default; weights stored float16) or "fp32".
    ``palettize_bits``: 6 or 8 (or 1–4) quantizes the weights to a 2^bits-entry k-means palette per
    tensor (``OpPalettizerConfig(mode="kmeans")``; tensors under 2048 elements stay as they are).
    ``minimum_deployment_target``: a ``ct.target`` name; iOS16 is the first that has palettized
    weights.  ``output_names``: the outputs' names (float32, as the ONNX model's; the step graph's are
    ``x_prev``, ``pred_xstart``).  ``rows``: t_index rows of the tables (default: the graph's metadata).  ``verify``: on macOS, predictions against ``module`` at three t_index (fp16 2e-2, fp32
    1e-4 ·max|ref|; palettized: measured, not gated); elsewhere ``check`` says it was skipped and why.
    Returns ``{"path", "bytes", "precision", "palettize_bits", "convert_s", "spec", "check"}``.
    """
    ct = require("mlpackage")
    if precision not in PRECISIONS:
        raise FxpassError(f"Core ML precision {precision}: expected {' or '.join(PRECISIONS)}")
    if palettize_bits not in PALETTIZE_BITS:
        raise FxpassError(f"palettize bits {palettize_bits}: expected one of 6, 8 (or 1, 2, 3, 4)")
    target = getattr(ct.target, minimum_deployment_target, None)
    if target is None:
        raise FxpassError(f"minimum deployment target {minimum_deployment_target}: not a coremltools target")
    named = _named(example_inputs, module)
    ints = [i for i, a in enumerate(named.values()) if not a.is_floating_point()]
    wrapped = _Int32Index(module, ints).eval()
    args = tuple(a.int() if i in ints else a for i, a in enumerate(named.values()))
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            exported = torch.export.export(wrapped, args).run_decompositions({})
    except Exception as exc:  # noqa: BLE001 - third-party converters raise many types; re-raised as FxpassError
        raise FxpassError(f"{out_path}: torch.export failed: {first_line(exc)}") from None
    inputs = [ct.TensorType(name=name, shape=tuple(a.shape), dtype=np.int32 if i in ints else np.float32)
              for i, (name, a) in enumerate(named.items())]
    try:
        outputs = [ct.TensorType(name=name, dtype=np.float32) for name in output_names]
        mlmodel = ct.convert(exported, inputs=inputs, outputs=outputs, convert_to="mlprogram",
                             minimum_deployment_target=target,
                             compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32)
        if palettize_bits is not None:
            from coremltools.optimize.coreml import (
                OpPalettizerConfig,
                OptimizationConfig,
                palettize_weights,
            )

            config = OptimizationConfig(global_config=OpPalettizerConfig(mode="kmeans", nbits=palettize_bits))
            mlmodel = palettize_weights(mlmodel, config=config)
    except FxpassError:
        raise
    except Exception as exc:  # noqa: BLE001 - third-party converters raise many types; re-raised as FxpassError
        raise FxpassError(f"{out_path}: coremltools conversion failed: {first_line(exc)}") from None
    convert_s = time.perf_counter() - t0
    report: dict[str, Any] = {"precision": precision, "palettize_bits": palettize_bits,
                              "minimum_deployment_target": minimum_deployment_target, "convert_s": convert_s}
    tolerance = (TOLERANCE[precision] if palettize_bits is None else None) if tolerance is None else tolerance
    with staged_path(out_path) as staged:
        mlmodel.save(str(staged))
        report["spec"] = describe_mlpackage(staged)
        _check_structure(report["spec"], named, palettize_bits)
        if verify:
            report["check"] = _verify(staged, module, named, tolerance, rows)
            if report["check"].get("passed") is False:
                raise FxpassError(f"{out_path}: not written: Core ML differs from PyTorch by "
                                  f"{report['check']['max_rel_to_scale']:.3g}·max|ref| (tolerance {tolerance:g})",
                                  exit_code=1)
    report["bytes"] = tree_bytes(out_path)
    report["spec"]["path"] = report["path"] = str(out_path)
    return report


def _check_structure(spec: dict[str, Any], named: Mapping[str, torch.Tensor], palettize_bits: int | None) -> None:
    """The saved package is an ML Program with the inputs asked for (and palettized weights when asked)."""
    if spec["kind"] != "mlProgram":
        raise FxpassError(f"coremltools wrote a {spec['kind']} model, not an ML Program")
    got = {i["name"]: i["shape"] for i in spec["inputs"]}
    want = {name: list(a.shape) for name, a in named.items()}
    if got != want:
        raise FxpassError(f"Core ML inputs {got} differ from the example inputs {want}")
    if palettize_bits is not None and not any(op.startswith("constexpr_lut_to_dense") for op in spec["ops"]):
        raise FxpassError("palettization left no constexpr_lut_to_dense op in the program")


def _verify(path: Path, module, named, tolerance, rows: int | None) -> dict[str, Any]:
    reason = predictions_unavailable_reason()
    if reason is not None:
        return {"skipped": reason}
    names = list(named)
    check = compare_module(lambda case: predict_mlpackage(path, dict(zip(names, case))), module,
                           list(named.values()), rows=rows, where=str(path))
    check["tolerance"] = tolerance
    if tolerance is not None:
        check["passed"] = check["max_rel_to_scale"] <= tolerance
    return check


def predict_mlpackage(path: str | Path, inputs: Mapping[str, Any]) -> list[np.ndarray]:
    """Run a package with Core ML (macOS only; FxpassError elsewhere); outputs in the spec's order.
    Integer inputs are passed as int32."""
    ct = require("mlpackage")
    reason = predictions_unavailable_reason()
    if reason is not None:
        raise FxpassError(reason)
    model = ct.models.MLModel(str(path))
    feeds = {}
    for name, value in inputs.items():
        arr = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        feeds[name] = arr.astype(np.int32) if np.issubdtype(arr.dtype, np.integer) else arr.astype(np.float32)
    result = model.predict(feeds)
    order = [o.name for o in model.get_spec().description.output]
    return [np.asarray(result[name]) for name in order]


_ARRAY_TYPES = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32", 131080: "int8"}


def _feature(feature) -> dict[str, Any]:
    kind = feature.type.WhichOneof("Type")
    entry: dict[str, Any] = {"name": feature.name, "type": kind}
    if kind == "multiArrayType":
        arr = feature.type.multiArrayType
        entry["shape"] = [int(d) for d in arr.shape]
        entry["dtype"] = _ARRAY_TYPES.get(int(arr.dataType), str(arr.dataType))
    return entry


def _operations(block) -> list:
    ops = []
    for op in block.operations:
        ops.append(op.type)
        for inner in op.blocks:
            ops.extend(_operations(inner))
    return ops


def describe_mlpackage(path: str | Path) -> dict[str, Any]:
    """What a package holds, read from its spec without loading it into Core ML (works on Linux):
    ``kind`` ("mlProgram"), ``specification_version``, ``inputs``/``outputs`` (name, shape, dtype),
    ``ops`` (op type -> count over the main function, nested blocks included), ``op_count``,
    ``weights_bytes`` (the weight blob) and ``bytes`` (the whole package), ``metadata``."""
    ct = require("mlpackage")
    path = Path(path)
    if not path.exists():
        raise FxpassError(f"{path}: no such .mlpackage")
    try:
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    except Exception as exc:  # noqa: BLE001 - third-party converters raise many types; re-raised as FxpassError
        raise FxpassError(f"{path}: not a Core ML package coremltools can read: {first_line(exc)}") from None
    kind = spec.WhichOneof("Type")
    ops: Counter = Counter()
    if kind == "mlProgram":
        for function in spec.mlProgram.functions.values():
            for block in function.block_specializations.values():
                ops.update(_operations(block))
    weights = sum(p.stat().st_size for p in path.rglob("weight*.bin")) if path.is_dir() else 0
    return {
        "kind": kind,
        "specification_version": int(spec.specificationVersion),
        "inputs": [_feature(f) for f in spec.description.input],
        "outputs": [_feature(f) for f in spec.description.output],
        "ops": dict(sorted(ops.items())),
        "op_count": int(sum(ops.values())),
        "weights_bytes": weights,
        "bytes": tree_bytes(path),
        "metadata": dict(spec.description.metadata.userDefined),
    }
