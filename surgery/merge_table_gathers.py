"""merge_table_gathers: many ``Gather``s of constant tables by one index → one ``Gather`` + ``Split``.

fxpass's table mode reads every timestep-dependent vector (each ResBlock's scale and shift, or the
GroupNorm scale/bias rows that ``fold_norm_scale_shift`` makes) with its own ``Gather`` by
``t_index``: 88 nodes on the CAMUS U-Net.  Tables with the same row count, trailing shape and dtype
can be laid side by side; one row fetch then reads them all and a ``Split`` hands out the pieces:

    before:  Gather(A[T,Ca,*R], t) ─▶ a     Gather(B[T,Cb,*R], t) ─▶ b     Gather(C[T,Cc,*R], t) ─▶ c
    after:   Gather([A|B|C][T,Ca+Cb+Cc,*R], t) ─▶ Split(axis=rank(t), [Ca,Cb,Cc]) ─▶ a, b, c

The outputs keep their tensors (names, shapes, readers); only their producer changes.  Groups of
fewer than ``min_group`` (3) gathers are left alone: two gathers would become two nodes anyway.

Precondition: opset ≥ 13 (``Split`` takes its sizes as an input); ``Gather`` on axis 0 of a
constant table of rank ≥ 2; the index tensor's rank is known.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from ._graph import Names, const_value
from ._rules import Skip, apply_rule, record_skips

MIN_OPSET = 13


def _match(node: gs.Node):
    """(node, table, group key) for a gather of a constant table by a variable index, or a ``Skip``."""
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return Skip("not a 2-input, 1-output Gather")
    if int(node.attrs.get("axis", 0)) != 0:
        return Skip("Gather axis is not 0")
    table, index = const_value(node.inputs[0]), node.inputs[1]
    if table is None or table.ndim < 2:
        return Skip("data is not a constant table of rank >= 2")
    if isinstance(index, gs.Constant):
        return Skip("index is a constant")
    if index.shape is None:
        return Skip("index rank unknown")
    return node, table, (id(index), table.dtype.str, table.shape[0], table.shape[2:])


def merge_table_gathers(graph: gs.Graph, *, min_group: int = 3) -> tuple[gs.Graph, int]:
    """Merge gathers of constant tables that share an index; the count is the number of gathers removed."""
    groups: dict[tuple, list[tuple[gs.Node, np.ndarray]]] = defaultdict(list)

    def collect(matched) -> None:
        node, table, key = matched
        groups[key].append((node, table))

    # the rule's "rewrite" only sorts the gathers into groups: its count is not the pass's count
    apply_rule(graph, "Gather", _match, collect, min_opset=MIN_OPSET)
    names = Names(graph)
    count = 0
    smallest = max(min_group, 2)
    small: dict[str, int] = defaultdict(int)
    for members in groups.values():
        if len(members) < smallest:
            small[f"below min_group ({len(members)} < {smallest} gathers share index, dtype and row shape)"] += len(members)
            continue
        index = members[0][0].inputs[1]
        tables = [table for _, table in members]
        merged = gs.Constant(names("merged_table"), np.ascontiguousarray(np.concatenate(tables, axis=1)))
        axis = len(index.shape)
        rest = list(tables[0].shape[2:])
        row = gs.Variable(names("merged_table_row"), dtype=tables[0].dtype,
                          shape=list(index.shape) + [int(merged.values.shape[1])] + rest)
        sizes = gs.Constant(names("merged_table_sizes"), np.array([t.shape[1] for t in tables], dtype=np.int64))
        outputs = []
        for node, _ in members:
            out = node.outputs[0]
            node.outputs.clear()
            outputs.append(out)
        graph.nodes.append(gs.Node("Gather", names("merged_table/Gather"), {"axis": 0}, [merged, index], [row]))
        graph.nodes.append(gs.Node("Split", names("merged_table/Split"), {"axis": axis}, [row, sizes], outputs))
        count += len(members) - 1
    record_skips(small)
    graph.cleanup().toposort()
    return graph, count
