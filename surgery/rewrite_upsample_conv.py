"""rewrite_upsample_conv: nearest 2× ``Resize`` + 3×3 ``Conv`` → four 2×2 convs + ``DepthToSpace``.

guided-diffusion's ``Upsample`` is ``conv3x3(interpolate(x, scale_factor=2, mode="nearest"))``.
Each output pixel of that conv reads a 3×3 window of the upsampled image, which covers only a 2×2
window of the input: output row 2m+a reads input rows m-1, m (a = 0) or m, m+1 (a = 1), the same
for columns.  So each of the four output phases (a, b) is a 2×2 conv of the *input* with summed
taps, and ``DepthToSpace`` interleaves them:

    before:  x[N,C,H,W] ─▶ Resize(nearest, ×2) ─▶ Conv(W[K,C,3,3], pads 1) ─▶ y[N,K,2H,2W]
    after:   x ─▶ Conv(W₀₀[K,C,2,2], pads t1 l1 b0 r0) ┐
             x ─▶ Conv(W₀₁, pads t1 l0 b0 r1)          ├─▶ Concat(axis 1) ─▶ DepthToSpace(2, DCR) ─▶ y
             x ─▶ Conv(W₁₀, pads t0 l1 b1 r0)          │
             x ─▶ Conv(W₁₁, pads t0 l0 b1 r1)          ┘

16 multiply-adds per input pixel and channel pair instead of 36, and no 4×-sized intermediate.
Measured on this project's 2-core CPU (ONNX Runtime 1.32), 64→64 channels, 128² → 256²:
28.4 ms → 22.3 ms; 128 channels, 64² → 128²: 26.7 → 16.3 ms.  Four more nodes per site.

Precondition: ``Resize`` of a rank-4 tensor, mode ``nearest``, constant scales [1, 1, 2, 2] (or
constant sizes that double a static H and W) with a coordinate mapping that sends output index
2m and 2m+1 to input m (checked per ``coordinate_transformation_mode``/``nearest_mode`` pair);
its output read only by a ``Conv`` with constant 3×3 weights, optional constant bias, group 1,
stride 1, dilation 1, pads [1, 1, 1, 1], ``auto_pad`` NOTSET.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ._graph import Names, const_value, is_default_domain, only_consumer
from ._rules import Skip, apply_rule

# (coordinate_transformation_mode, nearest_mode) pairs under which a 2× nearest Resize maps
# output indices 2m and 2m+1 both to input index m
EXACT_2X_MODES = {
    ("asymmetric", "floor"),
    ("asymmetric", "round_prefer_floor"),
    ("half_pixel", "round_prefer_floor"),
    ("half_pixel", "round_prefer_ceil"),
    ("pytorch_half_pixel", "round_prefer_floor"),
    ("pytorch_half_pixel", "round_prefer_ceil"),
    ("tf_half_pixel_for_nn", "floor"),
}


def _as_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _not_nearest_2x(resize: gs.Node) -> Skip | None:
    """None when ``resize`` is a nearest 2× upsample of H and W this pass can rewrite, else a ``Skip``."""
    attrs = resize.attrs
    if _as_str(attrs.get("mode", "nearest")) != "nearest":
        return Skip("Resize mode is not nearest")
    if len(resize.outputs) != 1:
        return Skip("Resize has more than one output")
    pair = (_as_str(attrs.get("coordinate_transformation_mode", "half_pixel")),
            _as_str(attrs.get("nearest_mode", "round_prefer_floor")))
    if pair not in EXACT_2X_MODES:
        return Skip(f"coordinate mode {pair[0]}/{pair[1]} does not send 2m and 2m+1 to m")
    if attrs.get("axes") is not None:
        return Skip("Resize has an axes attribute")
    x = resize.inputs[0]
    if x.shape is not None and len(x.shape) != 4:
        return Skip("input is not rank 4")
    scales = const_value(resize.inputs[2]) if len(resize.inputs) > 2 and not resize.inputs[2].is_empty() else None
    sizes = const_value(resize.inputs[3]) if len(resize.inputs) > 3 and not resize.inputs[3].is_empty() else None
    if scales is not None and scales.size:
        if scales.shape == (4,) and np.array_equal(scales, [1, 1, 2, 2]):
            return None
        return Skip("scales are not [1, 1, 2, 2]")
    if sizes is not None and sizes.size == 4 and x.shape is not None:
        dims = list(x.shape)
        if all(isinstance(d, (int, np.integer)) for d in dims):
            if [int(v) for v in sizes] == [dims[0], dims[1], 2 * dims[2], 2 * dims[3]]:
                return None
            return Skip("sizes do not double H and W")
    return Skip("scales/sizes not constant (or input shape not static)")


def _conv_weights(conv: gs.Node):
    """(W[K,C,3,3], bias or None) when ``conv`` is the plain 3×3 'same' conv this pass rewrites, else a ``Skip``."""
    if conv.op != "Conv" or not is_default_domain(conv) or len(conv.inputs) not in (2, 3):
        return Skip("upsampled tensor is not read by a Conv")
    attrs = conv.attrs
    if _as_str(attrs.get("auto_pad", "NOTSET")) != "NOTSET" or int(attrs.get("group", 1)) != 1:
        return Skip("Conv has auto_pad or groups")
    if list(attrs.get("strides", [1, 1])) != [1, 1] or list(attrs.get("dilations", [1, 1])) != [1, 1]:
        return Skip("Conv has strides or dilations")
    if list(attrs.get("pads", [0, 0, 0, 0])) != [1, 1, 1, 1]:
        return Skip("Conv pads are not [1, 1, 1, 1]")
    weight = const_value(conv.inputs[1])
    if weight is None or weight.ndim != 4 or weight.shape[2:] != (3, 3):
        return Skip("Conv weights are not a constant 3×3 kernel")
    if list(attrs.get("kernel_shape", [3, 3])) != [3, 3]:
        return Skip("Conv kernel_shape is not 3×3")
    bias = None
    if len(conv.inputs) == 3 and not conv.inputs[2].is_empty():
        bias = const_value(conv.inputs[2])
        if bias is None:
            return Skip("Conv bias is not a constant")
    return weight, bias


def phase_kernels(weight: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """The four [K, C, 2, 2] kernels (keyed by output phase (a, b)) equal to upsample-then-``weight``."""
    wide = weight.astype(np.float64)
    kernels = {}
    for a in (0, 1):
        for b in (0, 1):
            k = np.zeros(weight.shape[:2] + (2, 2))
            for kh in range(3):
                i = (a + kh - 1) // 2 + 1 - a  # input row offset m + d → tap index d + 1 - a
                for kw in range(3):
                    j = (b + kw - 1) // 2 + 1 - b
                    k[:, :, i, j] += wide[:, :, kh, kw]
            kernels[(a, b)] = k.astype(weight.dtype)
    return kernels


def _match(graph: gs.Graph, resize: gs.Node):
    """(resize, conv, weight, bias) for a Resize + Conv pair to rewrite, or a ``Skip``."""
    why = _not_nearest_2x(resize)
    if why is not None:
        return why
    up = resize.outputs[0]
    if len(up.outputs) != 1 or not only_consumer(graph, up, up.outputs[0]):
        return Skip("upsampled tensor has other readers")
    conv = up.outputs[0]
    parsed = _conv_weights(conv)
    if isinstance(parsed, Skip):
        return parsed
    if conv.inputs[0] is not up:
        return Skip("upsampled tensor is not the Conv's input")
    return resize, conv, *parsed


def rewrite_upsample_conv(graph: gs.Graph) -> tuple[gs.Graph, int]:
    """Rewrite nearest-2×-upsample + 3×3 conv pairs; the count is the number rewritten."""
    names = Names(graph)

    def rewrite(matched) -> None:
        resize, conv, weight, bias = matched
        x, y = resize.inputs[0], conv.outputs[0]
        base = conv.name or "upsample_conv"
        bias_c = None if bias is None else gs.Constant(names(f"{base}_bias"), np.ascontiguousarray(bias))
        phases = []
        for (a, b), kernel in phase_kernels(weight).items():
            out = gs.Variable(names(f"{base}_phase{a}{b}"), dtype=y.dtype)
            w = gs.Constant(names(f"{base}_w{a}{b}"), np.ascontiguousarray(kernel))
            inputs = [x, w] + ([bias_c] if bias_c is not None else [])
            graph.nodes.append(gs.Node("Conv", names(f"{base}/phase{a}{b}"),
                                       {"kernel_shape": [2, 2], "pads": [1 - a, 1 - b, a, b],
                                        "strides": [1, 1], "dilations": [1, 1], "group": 1},
                                       inputs, [out]))
            phases.append(out)
        stacked = gs.Variable(names(f"{base}_phases"), dtype=y.dtype)
        conv.outputs.clear()
        graph.nodes.append(gs.Node("Concat", names(f"{base}/Concat"), {"axis": 1}, phases, [stacked]))
        graph.nodes.append(gs.Node("DepthToSpace", names(f"{base}/DepthToSpace"),
                                   {"blocksize": 2, "mode": "DCR"}, [stacked], [y]))

    result = apply_rule(graph, "Resize", lambda resize: _match(graph, resize), rewrite)
    graph.cleanup().toposort()
    return graph, result.count
