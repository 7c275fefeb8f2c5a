"""LiteRT ``.tflite`` (issue #28): the rewritten fx graph through ``litert_torch.convert`` (64-bit ``t_index``
kept: ``enable_x64=True``), reduced precision with ``ai-edge-quantizer`` recipes, checked in LiteRT's
interpreter (``ai_edge_litert.interpreter.Interpreter``) against PyTorch before it is written.

Precisions: ``fp32``; ``fp16``: float16 weights (the quantizer's weight-only ``FLOAT_CASTING`` at 16 bits:
DEQUANTIZE ops widen them, compute stays float32); ``int8``: dynamic-range int8 (``dynamic_wi8_afp32``:
int8 per-channel weights, activations quantized on the fly by the kernels).  Static int8 (calibrated
activations, int8 inputs and outputs) is not made.

The graph is the one ``fxpass.capture`` + ``fxpass.passes.rewrite`` produce (the timestep folded into
tables gathered by ``t_index``), or the step graph around it.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FxpassError, first_line
from ..fileio import staged_path
from ._deps import require, require_module
from ._io import compare_module, gate

PRECISIONS = ("fp32", "fp16", "int8")


def tolerance_for(precision: str) -> float:
    """The gate (max|diff| ≤ tol·max|ref|): fp32 and fp16 as ``.pte``'s, int8 the ONNX int8 path's bound
    (``targets.compare.TOLERANCES``: a sanity bound for a broken graph, not a quality verdict)."""
    from targets.compare import TOLERANCES

    from .pte import TOLERANCE

    if precision not in PRECISIONS:
        raise FxpassError(f"LiteRT precision {precision}: expected one of {', '.join(PRECISIONS)}")
    return TOLERANCE[precision] if precision in TOLERANCE else TOLERANCES[precision][0]


@contextlib.contextmanager
def _quiet_converter():
    """litert_torch prints a progress line per task unless LITERT_TORCH_SHOW_PROGRESS says no."""
    key, before = "LITERT_TORCH_SHOW_PROGRESS", os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ[key] = "n"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _named(example_inputs, module) -> dict[str, torch.Tensor]:
    if isinstance(example_inputs, Mapping):
        return dict(example_inputs)
    from .mlpackage import _named as named

    return named(example_inputs, module)


def convert(module: torch.nn.Module, example_inputs, where: str = "model") -> bytes:
    """The float32 .tflite flatbuffer of ``module`` (traced with the named example inputs)."""
    litert_torch = require("tflite")
    kwargs = _named(example_inputs, module)
    try:
        with _quiet_converter(), torch.no_grad():
            edge = litert_torch.convert(module.eval(), sample_kwargs=kwargs, enable_x64=True)
        with _quiet_converter():  # convert restores the setting it found on its way out: set it again
            return bytes(edge.model_content())
    except Exception as exc:  # noqa: BLE001 - third-party converters raise many types; re-raised as FxpassError
        raise FxpassError(f"{where}: LiteRT conversion failed: {first_line(exc)}") from None


def quantize(data: bytes, precision: str, where: str = "model") -> bytes:
    """``data`` (a float32 .tflite) at ``precision``: fp16 weights, or dynamic-range int8 (fp32: as it is)."""
    if precision == "fp32":
        return data
    require("tflite")
    from ai_edge_quantizer import qtyping, quantizer, recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    try:
        if precision == "fp16":
            q = quantizer.Quantizer(bytearray(data))
            q.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                     num_bits=16, algorithm_key=AlgorithmName.FLOAT_CASTING)
        elif precision == "int8":
            q = quantizer.Quantizer(bytearray(data), recipe.dynamic_wi8_afp32())
        else:
            raise FxpassError(f"LiteRT precision {precision}: expected one of {', '.join(PRECISIONS)}")
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # its tqdm progress bars
            return bytes(q.quantize(enable_progress_report=False).quantized_model)
    except FxpassError:
        raise
    except Exception as exc:  # noqa: BLE001 - third-party quantizers raise many types
        raise FxpassError(f"{where}: ai-edge-quantizer failed at {precision}: {first_line(exc)}") from None


def to_tflite(graph_module: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
              out_path: str | Path, *, precision: str = "fp32", verify: bool = True,
              reference: torch.nn.Module | None = None, tolerance: float | None = None, rows: int | None = None,
              metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Convert ``graph_module`` (the rewritten fx graph, or the step graph: inputs x, t_index, noise;
    outputs x_prev, pred_xstart) to a LiteRT model at ``out_path`` at ``precision`` (fp32, fp16, int8).

    ``metadata``: fxpass metadata entries (:func:`fxpass.metadata.encode`) stored in the file, so that
    ``fxpass check FILE.tflite`` knows its schedule.  ``verify``: the file runs in LiteRT's interpreter
    against ``reference`` (default: ``graph_module`` in float32) with ``t_index`` at the first, middle and
    last row of its tables (``rows``; default from the graph's metadata); above ``tolerance``·max|ref|
    (default :func:`tolerance_for`) or NaN/Inf nothing is written and FxpassError (exit 1) is raised.
    An existing ``out_path`` is refused before any work unless ``overwrite``.  Returns ``{"path", "bytes", "precision", "ops",
    "gather_ops", "convert_s", "quantize_s", "delegates", "check"}`` (``delegates``: which op types the GPU and
    Core ML delegates' own op lists (read from their source) take,
    :func:`fxpass.formats.tflite_file.delegate_coverage`).
    """
    from .tflite_file import delegate_coverage, read_facts, with_metadata

    tolerance = tolerance_for(precision) if tolerance is None else tolerance
    named = _named(example_inputs, graph_module)
    where = str(out_path)
    if not overwrite and os.path.lexists(out_path):
        raise FxpassError(f"{out_path}: already exists (not replaced)")
    t0 = time.perf_counter()
    data = convert(graph_module, named, where)
    t1 = time.perf_counter()
    data = quantize(data, precision, where)
    if metadata:
        data = with_metadata(data, dict(metadata))
    t2 = time.perf_counter()
    facts = read_facts(data, where)
    report: dict[str, Any] = {"precision": precision, "bytes": len(data), "ops": facts.ops,
                              "op_count": sum(facts.ops.values()), "gather_ops": facts.gathers(),
                              "convert_s": t1 - t0, "quantize_s": t2 - t1, "delegates": delegate_coverage(facts.ops)}
    with staged_path(out_path) as staged:
        staged.write_bytes(data)
        if verify:
            names = list(named)
            check = compare_module(lambda case: run_tflite(staged, dict(zip(names, case))),
                                   graph_module if reference is None else reference, list(named.values()),
                                   rows=rows, where=where)
            report["check"] = gate(check, tolerance, out_path, "LiteRT")
    report["path"] = str(out_path)
    return report


