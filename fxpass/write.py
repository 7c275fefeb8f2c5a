"""The write stage: the verified lowering to its file(s) and the JSON report, as one transaction.

``--format onnx`` writes the ONNX model (a model over 2 GiB with its external data file); the mobile
formats are made from ``Lowered.source``, the torch module the ONNX was exported from, and checked by
their own runtime where this machine has one (:mod:`fxpass.formats`).  Either way the report is written
with the model, both or neither.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path


def write_lowered(lowered, request, output: Path, report_path: Path | None, stages: dict[str, float],
                  shallow_path: Path | None = None) -> None:
    """The file the request's ``output.format`` names (and a --deep-cache shallow graph), and the report."""
    if request.output.format == "onnx":
        _write_onnx(lowered, output, report_path, stages, shallow_path, exclusive=not request.output.force)
    else:
        from .fileio import exclusive_outputs

        with exclusive_outputs(not request.output.force):  # a run racing for the same new path loses
            _write_format(lowered, request, output, report_path, stages)


def _report_text(lowered) -> str:
    return json.dumps(lowered.report, indent=2, sort_keys=True, default=str)


def _write_onnx(lowered, output: Path, report_path: Path | None, stages: dict[str, float],
                shallow_path: Path | None = None, *, exclusive: bool = False) -> None:
    """The ONNX file (and the --deep-cache shallow graph) and the report as one transaction (a model over
    2 GiB is written first, with its external data file, and removed again if the report cannot be
    written)."""
    from surgery.modelio import save_model, serialized

    from .fileio import Transaction

    t0 = time.perf_counter()
    data = serialized(lowered.model)
    lowered.report["output"] = str(output)
    if lowered.shallow is not None and (data is None or shallow_path is None):
        from .errors import FxpassError

        raise FxpassError(f"{output}: --deep-cache writes models under 2 GiB, with the shallow graph beside them")
    with Transaction(exclusive=exclusive) as tx:  # exclusive: a run racing for the same new paths loses
        if lowered.shallow is not None:
            shallow = lowered.shallow.SerializeToString()
            tx.add_bytes(shallow_path, lambda fh: fh.write(shallow))
        if data is not None:
            tx.add_bytes(output, lambda fh: fh.write(data))
            lowered.report["file_bytes"] = len(data)
        stages["write"] = time.perf_counter() - t0
        lowered.report["stages_s"] = dict(stages)
        if report_path is not None:
            if data is None:
                lowered.report["file_bytes"] = None  # written below, with external data
            text = _report_text(lowered)
            tx.add_bytes(report_path, lambda fh: fh.write(text.encode()))
    if data is None:
        save_model(lowered.model, output)
        lowered.report["file_bytes"] = output.stat().st_size


def _write_format(lowered, request, output: Path, report_path: Path | None, stages: dict[str, float]) -> None:
    """A mobile format from the verified lowering, checked by the format's own runtime where this machine
    has one (``fxpass.formats``), then the report."""
    from . import formats
    from .fileio import atomic_write_bytes

    fmt, precision = request.output.format, request.rewrite.precision
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
        elif fmt == "tflite":
            result = _write_tflite(lowered, example, output, precision, rows, request.output.force)
        else:
            result = formats.to_mlpackage(lowered.source, example, output, precision="fp16", rows=rows,
                                          palettize_bits=request.output.palettize_bits,
                                          output_names=STEP_OUTPUTS if lowered.step_graph else ("out",))
    stages["write"] = time.perf_counter() - t0
    lowered.report["output"] = str(output)
    lowered.report["format"] = {"name": fmt, **result}
    lowered.report["file_bytes"] = result.get("bytes")
    lowered.report["stages_s"] = dict(stages)
    if report_path is not None:  # both or neither: a report that cannot be written takes the format file back
        text = _report_text(lowered)
        try:
            atomic_write_bytes(report_path, lambda fh: fh.write(text.encode()))
        except BaseException:
            _discard(output)
            raise


def _write_tflite(lowered, example: dict, output: Path, precision: str, rows: int | None, force: bool) -> dict:
    """The LiteRT file (the fxpass metadata inside, at its own precision), its op types and the interpreter's
    latency beside ONNX Runtime's on the verified ONNX graph (same inputs and thread count, median of 5 after
    a warm-up)."""
    from . import metadata
    from .formats import tflite

    props = {**metadata.read_props(lowered.model), metadata.PRECISION: precision}
    result = tflite.to_tflite(_tables_merged(lowered.source), example, output, precision=precision, rows=rows,
                              metadata=props, overwrite=force)  # an existing output got this far only with --force
    import torch

    threads = result["latency_threads"] = torch.get_num_threads()  # both runtimes on as many threads as torch
    result["latency_ms"] = tflite.latency_ms(output, example, threads=threads)
    result["ort_latency_ms"] = tflite.ort_latency_ms(lowered.model, example, threads=threads)
    result["ort_precision"] = metadata.read_props(lowered.model).get(metadata.PRECISION)
    if result["gather_ops"] > 1:
        result["note"] = (f"the timestep tables are {result['gather_ops']} separate gathers after "
                          "merge_timestep_tables (tables of other dtypes or row counts stay apart)")
    return result


def _tables_merged(source):
    """A copy of the verified fx graph (or the step module around it) with its timestep tables gathered once
    (:func:`fxpass.passes.merge_timestep_tables`): LiteRT keeps every gather as an op of its own."""
    import copy

    from torch.fx import GraphModule

    from .passes.merge_timestep_tables import merge_timestep_tables

    source = copy.deepcopy(source)
    for module in [m for m in source.modules() if isinstance(m, GraphModule)]:
        merge_timestep_tables(module)
    return source


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
