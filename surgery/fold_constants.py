"""fold_constants: evaluate every node whose inputs are all constant and store the result.

Precondition: a graph ONNX Runtime can evaluate (the folding runs the constant part of the graph in
ONNX Runtime through onnx-graphsurgeon's ``Graph.fold_constants``).  ``Shape`` of a tensor whose
shape the graph records as fully static counts as constant, so run ONNX shape inference before
importing the graph when shape folding matters (``surgery.simplify`` does).

    before:  W ─▶ Transpose ─▶ Conv ◀─ x          Constant ─▶ Mul ◀─ y
    after:   Wᵀ ─────────────▶ Conv ◀─ x          (initializer) ─▶ Mul ◀─ y

The count is the number of nodes the folding removed (``Constant`` nodes lowered to initializers
count too).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


def fold_constants(graph: gs.Graph, *, size_threshold: int | None = None) -> tuple[gs.Graph, int]:
    """Fold constant subgraphs; ``size_threshold`` (bytes) keeps larger results computed at run time."""
    graph.cleanup().toposort()
    before = len(graph.nodes)
    graph.fold_constants(
        fold_shapes=True,
        partitioning="basic",
        error_ok=True,
        size_threshold=size_threshold,
    )
    graph.cleanup().toposort()
    return graph, before - len(graph.nodes)
