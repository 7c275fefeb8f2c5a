"""convert_precision: float32 → float16 with float32 islands where the numerics need them.

Runs onnxconverter-common's ``convert_float_to_float16`` with ``keep_io_types=True`` (graph inputs
and outputs stay float32, e.g. ``x`` and ``out``) and these nodes blocked, i.e. kept in float32
with Casts around them:

* the ops in ``FLOAT32_OPS``: normalizations (GroupNormalization, InstanceNormalization,
  LayerNormalization, ...), ReduceMean and the other mean/variance reductions, Pow (x² overflows
  float16 above 256), Softmax / LogSoftmax — plus onnxconverter-common's own default block list
  (Resize, Range, TopK, ...);
* the *conditioning cone*: every node computed only from constants and graph inputs of rank ≤ 1
  (the timestep input ``timesteps[N]`` or ``t_index[N]``): the sinusoidal embedding, the time MLP,
  and a ``Gather`` of a row from a float timestep table with what follows it (Unsqueeze, Split,
  Add ...), and the first nodes outside the cone that read its outputs;
* a pre-existing ``Cast(to=float32)`` whose readers are all blocked (the GroupNorm32 island);
  other ``Cast(to=float32)`` nodes are retargeted to float16.

    before:  x:f32 ─▶ Conv ─▶ GroupNormalization ─▶ Mul ◀─ Gather(table:f32, t_index) ─▶ out:f32
    after:   x:f32 ─▶ Cast16 ─▶ Conv(f16) ─▶ Cast32 ─▶ GroupNormalization ─▶ Mul(f32) ◀─ Gather(f32)
                         ─▶ Cast16 ─▶ … ─▶ Cast32 ─▶ out:f32

The count is the number of nodes that run in float16 afterwards (0 when the graph has nothing
left to convert, so a second run is a no-op).  Node names are made unique first (the block list
works by name); the pattern search itself is structural.

Around onnxconverter-common 1.16 this stage works around, and then checks for, what it gets wrong:
tensors after a ``GroupNormalization``-21 are typed by hand first (onnx 1.23's shape inference
leaves them untyped and the converter then skips their Casts); a float constant read both inside
and outside an island is split in two; float32 → float16 → float32 Cast pairs the converter
leaves between two islands are removed (they would round island inputs to float16; pairs already
in the model are kept); a float32 graph output written by an island is restored to float32; the
result is checked for nodes mixing float16 and float32 inputs (RuntimeError naming the node).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ._graph import Names, const_value, dtype_of, is_default_domain, is_graph_io, producer, replace_uses, typed_graph

T = onnx.TensorProto

FLOAT32_OPS = (
    "GroupNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "RMSNormalization",
    "MeanVarianceNormalization",
    "LpNormalization",
    "ReduceMean",
    "ReduceSumSquare",
    "ReduceL2",
    "Pow",
    "Softmax",
    "LogSoftmax",
)
# float16 weights: magnitudes are clamped into [smallest subnormal, largest finite]
FLOAT16_TINY = 2.0**-24
FLOAT16_MAX = 65504.0


def _default_block_list() -> list[str]:
    from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST

    return list(DEFAULT_OP_BLOCK_LIST)


def _name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique, non-empty name (the converter's node block list is by name)."""
    names = Names(gs.Graph())
    for node in graph.nodes:
        node.name = names(node.name or node.op)


def _conditioning_cone(graph: gs.Graph) -> set[int]:
    """ids of nodes computed only from constants and graph inputs of rank ≤ 1 (not all constant)."""
    small_inputs = {id(t) for t in graph.inputs if t.shape is not None and len(t.shape) <= 1}
    in_cone: set[int] = set()  # tensor ids
    nodes: set[int] = set()
    for node in graph.nodes:  # toposorted
        live = False
        ok = True
        for t in node.inputs:
            if t.is_empty() or isinstance(t, gs.Constant) or const_value(t) is not None:
                continue
            if id(t) in small_inputs or id(t) in in_cone:
                live = True
                continue
            ok = False
            break
        if ok and live:
            nodes.add(id(node))
            in_cone.update(id(t) for t in node.outputs)
    return nodes


def float32_islands(graph: gs.Graph, op_block_list=FLOAT32_OPS) -> dict[str, str]:
    """Nodes to keep in float32: ``{node name: reason}`` (names must be unique, see convert_precision)."""
    graph.toposort()
    islands: dict[str, str] = {}
    for node in graph.nodes:
        if node.op in op_block_list:
            islands[node.name] = f"op {node.op}"
    cone = _conditioning_cone(graph)
    for node in graph.nodes:
        if id(node) in cone:
            islands.setdefault(node.name, "conditioning cone")
    for node in graph.nodes:
        if id(node) in cone:
            for out in node.outputs:
                for reader in out.outputs:
                    if id(reader) not in cone:
                        islands.setdefault(reader.name, "reads the conditioning cone")
    for node in graph.nodes:
        if node.op == "Cast" and is_default_domain(node) and int(node.attrs["to"]) == T.FLOAT:
            readers = [r for o in node.outputs for r in o.outputs]
            if readers and all(r.name in islands for r in readers) and not any(is_graph_io(graph, o) for o in node.outputs):
                islands.setdefault(node.name, "Cast into a float32 island")
    return islands


def _float_io(node: gs.Node, float_type=T.FLOAT) -> bool:
    return any(dtype_of(t) == float_type for t in list(node.inputs) + list(node.outputs) if not t.is_empty())


