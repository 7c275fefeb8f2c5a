"""rewrite_upsample_conv: nearest 2× Resize + 3×3 Conv → four 2×2 Convs + Concat + DepthToSpace."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from surgery_helpers import fingerprint, make_model, ops, run_ort, run_reference, run_with_skips, to_model

from surgery.rewrite_upsample_conv import EXACT_2X_MODES, phase_kernels, rewrite_upsample_conv

VI = helper.make_tensor_value_info
RNG = np.random.default_rng(2)


def _model(c=4, k=5, h=6, w=7, batch=1, bias=True, coord="asymmetric", nearest="floor", mode="nearest",
           scales=(1, 1, 2, 2), sizes=None, conv_attrs=None, extra_reader=False, kernel=3):
    weight = RNG.standard_normal((k, c, kernel, kernel)).astype(np.float32) * 0.3
    inits = [numpy_helper.from_array(weight, "w")]
    if sizes is None:
        inits.append(numpy_helper.from_array(np.asarray(scales, dtype=np.float32), "scales"))
        resize_in = ["x", "", "scales"]
    else:
        inits.append(numpy_helper.from_array(np.asarray(sizes, dtype=np.int64), "sizes"))
        resize_in = ["x", "", "", "sizes"]
    conv_in = ["up", "w"]
    if bias:
        inits.append(numpy_helper.from_array(RNG.standard_normal(k).astype(np.float32), "bias"))
        conv_in.append("bias")
    attrs = {"kernel_shape": [kernel, kernel], "pads": [1, 1, 1, 1]}
    attrs.update(conv_attrs or {})
    nodes = [helper.make_node("Resize", resize_in, ["up"], mode=mode, coordinate_transformation_mode=coord,
                              nearest_mode=nearest),
             helper.make_node("Conv", conv_in, ["y"], **attrs)]
    outputs = [VI("y", TensorProto.FLOAT, ["n", "k", "h2", "w2"])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["up"], ["side"]))
        outputs.append(VI("side", TensorProto.FLOAT, ["n", "c", "h2", "w2"]))
    return make_model(nodes, [VI("x", TensorProto.FLOAT, [batch, c, h, w])], outputs, inits)


def _check_equal(model, after, shape, tol=1e-5):
    feeds = {"x": RNG.standard_normal(shape).astype(np.float32)}
    expected = run_ort(model, feeds)[0]
    got = run_ort(after, feeds)[0]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * max(1.0, float(np.abs(expected).max())))
    return feeds, expected


def test_rewrites_upsample_conv():
    model = _model()
    graph, count = rewrite_upsample_conv(gs.import_onnx(model))
    after = to_model(graph)
    assert count == 1
    assert ops(after) == {"Conv": 4, "Concat": 1, "DepthToSpace": 1}
    convs = [n for n in graph.nodes if n.op == "Conv"]
    assert sorted(tuple(n.attrs["pads"]) for n in convs) == [(0, 0, 1, 1), (0, 1, 1, 0), (1, 0, 0, 1), (1, 1, 0, 0)]
    assert all(n.attrs["kernel_shape"] == [2, 2] and n.inputs[0].name == "x" for n in convs)
    assert [o.name for o in after.graph.output] == ["y"]
    feeds, expected = _check_equal(model, after, (1, 4, 6, 7))
    np.testing.assert_allclose(run_reference(after, feeds)[0], expected, rtol=1e-5, atol=1e-5)


def test_phase_kernels_sum_the_taps():
    """Each 2×2 phase kernel holds all nine 3×3 taps once per output phase: the sums agree."""
    w = RNG.standard_normal((3, 2, 3, 3))
    kernels = phase_kernels(w)
    for k in kernels.values():
        np.testing.assert_allclose(k.sum(axis=(2, 3)), w.sum(axis=(2, 3)), rtol=1e-12)
    # phase (0, 0): rows m-1, m ← taps {0}, {1, 2}; columns alike
    np.testing.assert_allclose(kernels[(0, 0)][:, :, 0, 0], w[:, :, 0, 0])
    np.testing.assert_allclose(kernels[(0, 0)][:, :, 1, 1], w[:, :, 1:, 1:].sum(axis=(2, 3)))


@pytest.mark.parametrize("coord, nearest", sorted(EXACT_2X_MODES))
def test_every_accepted_coordinate_mode_matches_onnx_runtime(coord, nearest):
    model = _model(coord=coord, nearest=nearest)
    graph, count = rewrite_upsample_conv(gs.import_onnx(model))
    assert count == 1
    _check_equal(model, to_model(graph), (1, 4, 6, 7))


def test_sizes_input_batch_and_no_bias():
    model = _model(batch=2, bias=False, sizes=(2, 4, 12, 14))
    graph, count = rewrite_upsample_conv(gs.import_onnx(model))
    assert count == 1
    _check_equal(model, to_model(graph), (2, 4, 6, 7))


@settings(max_examples=15, deadline=None)
@given(c=st.integers(1, 6), k=st.integers(1, 6), h=st.integers(1, 9), w=st.integers(1, 9),
       bias=st.booleans(), pair=st.sampled_from(sorted(EXACT_2X_MODES)))
def test_random_shapes(c, k, h, w, bias, pair):
    model = _model(c=c, k=k, h=h, w=w, bias=bias, coord=pair[0], nearest=pair[1])
    graph, count = rewrite_upsample_conv(gs.import_onnx(model))
    assert count == 1
    _check_equal(model, to_model(graph), (1, c, h, w))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(coord="asymmetric", nearest="ceil"),  # 2m+1 → m+1: not a plain 2× repeat
        dict(coord="half_pixel", nearest="floor"),
        dict(coord="align_corners", nearest="round_prefer_floor"),
        dict(mode="linear"),
        dict(scales=(1, 1, 3, 3)),
        dict(scales=(1, 2, 2, 2)),
        dict(conv_attrs={"strides": [2, 2]}),
        dict(conv_attrs={"group": 2}),
        dict(conv_attrs={"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
        dict(conv_attrs={"pads": [0, 0, 0, 0]}),
        dict(kernel=1, conv_attrs={"pads": [0, 0, 0, 0]}),
        dict(extra_reader=True),  # the upsampled tensor is needed anyway
    ],
)
def test_leaves_other_graphs_alone(kwargs):
    model = _model(**kwargs)
    graph = gs.import_onnx(model)
    before = fingerprint(graph)
    graph, count = rewrite_upsample_conv(graph)
    assert count == 0 and fingerprint(graph) == before


def test_idempotent():
    graph, first = rewrite_upsample_conv(gs.import_onnx(_model()))
    snapshot = fingerprint(graph)
    graph, second = rewrite_upsample_conv(graph)
    assert (first, second) == (1, 0) and fingerprint(graph) == snapshot


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(mode="linear"), "Resize mode is not nearest"),
        (dict(coord="align_corners", nearest="round_prefer_floor"),
         "coordinate mode align_corners/round_prefer_floor does not send 2m and 2m+1 to m"),
        (dict(scales=(1, 2, 2, 2)), "scales are not [1, 1, 2, 2]"),
        (dict(sizes=(1, 4, 12, 15)), "sizes do not double H and W"),
        (dict(conv_attrs={"strides": [2, 2]}), "Conv has strides or dilations"),
        (dict(conv_attrs={"group": 2}), "Conv has auto_pad or groups"),
        (dict(conv_attrs={"pads": [0, 0, 0, 0]}), "Conv pads are not [1, 1, 1, 1]"),
        (dict(kernel=1, conv_attrs={"pads": [1, 1, 1, 1]}), "Conv weights are not a constant 3×3 kernel"),
        (dict(extra_reader=True), "upsampled tensor has other readers"),
    ],
)
def test_skip_reasons(kwargs, reason):
    _, count, skipped = run_with_skips(rewrite_upsample_conv, gs.import_onnx(_model(**kwargs)))
    assert count == 0 and skipped == {reason: 1}
