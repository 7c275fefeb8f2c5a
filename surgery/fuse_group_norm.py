"""fuse_group_norm: the InstanceNormalization-based GroupNorm pattern → ``GroupNormalization``.

torch.onnx (dynamo, opset < 21) and the TorchScript exporter write ``nn.GroupNorm(G, C)`` as

    x[N,C,*] ─▶ Reshape([0,G,-1]) ─▶ InstanceNormalization(scale=s[G], bias=b[G], ε)
             ─▶ Reshape(shape of x) ─▶ Mul(γ[C,1,..]) ─▶ Add(β[C,1,..]) ─▶ y

which this pass replaces by one opset-21 ``GroupNormalization(x, scale[C], bias[C], num_groups=G,
epsilon=ε)``; per-group ``s``/``b`` other than 1/0 are folded into the per-channel scale and bias
(scale = s[g(c)]·γ[c], bias = b[g(c)]·γ[c] + β[c]).  ``Mul``/``Add`` are optional (affine=False).
The second Reshape may take its shape from ``Shape(x)`` or from a constant equal to x's shape.

Precondition: the graph's default-domain opset is at least 21 (``GroupNormalization``-18 has
per-group scale/bias and is deprecated); below that, the graph is left unchanged (count 0).

Casts around the pattern (a float16 model computing GroupNorm in float32, ``GroupNorm32``) are
kept by default: the fused node then runs in float32 between them.  With ``absorb_casts=True`` a
``Cast(to=float32) ─▶ pattern ─▶ Cast(back)`` is fused into one ``GroupNormalization`` on the
narrow type with ``stash_type=1`` (float32 statistics; the scale/bias step then runs in the
narrow type, as the ONNX spec defines).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ._graph import Names, channel_vector, const_value, dtype_of, is_default_domain, only_consumer, producer
from ._rules import Skip, apply_rule

MIN_OPSET = 21


def _split_affine(node: gs.Node, x: gs.Tensor):
    """The constant operand of binary ``node`` whose other operand is ``x``, else None."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    va, vb = const_value(a), const_value(b)
    if vb is not None and a is x:
        return vb
    if va is not None and b is x:
        return va
    return None


def _reshape_target(node: gs.Node):
    """(constant target shape, allowzero) of a Reshape, or None when the target is not constant."""
    if len(node.inputs) != 2:
        return None
    shape = const_value(node.inputs[1])
    if shape is None or shape.ndim != 1:
        return None
    return [int(v) for v in shape], int(node.attrs.get("allowzero", 0))


def _static(d) -> bool:
    return isinstance(d, (int, np.integer)) and d >= 0