# ops whose float inputs must all have one type (the converter's output is checked against this)
_ONE_TYPE_OPS = {
    "Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Gemm", "Conv", "ConvTranspose", "Concat", "Sum", "Max", "Min",
    "Where", "GroupNormalization", "InstanceNormalization", "LayerNormalization", "BatchNormalization",
}


def _check_types(graph: gs.Graph) -> None:
    for node in graph.nodes:
        if node.op not in _ONE_TYPE_OPS:
            continue
        inputs = node.inputs[1:] if node.op == "Where" else node.inputs
        types = {dtype_of(t) for t in inputs if not t.is_empty()} & {T.FLOAT, T.FLOAT16}
        if len(types) > 1:
            raise RuntimeError(
                f"convert_precision: node {node.name!r} ({node.op}) mixes float32 and float16 inputs after "
                "onnxconverter-common's conversion; add it (or its producers) to node_block_list"
            )


def _unshare_constants(graph: gs.Graph, blocked: set[str]) -> None:
    """Float constants read by blocked and unblocked nodes get one copy per side."""
    names = Names(graph)
    for tensor in list(graph.tensors().values()):
        if not isinstance(tensor, gs.Constant) or tensor.dtype != np.float32:
            continue
        readers = list(tensor.outputs)
        inside = [r for r in readers if r.name in blocked]
        if not inside or len(inside) == len(readers):
            continue
        copy = gs.Constant(names(f"{tensor.name}_f32"), np.array(tensor.values, copy=True))
        for reader in inside:
            for i, t in enumerate(reader.inputs):
                if t is tensor:
                    reader.inputs[i] = copy


def _drop_conversion_round_trips(graph: gs.Graph, original: set[str]) -> None:
    """Bypass float32 → float16 → float32 Cast pairs that the conversion itself inserted.

    onnxconverter-common drops such a pair only when the first Cast has a single reader; between
    two float32 islands with several readers the pair stays and would round the value to float16.
    Pairs present in the original model (a deliberate ``x.half().float()``) are not touched.
    """
    for node in list(graph.nodes):
        if node.op != "Cast" or node.name in original or int(node.attrs["to"]) != T.FLOAT or not node.inputs:
            continue
        first = producer(node.inputs[0], "Cast")
        if first is None or first.name in original or int(first.attrs["to"]) != T.FLOAT16:
            continue
        if dtype_of(first.inputs[0]) == T.FLOAT and replace_uses(graph, node.outputs[0], first.inputs[0]):
            node.inputs.clear()
            node.outputs.clear()


def _restore_float_outputs(graph: gs.Graph, float_outputs: list[str]) -> None:
    """Graph outputs written by a float32 island come back float16 from the converter: undo that."""
    names = Names(graph)
    for i, out in enumerate(list(graph.outputs)):
        if out.name not in float_outputs or dtype_of(out) != T.FLOAT16:
            continue
        cast = producer(out, "Cast")
        if cast is not None and dtype_of(cast.inputs[0]) == T.FLOAT and replace_uses(graph, out, cast.inputs[0]):
            continue
        name = out.name
        out.name = names(f"{name}_fp16")
        fixed = gs.Variable(name, dtype=np.float32, shape=out.shape)
        graph.nodes.append(gs.Node("Cast", names(f"{name}_to_float32"), {"to": T.FLOAT}, [out], [fixed]))
        graph.outputs[i] = fixed


def convert_precision(
    graph: gs.Graph,
    *,
    op_block_list=FLOAT32_OPS,
    node_block_list=(),
    keep_io_types: bool = True,
) -> tuple[gs.Graph, int]:
    """Convert a float32 graph to float16 outside the float32 islands.

    Returns a new graph (the conversion works on the ONNX proto) and the number of nodes running
    in float16.  ``op_block_list`` / ``node_block_list`` extend the islands.
    """
    graph.cleanup().toposort()
    _name_nodes(graph)
    graph, _ = typed_graph(graph)
    islands = float32_islands(graph, op_block_list)
    blocked = set(islands) | set(node_block_list)
    all_ops = set(op_block_list) | set(_default_block_list())
    blocked |= {n.name for n in graph.nodes if n.op in all_ops}

    todo = [n for n in graph.nodes if n.name not in blocked and n.op != "Cast" and _float_io(n)]
    if not todo:
        graph.cleanup().toposort()
        return graph, 0
    for node in graph.nodes:
        if node.op == "Cast" and node.name not in blocked and int(node.attrs["to"]) == T.FLOAT:
            node.attrs["to"] = T.FLOAT16
    _unshare_constants(graph, blocked)

    from onnxconverter_common.float16 import convert_float_to_float16

    original = {n.name for n in graph.nodes}
    float_outputs = [t.name for t in graph.outputs if dtype_of(t) == T.FLOAT] if keep_io_types else []
    model = gs.export_onnx(graph)
    with warnings.catch_warnings():
        # one warning per weight smaller than float16's smallest subnormal: expected, not news
        warnings.filterwarnings("ignore", message=r"the float32 number .* will be truncated", category=UserWarning)
        converted = convert_float_to_float16(
            model,
            min_positive_val=FLOAT16_TINY,
            max_finite_val=FLOAT16_MAX,
            keep_io_types=keep_io_types,
            op_block_list=sorted(all_ops),
            node_block_list=sorted(blocked),
            check_fp16_ready=False,
        )
    result = gs.import_onnx(converted)
    _drop_conversion_round_trips(result, original)
    _restore_float_outputs(result, float_outputs)
    result.cleanup().toposort()
    result, _ = typed_graph(result)
    _check_types(result)
    count = sum(1 for n in result.nodes if n.op != "Cast" and _float_io(n, T.FLOAT16))
    result.cleanup().toposort()
    return result, count
