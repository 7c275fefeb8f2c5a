"""fold_norm_scale_shift: a per-channel ``Mul``/``Add`` after ``GroupNormalization`` → its scale/bias.

guided-diffusion's scale-shift norm computes ``norm(h) * (1 + scale) + shift``; after fxpass has
folded the timestep embedding into tables that is

    x ─▶ GroupNormalization(γ, β) ─▶ Mul ◀─ Gather(M[T,C,1,1], t) ─▶ Add ◀─ Gather(A[T,C,1,1], t) ─▶ y

Two full passes over the activation that ``GroupNormalization``'s own scale/bias can do, since
``(n·γ + β)·m + a = n·(γ·m) + (β·m + a)``:

    x ─▶ GroupNormalization(Gather(S[T,C], t₀), Gather(B[T,C], t₀)) ─▶ y      (t₀ = Squeeze(t))

with ``S = γ·M`` and ``B = β·M + A`` computed once, in float64, when the pass runs.  Constant
per-channel operands fold the same way into constant scale/bias (any batch size).  Gathered
operands need one row per graph run: the pass applies them only when the activation's batch
dimension is statically 1 and the index is a one-element tensor (``t_index`` of a batch-1 model);
``GroupNormalization``'s scale is per channel, not per sample.

Precondition: opset ≥ 21; ``GroupNormalization`` with constant scale and bias; each folded ``Mul``/``Add`` is
the only reader of its input.  Either the ``Mul`` or the ``Add`` may be missing; an operand
gathered with another index tensor than an earlier one ends the fold there.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ._graph import Names, channel_vector, const_value, is_default_domain, only_consumer, producer
from ._rules import Skip, apply_rule

MIN_OPSET = 21  # GroupNormalization-18 has per-group scale and bias


def _other_operand(node: gs.Node, x: gs.Tensor) -> gs.Tensor | None:
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is x and b is not x:
        return b
    if b is x and a is not x:
        return a
    return None


def _per_channel(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    vector = channel_vector(value, rank, channels)
    return None if vector is None else vector.astype(np.float64)


def _operand(tensor: gs.Tensor, rank: int, channels: int):
    """(rows [R, C] in float64, index tensor or None) for a Mul/Add operand, else None.

    A constant per-channel operand is one row (index None); ``Gather(table, index)`` with a
    one-element index is the table's rows, each per channel.
    """
    value = const_value(tensor)
    if value is not None:
        vector = _per_channel(value, rank, channels)
        return None if vector is None else (vector[None], None)
    gather = producer(tensor, "Gather")
    if gather is None or int(gather.attrs.get("axis", 0)) != 0 or len(gather.inputs) != 2:
        return None
    table, index = const_value(gather.inputs[0]), gather.inputs[1]
    if table is None or table.ndim < 2 or index.shape is None or list(index.shape) != [1]:
        return None
    # a [1]-index gather gives [1, *table.shape[1:]]: per channel when that broadcasts along axis 1
    rows = []
    for row in table:
        vector = _per_channel(row[None], rank, channels)
        if vector is None:
            return None
        rows.append(vector)
    return np.stack(rows), index


def _batch_is_one(x: gs.Tensor) -> bool:
    return x.shape is not None and len(x.shape) >= 1 and isinstance(x.shape[0], (int, np.integer)) and x.shape[0] == 1


def _match(graph: gs.Graph, norm: gs.Node):
    """(norm, γ, β, Mul/Add nodes folded, their output, [(op, rows [R, C])], index or None), or a ``Skip``.

    The reason of a ``Skip`` is why the first ``Mul`` could not be folded (a fold that stops
    later, e.g. at an ``Add`` gathered by another index, still folds what it has).
    """
    if len(norm.inputs) != 3 or len(norm.outputs) != 1:
        return Skip("not a 3-input, 1-output GroupNormalization")
    gamma, beta = const_value(norm.inputs[1]), const_value(norm.inputs[2])
    if gamma is None or beta is None or gamma.ndim != 1:
        return Skip("scale/bias are not constant [C] vectors (already folded?)")
    x = norm.inputs[0]
    if x.shape is None or len(x.shape) < 3 or not isinstance(x.shape[1], (int, np.integer)):
        return Skip("input rank < 3 or channel count not static")
    rank, channels = len(x.shape), int(x.shape[1])
    out, folded, operands, index = norm.outputs[0], [], [], None
    why = None
    for op in ("Mul", "Add"):
        if len(out.outputs) != 1 or not only_consumer(graph, out, out.outputs[0]):
            why = "output has other readers (or is a graph output)"
            break
        nxt = out.outputs[0]
        if nxt.op != op or not is_default_domain(nxt) or len(nxt.outputs) != 1:
            why = f"not followed by a {op}"
            break
        other = _other_operand(nxt, out)
        parsed = None if other is None else _operand(other, rank, channels)
        if parsed is None:
            why = f"{op} operand is not a per-channel constant or gathered table row"
            break
        rows, gathered_by = parsed
        if gathered_by is not None:
            # one row per run: a batch of one, and one index tensor for all gathered operands
            if not _batch_is_one(x):
                why = "gathered operand needs a static batch of 1"
                break
            if index is not None and gathered_by is not index:
                break
            index = gathered_by
        folded.append(nxt)
        operands.append((op, rows))
        out = nxt.outputs[0]
    if not folded:
        return Skip(why)
    return norm, gamma, beta, folded, out, operands, index


def fold_norm_scale_shift(graph: gs.Graph) -> tuple[gs.Graph, int]:
    """Fold per-channel Mul/Add after GroupNormalization; the count is the number of norms changed."""
    names = Names(graph)
    scalars: dict[int, gs.Variable] = {}  # index tensor id → its Squeeze'd scalar

    def rewrite(matched) -> None:
        norm, gamma, beta, folded, out, operands, index = matched
        dtype = gamma.dtype
        scale = gamma.astype(np.float64)[None]  # [1, C] (one row) or [T, C]
        bias = beta.astype(np.float64)[None]
        for op, rows in operands:
            if op == "Mul":
                scale, bias = scale * rows, bias * rows
            else:
                bias = bias + rows
        base = norm.name or "group_norm"
        if index is None:
            new_scale = gs.Constant(names(f"{base}_scale"), np.ascontiguousarray(scale[0].astype(dtype)))
            new_bias = gs.Constant(names(f"{base}_bias"), np.ascontiguousarray(bias[0].astype(dtype)))
        else:
            rows = max(scale.shape[0], bias.shape[0])
            scale = np.broadcast_to(scale, (rows, scale.shape[1]))
            bias = np.broadcast_to(bias, (rows, bias.shape[1]))
            if id(index) not in scalars:
                scalar = gs.Variable(names(f"{index.name}_scalar"), dtype=index.dtype, shape=[])
                axes = gs.Constant(names(f"{index.name}_axes"), np.array([0], dtype=np.int64))
                graph.nodes.append(gs.Node("Squeeze", names(f"{index.name}/Squeeze"), inputs=[index, axes],
                                           outputs=[scalar]))
                scalars[id(index)] = scalar
            scalar = scalars[id(index)]
            new_scale = gs.Variable(names(f"{base}_scale"), dtype=dtype, shape=[int(scale.shape[1])])
            new_bias = gs.Variable(names(f"{base}_bias"), dtype=dtype, shape=[int(bias.shape[1])])
            for table, result in ((scale, new_scale), (bias, new_bias)):
                const = gs.Constant(names(f"{result.name}_table"), np.ascontiguousarray(table.astype(dtype)))
                graph.nodes.append(gs.Node("Gather", names(f"{result.name}/Gather"), {"axis": 0},
                                           inputs=[const, scalar], outputs=[result]))
        norm.inputs[1], norm.inputs[2] = new_scale, new_bias
        folded[-1].outputs.clear()
        norm.outputs[0] = out

    result = apply_rule(graph, "GroupNormalization", lambda norm: _match(graph, norm), rewrite, min_opset=MIN_OPSET)
    graph.cleanup().toposort()
    return graph, result.count
