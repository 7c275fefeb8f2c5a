"""``fxpass lower --deep-cache LEVEL``: the lowered table-mode graph as a full graph and a shallow graph.

The cut is a surgery pass (:func:`surgery.cut_deep_cache.cut_deep_cache`, found by structure at the
LEVEL-th skip connection from the output).  Before anything is written, :func:`check_cut` runs the
exact identity shallow(x, t, cache of full(x, t)) = full(x, t) through Polygraphy on seeded inputs at
the gate's t_index values (first, middle, last and seeded others), bound ``CUT_TOLERANCE``·max|ref|;
then :func:`graph_cost` counts both graphs' multiply-adds and :func:`latency` times each on ONNX
Runtime (CPU, one thread, median of a few calls: context for the report, never a decision).

The shallow graph is written as ``NAME.shallow.onnx`` beside ``NAME.onnx``; the full graph's
``fxpass.deep_cache`` metadata records the level, the feature and the shallow file's SHA-256, so a
sampler never pairs a full graph with another lowering's shallow graph.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import metadata
from .errors import FxpassError

#: the identity's bound, as a fraction of max|full graph's out| (it is exact up to ORT's fusions)
CUT_TOLERANCE = 1e-5
SHALLOW_SUFFIX = ".shallow.onnx"


def shallow_path(path: str | Path) -> Path:
    """``NAME.shallow.onnx`` beside ``NAME.onnx`` (``NAME.EXT.shallow.onnx`` for another extension)."""
    path = Path(path)
    stem = path.name[:-len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(stem + SHALLOW_SUFFIX)


def _shape_of(value_info) -> list[int] | None:
    dims = value_info.type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]  # a symbolic batch counts 1
    return shape if dims else None


def graph_cost(model: onnx.ModelProto) -> dict[str, Any]:
    """Multiply-adds x 2 of the Conv, MatMul and Gemm nodes (the U-Net's arithmetic; the
    element-wise ops are left out), from ONNX's shape inference, batch 1."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    shapes = {vi.name: _shape_of(vi) for vi in [*g.value_info, *g.input, *g.output]}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    flops = 0
    for node in g.node:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        if node.op_type == "Conv" and shapes.get(node.input[1]):  # out elements x (C_in / groups x kH x kW)
            flops += 2 * int(np.prod(out)) * int(np.prod(shapes[node.input[1]][1:]))
        elif node.op_type in ("MatMul", "Gemm") and shapes.get(node.input[0]):
            k = shapes[node.input[0]][-1] if node.op_type == "MatMul" or not _attr(node, "transA") \
                else shapes[node.input[0]][-2]
            flops += 2 * int(np.prod(out)) * int(k)
    return {"gflop": flops / 1e9, "counted": "Conv, MatMul, Gemm multiply-adds x 2, batch 1"}


def _attr(node, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)


def latency(full: onnx.ModelProto, shallow: onnx.ModelProto, feeds: dict, *, repeats: int = 5) -> dict[str, float]:
    """Median seconds per call of each graph on ONNX Runtime (CPU, one thread), interleaved."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.log_severity_level = 3
    sessions = {name: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for name, m in (("full", full), ("shallow", shallow))}
    out, cache = sessions["full"].run(["out", "cache"], feeds)
    shallow_feeds = {**feeds, "cache": cache}
    times: dict[str, list[float]] = {"full": [], "shallow": []}
    for _ in range(repeats):
        for name, f in (("full", feeds), ("shallow", shallow_feeds)):
            start = time.perf_counter()
            sessions[name].run(["out"], f)
            times[name].append(time.perf_counter() - start)
    return {f"{name}_s": float(np.median(v)) for name, v in times.items()}


def check_cut(full: onnx.ModelProto, shallow: onnx.ModelProto, *, seed: int = 1234,
              tolerance: float = CUT_TOLERANCE) -> dict[str, Any]:
    """The identity shallow(x, t, cache(x, t)) = full(x, t) on seeded inputs at the gate's t_index values,
    through Polygraphy (full graph on ONNX Runtime as the reference)."""
    from targets.compare import compare, run_runners
    from targets.deep_cache import CachedPairRunner
    from targets.ort import ort_runner

    from .inputs import gate_t_indices, input_specs, seeded_feeds

    meta = metadata.parse(metadata.read_props(full), "full graph", require=("table",))
    feeds = seeded_feeds(input_specs(full), seed=seed, timesteps=meta.timesteps, model_timesteps=meta.model_timesteps,
                         t_indices=gate_t_indices(meta.steps, seed))
    reference = ort_runner(full, cuda=False, name="onnxrt-cpu-full")
    pair = CachedPairRunner(full, shallow)
    results = run_runners([reference, pair], feeds.feeds)
    result = compare(results, reference=reference.name, atol_scale=tolerance, meta=feeds.labels)[0]
    return {"passed": result.passed, "max_abs": result.max_abs, "max_rel_to_scale": result.max_rel_to_scale,
            "tolerance": {"atol_scale": tolerance, "rtol": 0.0}, "nonfinite": result.nonfinite,
            "t_indices": [int(np.asarray(f["t_index"]).reshape(-1)[0]) for f in feeds.feeds],
            "feeds": feeds.feeds[0]}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cut(proto: onnx.ModelProto, level: int, *, force: bool = False) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    """The full and shallow graphs of ``proto`` cut at skip connection ``level``, checked, with their
    ``fxpass.deep_cache`` metadata, and the report's entry.  FxpassError where the cut is refused or the
    identity fails (unless ``force``)."""
    from surgery.cut_deep_cache import CutRefused, cut_deep_cache

    try:
        result = cut_deep_cache(proto, level=level)
    except CutRefused as exc:
        raise FxpassError(f"--deep-cache {level}: {exc}") from None
    full, shallow = result.full, result.shallow
    entry = {"level": level, "feature": result.feature}
    metadata.write_props(shallow, {metadata.DEEP_CACHE: metadata._json({**entry, "role": "shallow"})})
    data = shallow.SerializeToString()
    metadata.write_props(full, {metadata.DEEP_CACHE: metadata._json({**entry, "role": "full",
                                                                     "shallow_sha256": sha256(data)})})
    check = check_cut(full, shallow)
    feeds = check.pop("feeds")
    if not check["passed"] and not force:
        why = f"non-finite values ({check['nonfinite']})" if check["nonfinite"] else \
            f"differs from the full graph by {check['max_rel_to_scale']:.3g}·max|ref|"
        raise FxpassError(f"--deep-cache {level}: the shallow graph with the cached feature {why} (tolerance "
                          f"{CUT_TOLERANCE:g}); the cut is wrong, nothing written", exit_code=1)
    cost = {"full": graph_cost(full)["gflop"], "shallow": graph_cost(shallow)["gflop"]}
    report = {**entry, "skip_connections": result.levels, "nodes": {"full": result.full_nodes,
                                                                    "shallow": result.shallow_nodes},
              "gflop": cost, "gflop_ratio": cost["shallow"] / cost["full"] if cost["full"] else None,
              "latency": latency(full, shallow, feeds), "check": check}
    report["latency_ratio"] = report["latency"]["shallow_s"] / report["latency"]["full_s"]
    return full, shallow, report
