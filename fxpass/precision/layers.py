"""The layers int8 can quantize (Conv and MatMul nodes of a lowered ONNX graph), with a role and a size.

Roles and sizes only group layers for the sensitivity search and label the plan for people; which
layers stay in float is decided by measurement (:mod:`fxpass.precision.plan`), never by role alone.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import onnx

QUANTIZED_OPS = ("Conv", "MatMul")


@dataclass(frozen=True)
class Layer:
    name: str
    op: str
    role: str  # input conv, output conv, conv, 1x1 conv, strided conv, attention 1x1 conv, attention matmul, linear
    size: int  # spatial size (height, or length of a 1-D conv's sequence) of the output; 0 when unknown

    @property
    def group(self) -> str:
        return f"{self.role} @{self.size}" if self.size else self.role


def _shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # shapes only label groups; a graph shape inference cannot handle is still quantized
        inferred = proto
    out = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in dims]
    return out


def _near_outputs(proto: onnx.ModelProto) -> set[str]:
    """Names of the quantizable nodes whose output reaches a graph output through no other quantizable node."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    seen, found, stack = set(), set(), [o.name for o in proto.graph.output]
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in QUANTIZED_OPS:
            found.add(node.name)
        else:
            stack.extend(node.input)
    return found


def layers_of(proto: onnx.ModelProto) -> list[Layer]:
    """Every Conv and MatMul of ``proto``, in graph order."""
    inits = {i.name: i for i in proto.graph.initializer}
    graph_inputs = {i.name for i in proto.graph.input} - set(inits)
    shapes = _shapes(proto)
    last = _near_outputs(proto)
    layers = []
    for node in proto.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        out_shape = shapes.get(node.output[0], [])
        size = out_shape[2] if len(out_shape) >= 3 else 0
        layers.append(Layer(node.name, node.op_type, _role(node, inits, graph_inputs, last), size))
    return layers


def _role(node, inits, graph_inputs, last) -> str:
    if node.op_type == "MatMul":
        return "linear" if any(i in inits for i in node.input) else "attention matmul"
    if node.input[0] in graph_inputs:
        return "input conv"
    if node.name in last:
        return "output conv"
    weight = inits.get(node.input[1]) if len(node.input) > 1 else None
    kernel = list(weight.dims[2:]) if weight is not None else []
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if len(kernel) == 1:
        return "attention 1x1 conv" if kernel == [1] else "conv"
    if any(s > 1 for s in attrs.get("strides", [])):
        return "strided conv"
    return "1x1 conv" if kernel and all(k == 1 for k in kernel) else "conv"


def groups_of(layers: list[Layer]) -> list[list[str]]:
    """Layer names grouped by role and size, groups in order of their first layer."""
    groups: dict[str, list[str]] = defaultdict(list)
    for layer in layers:
        groups[layer.group].append(layer.name)
    return list(groups.values())


def fingerprint(layers: list[Layer]) -> str:
    """Identifies the quantizable layers of a graph: a plan applies only to the graph it was made for."""
    text = "\n".join(f"{layer.name}:{layer.op}" for layer in layers)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
