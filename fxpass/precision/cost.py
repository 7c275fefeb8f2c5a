"""Each quantizable layer's cost per call, measured: ONNX Runtime's profiler on the float32 graph.

The plan search (:mod:`fxpass.precision.plan`) keeps some layers in float; which ones decides how
fast the int8 graph runs, so it weighs each layer's measured time, not only its error.  The graph is
run with ONNX Runtime's graph optimizations off, so every node keeps its name (the optimized graph
renames fused and layout-transformed nodes) and its time is the node's own; the times are relative
costs for ranking, not the optimized graph's latency.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

KERNEL_SUFFIX = "_kernel_time"


def layer_costs(model_path: str | Path, feeds: Sequence[dict], names: Sequence[str], *, threads: int | None = 1,
                runs: int = 3) -> dict[str, float]:
    """Seconds per call of each node in ``names`` (mean over ``runs`` calls on ``feeds``, cycled);
    a node the profiler did not report gets 0."""
    import onnxruntime as ort

    wanted = set(names)
    with tempfile.TemporaryDirectory(prefix="fxpass-cost-") as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for i in range(runs + 1):  # the first call allocates: its events are dropped below
            session.run(None, dict(feeds[i % len(feeds)]))
        events = json.loads(Path(session.end_profiling()).read_text())
    seen: dict[str, int] = {}
    totals = dict.fromkeys(names, 0.0)
    for event in events:
        label = str(event.get("name", "")) if event.get("cat") == "Node" else ""
        name = label[:-len(KERNEL_SUFFIX)] if label.endswith(KERNEL_SUFFIX) else None
        if name not in wanted or not isinstance(event.get("dur"), (int, float)) or not np.isfinite(event["dur"]):
            continue
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:  # not the first call's
            totals[name] += float(event["dur"]) * 1e-6 / runs
    return totals
