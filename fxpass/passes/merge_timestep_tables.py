"""merge_timestep_tables: the timestep tables ``fold_timesteps`` made, gathered by one ``index_select``.

Table mode leaves one gather per folded cone output (88 on CAMUS): a converter that keeps each as its own
op (LiteRT's GATHER_ND) reads ``t_index`` 88 times.  This pass concatenates every table gathered by the
same index along its flattened row, gathers the merged table once and gives each former gather its slice,
reshaped to its row's shape (the batch stays free: ``-1``).  The ONNX route does the same on the exported
graph (``surgery.merge_table_gathers``); this is the fx twin, for routes that convert the fx graph
(``--format tflite``).

Before::                                          After::

    t_index ─ index_select(table_0) ─▶ a             t_index ─ index_select(merged) ─┬─ narrow ─ reshape ─▶ a
    t_index ─ index_select(table_1) ─▶ b                                             └─ narrow ─ reshape ─▶ b
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from ._util import finish, record, require_graph_module

MERGED = "_fxpass_ttable_merged"


def _table_gathers(gm: GraphModule) -> dict[tuple, list[tuple[Node, torch.Tensor]]]:
    """``index_select(get_attr table, 0, placeholder)`` nodes by (index node, dtype, rows): the gathers
    fold_timesteps makes, each with its table."""
    groups: dict[tuple, list[tuple[Node, torch.Tensor]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.index_select or len(node.args) != 3:
            continue
        table, dim, index = node.args
        if dim != 0 or not isinstance(table, Node) or table.op != "get_attr" or not isinstance(index, Node) \
                or index.op != "placeholder":
            continue
        value = getattr(gm, table.target, None)
        if not isinstance(value, torch.Tensor) or value.dim() < 1:
            continue
        groups.setdefault((index, value.dtype, value.shape[0]), []).append((node, value))
    return groups


def merge_timestep_tables(gm: GraphModule) -> PassResult:
    """Merge the tables gathered by the same index (and of the same dtype and row count) into one
    buffer gathered once; each former gather reads its slice.  Bit for bit the same values (a slice of
    a concatenation is the original rows).  Idempotent: one gather per group is left as it is."""
    gm = require_graph_module(gm, "merge_timestep_tables")
    merged = 0
    for k, ((index, _, _), members) in enumerate(_table_gathers(gm).items()):
        if len(members) < 2:
            continue
        name = MERGED if not hasattr(gm, MERGED) else f"{MERGED}_{k}"
        flat = [value.reshape(value.shape[0], -1) for _, value in members]
        gm.register_buffer(name, torch.cat(flat, dim=1).contiguous())
        first = members[0][0]
        with gm.graph.inserting_before(first):
            rows = gm.graph.call_function(torch.index_select, (gm.graph.get_attr(name), 0, index))
        offset = 0
        for (node, value), part in zip(members, flat):
            with gm.graph.inserting_before(node):
                piece = gm.graph.call_function(torch.narrow, (rows, 1, offset, part.shape[1]))
                shaped = gm.graph.call_method("reshape", (piece, (-1, *value.shape[1:])))
            offset += part.shape[1]
            node.replace_all_uses_with(shaped)
            table = node.args[0]
            gm.graph.erase_node(node)
            if not table.users:
                gm.graph.erase_node(table)
                if not any(n.op == "get_attr" and n.target == table.target for n in gm.graph.nodes):
                    delattr(gm, table.target)
        merged += len(members)
    record(gm, "merge_timestep_tables", merged)
    return finish(gm, merged)
