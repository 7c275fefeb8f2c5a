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
from ._rules import Skip, apply_rule, candidates, record_skips

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


def _match(node: gs.Node):
    """(cast, the tensor that can replace its output) for a no-op cast, or a ``Skip``."""
    if not node.inputs or not node.outputs:
        return Skip("no input or output")
    target = _cast_target(node)
    source = node.inputs[0]
    source_type = dtype_of(source)
    if target is None or source_type is None:
        return Skip("source or target type unknown")
    if source_type == target:
        return node, source
    first = producer(source)
    if first is None or not is_default_domain(first) or first.op not in ("Cast", "CastLike"):
        return Skip("a real conversion (not a round trip)")
    origin = first.inputs[0]
    if dtype_of(origin) != target:
        return Skip("a real conversion (not a round trip)")
    if not holds_exactly(source_type, target):
        return Skip("a lossy round trip")
    return node, origin


CASTS = ("Cast", "CastLike")
KEEPS_OUTPUT = "writes a graph output its source cannot take over"


def _bypass(graph: gs.Graph, matched) -> Skip | None:
    node, replacement = matched
    if not replace_uses(graph, node.outputs[0], replacement):
        return Skip(KEEPS_OUTPUT)
    node.inputs.clear()
    node.outputs.clear()
    return None


def remove_cast_pairs(graph: gs.Graph) -> tuple[gs.Graph, int]:
    """Bypass no-op casts and lossless cast round trips; the count is the number of casts bypassed."""
    count = 0
    while True:  # bypassing one cast can make a round trip of the casts around it
        sweep = apply_rule(graph, CASTS, _match, lambda m: _bypass(graph, m), record=False)
        count += sweep.count
        if not sweep.count:
            break
    graph.cleanup().toposort()
    # why the casts that stay stay (the last sweep also saw casts the cleanup has removed since); the
    # last sweep rewrote nothing, so a cast that still matches is one whose output could not move
    kept: dict[str, int] = {}
    for node in candidates(graph, CASTS):
        found = _match(node)
        reason = found.reason if isinstance(found, Skip) else KEEPS_OUTPUT
        kept[reason] = kept.get(reason, 0) + 1
    record_skips(kept)
    return graph, count