def _interpreter(path_or_bytes, *, threads: int | None = None):
    require_module("tflite", "ai_edge_litert")
    from ai_edge_litert.interpreter import Interpreter

    try:
        if isinstance(path_or_bytes, (bytes, bytearray)):
            interpreter = Interpreter(model_content=bytes(path_or_bytes), num_threads=threads)
        else:
            path = Path(path_or_bytes)
            if not path.is_file():
                raise FxpassError(f"{path}: no such .tflite file")
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
        interpreter.allocate_tensors()
    except FxpassError:
        raise
    except Exception as exc:  # noqa: BLE001 - the interpreter raises ValueError/RuntimeError for bad files
        raise FxpassError(f"{path_or_bytes if not isinstance(path_or_bytes, (bytes, bytearray)) else 'model'}: "
                          f"LiteRT cannot load it: {first_line(exc)}") from None
    return interpreter


def _feed(interpreter, inputs) -> None:
    """Set the inputs: by name (a mapping; the signature's names) or in the graph's input order."""
    details = interpreter.get_input_details()
    if isinstance(inputs, Mapping):
        by_name = interpreter.get_signature_runner().get_input_details()
        unknown = sorted(set(inputs) - set(by_name))
        if unknown or len(inputs) != len(by_name):
            raise FxpassError(f"LiteRT model inputs are {', '.join(sorted(by_name))}; given {', '.join(sorted(inputs))}")
        pairs = [(by_name[name], value) for name, value in inputs.items()]
    else:
        if len(inputs) != len(details):
            raise FxpassError(f"LiteRT model takes {len(details)} inputs; given {len(inputs)}")
        pairs = list(zip(details, inputs))
    for detail, value in pairs:
        value = value.detach().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        interpreter.set_tensor(detail["index"], np.ascontiguousarray(value, dtype=detail["dtype"]))


def run_tflite(path, inputs: Mapping[str, Any] | Sequence[Any], *, threads: int | None = None) -> list[np.ndarray]:
    """Run a .tflite file (a path or its bytes) in LiteRT's interpreter; inputs by name or in the graph's
    input order, as tensors or arrays; the outputs, in the graph's output order, as NumPy arrays."""
    interpreter = _interpreter(path, threads=threads)
    _feed(interpreter, inputs)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]).copy() for d in interpreter.get_output_details()]


def latency_ms(path, inputs: Mapping[str, Any], *, repeats: int = 5, threads: int | None = None) -> float:
    """The median wall time of one interpreter call (ms; after one warm-up call)."""
    interpreter = _interpreter(path, threads=threads)
    _feed(interpreter, inputs)
    interpreter.invoke()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def ort_latency_ms(onnx_model, inputs: Mapping[str, Any], *, repeats: int = 5, threads: int | None = None) -> float:
    """The same median for an ONNX model (a ``ModelProto`` or a path) on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    model = onnx_model if isinstance(onnx_model, (str, Path)) else onnx_model.SerializeToString()
    session = ort.InferenceSession(str(model) if isinstance(model, Path) else model, options,
                                   providers=["CPUExecutionProvider"])
    feeds = {k: (v.detach().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in inputs.items()}
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