def _groups_of(target, allowzero, x: gs.Tensor) -> int | None:
    """G when Reshape(x, target) is x viewed as [N, G, rest], else None."""
    if len(target) != 3 or target[1] <= 0:
        return None
    n, g, rest = target
    shape = x.shape
    if rest == -1 and ((n == 0 and not allowzero) or (shape and _static(shape[0]) and n == shape[0])):
        if shape and len(shape) > 1 and _static(shape[1]) and shape[1] % g:
            return None
        return g
    if shape and all(_static(d) for d in shape) and len(shape) >= 2:
        total = int(np.prod(shape))
        dims = [shape[0] if (t == 0 and not allowzero) else t for t in target]
        if dims.count(-1) == 1:
            known = int(np.prod([d for d in dims if d != -1]))
            if known == 0 or total % known:
                return None
            dims[dims.index(-1)] = total // known
        if dims == [shape[0], g, total // (shape[0] * g)] and shape[1] % g == 0:
            return g
    return None


def _restores_shape_of(reshape: gs.Node, x: gs.Tensor) -> bool:
    """True when Reshape ``reshape`` (reading a [N, G, rest] tensor) gives back exactly x's shape."""
    shape_node = producer(reshape.inputs[1], "Shape")
    if shape_node is not None:
        return shape_node.inputs[0] is x and int(shape_node.attrs.get("start", 0)) == 0 and "end" not in shape_node.attrs
    parsed = _reshape_target(reshape)
    if parsed is None or x.shape is None:
        return False
    target, allowzero = parsed
    if len(target) != len(x.shape) or target.count(-1) > 1:
        return False
    for i, (t, d) in enumerate(zip(target, x.shape)):
        if not ((_static(d) and t == d) or (i == 0 and t == 0 and not allowzero) or t == -1):
            return False
    return True


def _match(graph: gs.Graph, inorm: gs.Node):
    """The pieces of a GroupNorm pattern around InstanceNormalization ``inorm``, or a ``Skip``."""
    if len(inorm.inputs) != 3 or len(inorm.outputs) != 1:
        return Skip("not a 3-input, 1-output InstanceNormalization")
    reshape_in = producer(inorm.inputs[0], "Reshape")
    if reshape_in is None:
        return Skip("input is not a Reshape (a plain InstanceNorm)")
    if not only_consumer(graph, inorm.inputs[0], inorm):
        return Skip("grouped view has other readers")
    x = reshape_in.inputs[0]
    parsed = _reshape_target(reshape_in)
    if parsed is None:
        return Skip("grouping Reshape's target is not a constant")
    groups = _groups_of(*parsed, x)
    if groups is None:
        return Skip("grouping Reshape is not an [N, G, -1] view of x")
    s, b = const_value(inorm.inputs[1]), const_value(inorm.inputs[2])
    if s is None or b is None or s.size != groups or b.size != groups:
        return Skip("InstanceNorm scale/bias are not constant per-group vectors")

    y = inorm.outputs[0]
    if len(y.outputs) != 1 or not only_consumer(graph, y, y.outputs[0]):
        return Skip("normalized view has other readers")
    reshape_out = y.outputs[0]
    if reshape_out.op != "Reshape" or not is_default_domain(reshape_out) or len(reshape_out.inputs) != 2:
        return Skip("no Reshape back after the InstanceNorm")
    if not _restores_shape_of(reshape_out, x):
        return Skip("Reshape back does not restore x's shape")
    if x.shape is not None:
        rank = len(x.shape)
    else:
        back = _reshape_target(reshape_out)
        rank = len(back[0]) if back is not None else None
    if rank is None or rank < 3:
        return Skip("rank of x unknown or below 3")
    channels = int(x.shape[1]) if x.shape is not None and _static(x.shape[1]) else None

    # optional Mul(γ) then Add(β)
    nodes = [reshape_in, inorm, reshape_out]
    out = reshape_out.outputs[0]
    gamma = beta = None
    for op in ("Mul", "Add"):
        if len(out.outputs) != 1 or any(t is out for t in graph.outputs):
            break
        nxt = out.outputs[0]
        if nxt.op != op or not is_default_domain(nxt):
            break
        value = _split_affine(nxt, out)
        if value is None:
            break
        vector = channel_vector(value, rank, channels)
        if vector is None:
            break
        channels = channels or vector.size
        if op == "Mul":
            gamma = vector
        else:
            beta = vector
        nodes.append(nxt)
        out = nxt.outputs[0]
    if channels is None:
        return Skip("channel count unknown")
    if channels % groups:
        return Skip("channels not divisible by the groups")
    if (gamma is not None and gamma.size != channels) or (beta is not None and beta.size != channels):
        return Skip("affine size differs from the channel count")
    return {
        "x": x, "out": out, "nodes": nodes, "groups": groups, "channels": channels,
        "epsilon": float(inorm.attrs.get("epsilon", 1e-5)), "s": s, "b": b, "gamma": gamma, "beta": beta,
    }


def _between_casts(graph: gs.Graph, m: dict):
    """(narrow input, closing Cast, narrow type) when the pattern sits in Cast(to f32) … Cast(back)."""
    x, out = m["x"], m["out"]
    opening = producer(x, "Cast")
    if opening is None or int(opening.attrs["to"]) != onnx.TensorProto.FLOAT:
        return None
    narrow = dtype_of(opening.inputs[0])
    if narrow not in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        return None
    reshape_in, reshape_out = m["nodes"][0], m["nodes"][2]
    shape_node = producer(reshape_out.inputs[1], "Shape")
    allowed = {id(reshape_in)} | ({id(shape_node)} if shape_node is not None else set())
    if any(id(n) not in allowed for n in x.outputs) or any(t is x for t in graph.outputs):
        return None
    if len(out.outputs) != 1 or any(t is out for t in graph.outputs):
        return None
    closing = out.outputs[0]
    if closing.op != "Cast" or not is_default_domain(closing) or int(closing.attrs["to"]) != narrow:
        return None
    return opening.inputs[0], closing, narrow


def _rewrite(graph: gs.Graph, m: dict, names: Names, absorb_casts: bool) -> None:
    x_type = dtype_of(m["x"])
    np_type = onnx.helper.tensor_dtype_to_np_dtype(x_type) if x_type is not None else m["s"].dtype
    G, C = m["groups"], m["channels"]
    per_group = C // G
    s = np.repeat(m["s"].reshape(-1).astype(np.float64), per_group)
    b = np.repeat(m["b"].reshape(-1).astype(np.float64), per_group)
    gamma = np.ones(C) if m["gamma"] is None else m["gamma"].astype(np.float64)
    beta = np.zeros(C) if m["beta"] is None else m["beta"].astype(np.float64)
    scale, bias = s * gamma, b * gamma + beta

    x, out = m["x"], m["out"]
    casts = _between_casts(graph, m) if absorb_casts else None
    if casts is not None:
        x, closing, narrow = casts
        np_type = onnx.helper.tensor_dtype_to_np_dtype(narrow)
        out = closing.outputs[0]
        closing.outputs.clear()
    else:
        m["nodes"][-1].outputs.clear()
    base = m["nodes"][1].name or "group_norm"
    scale_c = gs.Constant(names(f"{base}_scale"), np.ascontiguousarray(scale.astype(np_type)))
    bias_c = gs.Constant(names(f"{base}_bias"), np.ascontiguousarray(bias.astype(np_type)))
    graph.nodes.append(
        gs.Node(
            "GroupNormalization",
            names(f"{base}/GroupNormalization"),
            {"epsilon": m["epsilon"], "num_groups": G, "stash_type": 1},
            [x, scale_c, bias_c],
            [out],
        )
    )


def fuse_group_norm(graph: gs.Graph, *, absorb_casts: bool = False) -> tuple[gs.Graph, int]:
    """Fuse GroupNorm patterns when the opset is ≥ 21; the count is the number of fusions."""
    names = Names(graph)
    result = apply_rule(graph, "InstanceNormalization", lambda node: _match(graph, node),
                        lambda m: _rewrite(graph, m, names, absorb_casts), min_opset=MIN_OPSET)
    graph.cleanup().toposort()
    return graph, result.count
