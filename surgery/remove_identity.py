"""remove_identity: drop ``Identity`` nodes and inference-mode ``Dropout`` nodes.

Precondition: none.  A ``Dropout`` is removed only when it cannot be in training mode (no
``training_mode`` input, or a constant false one) and its ``mask`` output is unused.  When the node
writes a graph output, the tensor feeding it takes the output's name; when that is impossible (it
is a graph input or another output) the node stays.

    before:  a ─▶ Identity ─▶ b ─▶ Conv          a ─▶ Dropout(ratio=.1) ─▶ b ─▶ Conv
    after:   a ─────────────────▶ Conv           a ─────────────────────────▶ Conv
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ._graph import const_value, is_default_domain, replace_uses


def _dropout_is_noop(graph: gs.Graph, node: gs.Node) -> bool:
    if node.attrs.get("is_test", 1) == 0:  # opset < 7 training flag
        return False
    if len(node.inputs) >= 3 and not node.inputs[2].is_empty():
        mode = const_value(node.inputs[2])
        if mode is None or bool(np.any(mode)):
            return False
    if len(node.outputs) >= 2:
        mask = node.outputs[1]
        if mask.outputs or any(t is mask for t in graph.outputs):
            return False
    return True


def remove_identity(graph: gs.Graph) -> tuple[gs.Graph, int]:
    """Bypass Identity / inference Dropout nodes; the count is the number of nodes removed."""
    count = 0
    for node in list(graph.nodes):
        if not is_default_domain(node) or node.op not in ("Identity", "Dropout"):
            continue
        if not node.inputs or not node.outputs or node.inputs[0].is_empty():
            continue
        if node.op == "Dropout" and not _dropout_is_noop(graph, node):
            continue
        source, result = node.inputs[0], node.outputs[0]
        if replace_uses(graph, result, source):
            node.inputs.clear()
            node.outputs.clear()
            count += 1
    graph.cleanup().toposort()
    return graph, count
