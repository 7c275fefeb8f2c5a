"""remove_cast_pairs: drop casts that cannot change a value.

Two shapes of no-op are removed:

* a cast to the type the tensor already has (``Cast(to=float)`` of a float tensor, or ``CastLike``
  to a tensor of the same type);
* a round trip ``A ─▶ Cast(to=B) ─▶ Cast(to=A)`` where every value of ``A`` is exactly
  representable in ``B`` (float32 → float64 → float32, float16 → float32 → float16,
  int32 → int64 → int32, bool → anything → bool, small ints through wide enough floats).

A lossy round trip such as float32 → float16 → float32 is a real rounding step and is kept.
Precondition: the source type must be known (value info, a producing ``Cast`` or a constant);
casts on tensors of unknown type are left alone.

    before:  x:f32 ─▶ Cast(to=f64) ─▶ Cast(to=f32) ─▶ Conv        x:f32 ─▶ Cast(to=f32) ─▶ Conv
    after:   x:f32 ─────────────────────────────────▶ Conv        x:f32 ─────────────────▶ Conv
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ._graph import dtype_of, is_default_domain, producer, replace_uses

T = onnx.TensorProto

# (significand bits incl. the implicit one, largest exponent, smallest normal exponent)
_FLOATS = {
    T.FLOAT16: (11, 15, -14),
    T.BFLOAT16: (8, 127, -126),
    T.FLOAT: (24, 127, -126),
    T.DOUBLE: (53, 1023, -1022),
}
# (bits, signed)
_INTS = {
    T.INT8: (8, True), T.INT16: (16, True), T.INT32: (32, True), T.INT64: (64, True),
    T.UINT8: (8, False), T.UINT16: (16, False), T.UINT32: (32, False), T.UINT64: (64, False),
}


def holds_exactly(wide: int, narrow: int) -> bool:
    """True when every value of type ``narrow`` survives a cast to ``wide`` and back unchanged."""
    if wide == narrow:
        return True
    if narrow == T.BOOL:
        return wide in _FLOATS or wide in _INTS
    if narrow in _FLOATS and wide in _FLOATS:
        n_bits, n_max, n_min = _FLOATS[narrow]
        w_bits, w_max, w_min = _FLOATS[wide]
        # subnormals of the narrow type must be representable too: their last bit sits at
        # n_min - (n_bits - 1), which the wide type reaches (as a normal or subnormal number)
        return w_bits >= n_bits and w_max >= n_max and w_min - (w_bits - 1) <= n_min - (n_bits - 1)
    if narrow in _INTS and wide in _INTS:
        n_bits, n_signed = _INTS[narrow]
        w_bits, w_signed = _INTS[wide]
        if n_signed and not w_signed:
            return False
        return w_bits >= n_bits + (1 if w_signed and not n_signed else 0)
    if narrow in _INTS and wide in _FLOATS:
        n_bits, n_signed = _INTS[narrow]
        magnitude_bits = n_bits - 1 if n_signed else n_bits
        return _FLOATS[wide][0] >= magnitude_bits
    return False


def _cast_target(node: gs.Node) -> int | None:
    if node.op == "Cast":
        return int(node.attrs["to"])
    if node.op == "CastLike" and len(node.inputs) == 2:
        return dtype_of(node.inputs[1])
    return None


def remove_cast_pairs(graph: gs.Graph) -> tuple[gs.Graph, int]:
    """Bypass no-op casts and lossless cast round trips; the count is the number of casts bypassed."""
    count = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if not is_default_domain(node) or node.op not in ("Cast", "CastLike"):
                continue
            if not node.inputs or not node.outputs:
                continue  # already bypassed in this sweep
            target = _cast_target(node)
            source = node.inputs[0]
            source_type = dtype_of(source)
            if target is None or source_type is None:
                continue
            replacement = None
            if source_type == target:
                replacement = source
            else:
                first = producer(source)
                if first is not None and is_default_domain(first) and first.op in ("Cast", "CastLike"):
                    origin = first.inputs[0]
                    origin_type = dtype_of(origin)
                    if origin_type == target and holds_exactly(source_type, origin_type):
                        replacement = origin
            if replacement is not None and replace_uses(graph, node.outputs[0], replacement):
                node.inputs.clear()
                node.outputs.clear()
                count += 1
                changed = True
    graph.cleanup().toposort()
    return graph, count
