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

from ._graph import const_value, replace_uses
from ._rules import Skip, apply_rule


def _dropout_kept(graph: gs.Graph, node: gs.Node) -> Skip | None:
    """None when Dropout ``node`` is a no-op at inference, else why it must stay."""
    if node.attrs.get("is_test", 1) == 0:  # opset < 7 training flag
        return Skip("Dropout is in training mode (is_test=0)")
    if len(node.inputs) >= 3 and not node.inputs[2].is_empty():
        mode = const_value(node.inputs[2])
        if mode is None or bool(np.any(mode)):
            return Skip("Dropout training_mode is not a constant false")
    if len(node.outputs) >= 2:
        mask = node.outputs[1]
        if mask.outputs or any(t is mask for t in graph.outputs):
            return Skip("Dropout mask is used")
    return None


def _match(graph: gs.Graph, node: gs.Node):
    if not node.inputs or not node.outputs or node.inputs[0].is_empty():
        return Skip("no input or output")
    if node.op == "Dropout":
        why = _dropout_kept(graph, node)
        if why is not None:
            return why
    return node


def _bypass(graph: gs.Graph, node: gs.Node) -> Skip | None:
    source, result = node.inputs[0], node.outputs[0]
    if not replace_uses(graph, result, source):
        return Skip("writes a graph output its input cannot take over (a graph input, constant or other output)")
    node.inputs.clear()
    node.outputs.clear()
    return None


def remove_identity(graph: gs.Graph) -> tuple[gs.Graph, int]:
    """Bypass Identity / inference Dropout nodes; the count is the number of nodes removed."""
    result = apply_rule(graph, ("Identity", "Dropout"), lambda node: _match(graph, node), lambda node: _bypass(graph, node))
    graph.cleanup().toposort()
    return graph, result.count
