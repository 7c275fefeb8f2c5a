"""remove_identities: drop nodes that return their input in eval mode (Identity, Dropout)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from ._util import finish, record, require_graph_module

_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout, F.alpha_dropout)


def _passthrough(gm: GraphModule, node: Node):
    """The node this node merely forwards, or None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Identity) and node.args:
            return node.args[0]
        if isinstance(module, _IDENTITY_MODULES) and not module.training and node.args:
            return node.args[0]
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else (node.target is not torch.dropout))
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        if training is False or p == 0:
            return node.args[0]
    if node.op == "call_method" and node.target == "contiguous" and len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    return None


def remove_identities(gm: GraphModule) -> PassResult:
    """Replace Identity modules, eval-mode Dropout (modules and ``F.dropout(training=False)``) and
    ``.contiguous()`` by their input.

    Precondition: the graph is used for inference (Dropout modules in eval mode).

    Before::   h ─ Dropout(p=0.1, eval) ─ conv        After::   h ─ conv
    """
    gm = require_graph_module(gm, "remove_identities")
    count = 0
    for node in list(gm.graph.nodes):
        source = _passthrough(gm, node)
        if isinstance(source, Node):
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            count += 1
    record(gm, "remove_identities", count)
    return finish(gm, count)
