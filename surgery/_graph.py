"""Small helpers shared by the surgery passes: constant values, dtypes, rewiring.

Nothing here matches patterns; each pass owns its own pattern.  Everything works on object
identity in the ``onnx_graphsurgeon`` graph, never on generated tensor names.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

DEFAULT_DOMAINS = ("", "ai.onnx")


def opset_of(graph: gs.Graph) -> int:
    """The default-domain opset the graph declares (0 if it declares none)."""
    if graph.opset is not None:
        return int(graph.opset)
    for entry in graph.import_domains or ():
        if entry.domain in DEFAULT_DOMAINS:
            return int(entry.version)
    return 0


def is_default_domain(node: gs.Node) -> bool:
    return (node.domain or "") in DEFAULT_DOMAINS


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant tensor: an initializer or the output of a ``Constant`` node."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1:
        producer = tensor.inputs[0]
        if producer.op == "Constant" and is_default_domain(producer) and "value" in producer.attrs:
            value = producer.attrs["value"]
            if isinstance(value, gs.Constant):
                return np.asarray(value.values)
    return None


def channel_vector(value: np.ndarray, rank: int, channels: int | None):
    """``value`` as a per-channel [C] vector if it broadcasts along axis 1 only, else None."""
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + tuple(value.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    if channels is None:
        return value.reshape(-1) if shape[1] != 1 else None
    if shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(shape[1]), (channels,))


def producer(tensor: gs.Tensor, op: str | None = None) -> gs.Node | None:
    """The node that writes ``tensor`` (optionally only when it has op type ``op``)."""
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1:
        node = tensor.inputs[0]
        if op is None or (node.op == op and is_default_domain(node)):
            return node
    return None


def onnx_dtype(dtype) -> int | None:
    """An ONNX ``TensorProto`` element type for a numpy dtype, ONNX enum or ``None``."""
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        return int(dtype)
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (TypeError, KeyError, ValueError):
        return None


def dtype_of(tensor: gs.Tensor) -> int | None:
    """The ONNX element type of ``tensor`` if it can be known from the graph, else ``None``."""
    if isinstance(tensor, gs.Constant):
        return onnx_dtype(tensor.dtype)
    known = onnx_dtype(tensor.dtype)
    if known not in (None, onnx.TensorProto.UNDEFINED):
        return known
    node = producer(tensor)
    if node is not None and is_default_domain(node):
        if node.op == "Cast":
            return int(node.attrs["to"])
        if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
            return onnx_dtype(node.attrs["value"].dtype)
    return None


def is_graph_io(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.inputs) or any(t is tensor for t in graph.outputs)


def only_consumer(graph: gs.Graph, tensor: gs.Tensor, node: gs.Node) -> bool:
    """True when ``node`` is the single reader of ``tensor`` and it is not a graph output."""
    if any(t is tensor for t in graph.outputs):
        return False
    return len(tensor.outputs) == 1 and tensor.outputs[0] is node


def replace_uses(graph: gs.Graph, old: gs.Variable, new: gs.Tensor) -> bool:
    """Make every reader of ``old`` read ``new`` instead, keeping graph output names.

    When ``old`` is a graph output, ``new`` takes its place and its name (so the model's output
    names do not change); that is refused (returns False, nothing changed) when ``new`` is a
    constant, a graph input or already a graph output.
    """
    if old is new:
        return False
    out_positions = [i for i, t in enumerate(graph.outputs) if t is old]
    if out_positions:
        if isinstance(new, gs.Constant) or is_graph_io(graph, new) or not new.inputs:
            return False
    for consumer in list(old.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[i] = new
    if out_positions:
        name = old.name
        old.name = f"{name}__replaced"
        new.name = name
        if new.dtype is None:
            new.dtype = old.dtype
        if new.shape is None:
            new.shape = old.shape
        for i in out_positions:
            graph.outputs[i] = new
    return True


# ops whose first output has the type and shape of their first input; onnx 1.23's shape inference
# leaves GroupNormalization-21's output untyped (and everything after it), which would make the
# converter skip the Casts it needs there
SAME_AS_INPUT = {
    "GroupNormalization", "InstanceNormalization", "LayerNormalization", "RMSNormalization",
    "MeanVarianceNormalization", "LpNormalization", "Softmax", "LogSoftmax", "Sigmoid", "Relu", "Identity",
}


def typed_graph(graph: gs.Graph) -> tuple[gs.Graph, onnx.ModelProto]:
    """The graph with dtypes/shapes on every tensor onnx shape inference (plus the gaps above) can type."""
    model = gs.export_onnx(graph)
    for _ in range(8):
        try:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # noqa: BLE001 - convert with what the graph already knows
            pass
        graph = gs.import_onnx(model)
        changed = False
        for node in graph.nodes:
            if node.op in SAME_AS_INPUT and node.inputs and node.outputs:
                src, dst = node.inputs[0], node.outputs[0]
                if dst.dtype is None and src.dtype is not None:
                    dst.dtype, dst.shape = src.dtype, src.shape
                    changed = True
        if not changed:
            break
        model = gs.export_onnx(graph)
    return graph, model


def has_untyped_gaps(graph: gs.Graph) -> bool:
    """True when some op in ``SAME_AS_INPUT`` has a typed input and an untyped output."""
    return any(node.op in SAME_AS_INPUT and node.inputs and node.outputs
               and node.outputs[0].dtype is None and node.inputs[0].dtype is not None
               for node in graph.nodes)


class Names:
    """Hands out tensor / node names not yet used in the graph (for the nodes a pass adds)."""

    def __init__(self, graph: gs.Graph):
        self.used = set(graph.tensors()) | {n.name for n in graph.nodes if n.name}

    def __call__(self, base: str) -> str:
        base = base or "surgery"
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name
