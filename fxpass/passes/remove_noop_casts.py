"""remove_noop_casts: drop dtype casts to the dtype the tensor already has."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from ._util import UNKNOWN, finish, record, require_graph_module, static_values

_METHOD_DTYPES = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                  "bfloat16": torch.bfloat16, "int": torch.int32, "long": torch.int64}


def _target_dtype(node: Node, values):
    """The dtype a cast node converts to, or None if it is not a pure dtype cast."""
    if node.op != "call_method" or not node.args:
        return None
    if node.target in _METHOD_DTYPES and len(node.args) == 1 and not node.kwargs:
        return _METHOD_DTYPES[node.target]
    if node.target in ("type", "to") and len(node.args) == 2 and not node.kwargs:
        arg = node.args[1]
        value = values.get(arg, UNKNOWN) if isinstance(arg, Node) else arg
        return value if isinstance(value, torch.dtype) else None
    if node.target == "to" and len(node.args) == 1 and set(node.kwargs) == {"dtype"}:
        arg = node.kwargs["dtype"]
        value = values.get(arg, UNKNOWN) if isinstance(arg, Node) else arg
        return value if isinstance(value, torch.dtype) else None
    return None


def remove_noop_casts(gm: GraphModule, example_inputs=None) -> PassResult:
    """Replace ``x.float()``, ``x.type(d)``, ``x.to(d)`` by ``x`` where ``x`` already has dtype ``d``.

    Precondition: example inputs are known (dtypes come from fake propagation).  A float32 model
    built with ``use_fp16`` code paths (GroupNorm32's ``x.float()`` / ``.type(x.dtype)``, the
    ``x.type(self.dtype)`` at the top) loses all of them; genuine casts stay.

    Before::   h ─ float() ─ group_norm ─ type(h.dtype)       After::   h ─ group_norm
    """
    gm = require_graph_module(gm, "remove_noop_casts")
    values = static_values(gm, example_inputs)
    count = 0
    for node in list(gm.graph.nodes):
        dtype = _target_dtype(node, values)
        if dtype is None:
            continue
        source = node.args[0]
        src_value = values.get(source, UNKNOWN) if isinstance(source, Node) else UNKNOWN
        if isinstance(src_value, torch.Tensor) and src_value.dtype == dtype:
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            count += 1
    record(gm, "remove_noop_casts", count)
    return finish(gm, count)
