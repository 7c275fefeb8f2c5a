"""strip_asserts: remove asserts and guards whose facts hold at the specialised shapes."""

from __future__ import annotations

import torch
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from ..errors import FxpassError
from ._util import UNKNOWN, finish, is_assert, record, require_graph_module, static_values


def strip_asserts(gm: GraphModule, example_inputs=None) -> PassResult:
    """Remove ``torch._assert`` nodes (asserts and capture's guards) that hold at the captured shapes.

    Precondition: example inputs are known (recorded by ``capture`` or given).  Each condition is
    evaluated with fake tensors of those shapes: true → the node goes, with the shape arithmetic
    only it used; false → an error (never a silent removal); data-dependent → the node stays.

    Before::                                        After::

        s = qkv.shape; w = s[1]                         qkv ─ reshape ─ ...
        _assert(w % 12 == 0, "assert ...")
        qkv ─ reshape ─ ...
    """
    gm = require_graph_module(gm, "strip_asserts")
    asserts = [n for n in gm.graph.nodes if is_assert(n)]
    if not asserts:
        record(gm, "strip_asserts", 0)
        return PassResult(gm, False)
    values = static_values(gm, example_inputs)
    removed = 0
    for node in asserts:
        condition = node.args[0]
        value = values.get(condition, UNKNOWN) if isinstance(condition, torch.fx.Node) else condition
        if value is UNKNOWN or isinstance(value, torch.Tensor):
            continue  # depends on data: keep it
        if not bool(value):
            message = node.args[1] if len(node.args) > 1 else node.format_node()
            raise FxpassError(f"strip_asserts: false at the captured shapes: {message}")
        gm.graph.erase_node(node)
        removed += 1
    record(gm, "strip_asserts", removed)
    return finish(gm, removed)
