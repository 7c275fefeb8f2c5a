"""Whether a reduced-precision file is the verified float32 graph: structure before numbers (issue #26).

A numeric bound wide enough for int8's rounding (a fifth of max|ref|) also passes models that are wrong:
a zeroed timestep scale/shift, an attention block dropped.  So before any number, a reduced-precision
file is compared with the float32 graph that the same model lowers to (:func:`compare`):

- the file is seen as float32 (:func:`float_view`): every ``DequantizeLinear`` of a constant becomes the
  float constant it dequantizes to, every ``QuantizeLinear -> DequantizeLinear`` pair on an activation is
  bypassed, every ``Cast`` between float types is bypassed and every float16 constant is read as float32.
  The float32 graph gets the same float-cast bypass, so a cast the model itself makes does not count;
- the two graphs must then have the same nodes wired the same way: every tensor gets a structural
  signature (the op type, its attributes, the signatures of its inputs; a graph input by position, a
  constant by shape), and the multisets of node signatures and the graph outputs' signatures must be equal;
- nodes with equal signatures are paired in graph order, and each pair's constant inputs must hold the
  float32 graph's values: exactly where the file kept them in float32, within half a quantization step
  (the scale per element, plus float32 rounding) for int8 weights and biases, within float16's rounding
  for float16 constants.

So a reduced-precision file of a wrong checkpoint, of another architecture, or with a node added,
dropped or rewired fails here, whatever its numbers, and the numeric check only has to cover rounding.
Hand-written: onnx-graphsurgeon gives the graph, but no library compares two graphs modulo quantization.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import onnx

#: Cast targets that only change float precision (bypassed in both graphs)
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE)
#: what each reduced precision adds to the float32 graph (for the lines that report a match)
ADDED = {"int8": "quantize/dequantize pairs", "fp16": "casts", "bf16": "label"}
#: float16's relative rounding (half an ulp at 1) and its smallest subnormal
_FP16_REL, _FP16_TINY = 2.0 ** -11, 2.0 ** -24


class _Const:
    """A constant of the float view: its value and how far from the float32 value it may be."""

    def __init__(self, value: np.ndarray, slack: np.ndarray | float = 0.0):
        self.value, self.slack = value, slack


def _dequantized(node) -> _Const | None:
    import onnx_graphsurgeon as gs

    q, scale = node.inputs[0], node.inputs[1]
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    if not (isinstance(q, gs.Constant) and isinstance(scale, gs.Constant)) or (
            zero is not None and not isinstance(zero, gs.Constant)):
        return None
    values = np.asarray(q.values)
    s = np.asarray(scale.values, dtype=np.float32)
    z = np.zeros_like(s) if zero is None else np.asarray(zero.values).astype(np.float32)
    if s.ndim == 1 and values.ndim > 1:  # per-axis
        axis = int(node.attrs.get("axis", 1)) % values.ndim
        shape = [1] * values.ndim
        shape[axis] = s.shape[0]
        s, z = s.reshape(shape), z.reshape(shape)
    real = ((values.astype(np.float32) - z) * s).astype(np.float32)
    return _Const(real, np.broadcast_to(s * np.float32(0.5), real.shape) + np.abs(real) * 2.0 ** -23)


def _bypass(graph, node, src=None) -> None:
    """Consumers of ``node``'s output (graph outputs too) read ``src`` instead (default: its first input)."""
    src = node.inputs[0] if src is None else src
    out = node.outputs[0]
    for consumer in list(out.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is out:
                consumer.inputs[i] = src
    if out in graph.outputs:
        src.dtype, src.shape = src.dtype or out.dtype, src.shape or out.shape
        graph.outputs = [src if t is out else t for t in graph.outputs]
    node.outputs.clear()


def float_view(proto: onnx.ModelProto):
    """(the onnx-graphsurgeon graph of ``proto`` seen as float32, {constant name: slack}); see the module
    docstring for what is bypassed."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(proto)
    slack: dict[str, np.ndarray | float] = {}
    for node in list(graph.nodes):
        if node.op == "DequantizeLinear":
            const = _dequantized(node)
            if const is not None:
                replacement = gs.Constant(node.outputs[0].name + "_float", const.value)
                slack[replacement.name] = const.slack
                _bypass(graph, node, replacement)
            elif node.inputs[0].inputs and node.inputs[0].inputs[0].op == "QuantizeLinear":
                _bypass(graph, node, node.inputs[0].inputs[0].inputs[0])
        elif node.op == "Cast" and node.attrs.get("to") in _FLOAT_TYPES:
            _bypass(graph, node)
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and np.asarray(tensor.values).dtype == np.float16:
            value = np.asarray(tensor.values).astype(np.float32)
            tensor.values = value
            slack[tensor.name] = np.abs(value) * _FP16_REL + _FP16_TINY
    graph.cleanup(remove_unused_graph_inputs=False)
    graph.toposort()
    return graph, slack


def _attr(value) -> str:
    import onnx_graphsurgeon as gs

    if isinstance(value, gs.Tensor):
        return f"tensor{tuple(getattr(value, 'shape', None) or ())}"
    if isinstance(value, np.ndarray):
        return f"array{value.shape}"
    return repr(value)


def _signatures(graph) -> tuple[dict[int, str], dict[int, str]]:
    """(tensor id -> signature, node id -> signature) over the graph in topological order."""
    import onnx_graphsurgeon as gs

    sig: dict[int, str] = {}
    for i, tensor in enumerate(graph.inputs):
        sig[id(tensor)] = f"input{i}"
    node_sig: dict[int, str] = {}
    for node in graph.nodes:
        parts = [node.op, node.domain or "", repr(sorted((k, _attr(v)) for k, v in node.attrs.items()))]
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant):
                parts.append(f"const{tuple(np.asarray(tensor.values).shape)}")
            elif tensor is None or not tensor.name:
                parts.append("none")
            else:
                parts.append(sig.get(id(tensor), f"unknown:{tensor.name}"))
        digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
        node_sig[id(node)] = digest
        for k, tensor in enumerate(node.outputs):
            sig[id(tensor)] = f"{digest}:{k}"
    return sig, node_sig


def _pairs(reference, candidate, ref_sig, cand_sig) -> tuple[list, str | None]:
    by_sig: dict[str, list] = defaultdict(list)
    for node in candidate.nodes:
        by_sig[cand_sig[id(node)]].append(node)
    pairs, taken = [], defaultdict(int)
    for node in reference.nodes:
        s = ref_sig[id(node)]
        if taken[s] >= len(by_sig.get(s, ())):
            return pairs, f"node {node.name or node.op} ({node.op}) of the float32 graph has no counterpart"
        pairs.append((node, by_sig[s][taken[s]]))
        taken[s] += 1
    extra = sum(len(v) for v in by_sig.values()) - len(pairs)
    if extra:
        first = next(n for n in candidate.nodes if taken[cand_sig[id(n)]] < len(by_sig[cand_sig[id(n)]]))
        return pairs, f"{extra} node(s) more than the float32 graph, the first {first.name or first.op} ({first.op})"
    return pairs, None


def _constants_problem(pairs, slack: dict) -> str | None:
    import onnx_graphsurgeon as gs

    for ref, cand in pairs:
        for k, (a, b) in enumerate(zip(ref.inputs, cand.inputs)):
            if not isinstance(a, gs.Constant):
                continue
            want, got = np.asarray(a.values), np.asarray(b.values)
            if want.dtype.kind == "f":
                allowed = slack.get(b.name, 0.0)
                off = np.abs(got.astype(np.float64) - want.astype(np.float64)) - allowed
                if (~np.isfinite(got)).any() or (off > 0).any():
                    worst = float(np.nanmax(np.abs(got.astype(np.float64) - want.astype(np.float64))))
                    return (f"{cand.name or cand.op} ({cand.op}) input {k}: its values are not the float32 graph's "
                            f"(off by up to {worst:.3g}, more than its precision's rounding)")
            elif want.dtype != got.dtype or not np.array_equal(want, got):
                return f"{cand.name or cand.op} ({cand.op}) input {k}: its constant differs from the float32 graph's"
    return None


def compare(candidate: onnx.ModelProto, reference: onnx.ModelProto) -> str | None:
    """None where ``candidate`` (a reduced-precision file) is ``reference`` (the float32 graph the same
    model lowers to) plus quantization and casts with its constants within their rounding; else one line
    saying where it is not."""
    cand, slack = float_view(candidate)
    ref, _ = float_view(reference)
    ref_sig, ref_nodes = _signatures(ref)
    cand_sig, cand_nodes = _signatures(cand)
    if len(ref.inputs) != len(cand.inputs):
        return f"{len(cand.inputs)} graph inputs, the float32 graph has {len(ref.inputs)}"
    pairs, problem = _pairs(ref, cand, ref_nodes, cand_nodes)
    if problem:
        return problem
    outs = [ref_sig.get(id(t)) for t in ref.outputs], [cand_sig.get(id(t)) for t in cand.outputs]
    if outs[0] != outs[1]:
        return "its outputs are not computed as the float32 graph's are"
    return _constants_problem(pairs, slack)

