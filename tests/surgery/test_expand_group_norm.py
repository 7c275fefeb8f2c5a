"""expand_group_norm: large GroupNormalization → Reshape, LayerNormalization, Reshape, Mul, Add.

    before:  x[N,C,*S] ─▶ GroupNormalization(scale, bias, G) ─▶ y
    after:   x ─▶ Reshape[0,G,-1] ─▶ LayerNormalization(axis 2) ─▶ Reshape[0,C,*S] ─▶ Mul(scale) ─▶ Add(bias) ─▶ y
"""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from surgery_helpers import fingerprint, make_model, ops, run_ort, run_reference, run_with_skips, to_model

from surgery.expand_group_norm import DEFAULT_MIN_ELEMENTS, expand_group_norm
from surgery.fold_norm_scale_shift import fold_norm_scale_shift

VI = helper.make_tensor_value_info
RNG = np.random.default_rng(1)


def _arr(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _norm_model(shape=(1, 8, 6, 5), groups=4, scale=None, bias=None, eps=1e-5):
    channels = shape[1]
    scale = 1 + 0.3 * RNG.standard_normal(channels) if scale is None else scale
    bias = 0.3 * RNG.standard_normal(channels) if bias is None else bias
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=groups, epsilon=eps)
    return make_model([node], [VI("x", TensorProto.FLOAT, list(shape))], [VI("y", TensorProto.FLOAT, list(shape))],
                      [_arr("s", scale), _arr("b", bias)])


def _x(shape):
    return (RNG.standard_normal(shape) * 3 + 1).astype(np.float32)


def test_expands_with_affine():
    model = _norm_model()
    graph, count = expand_group_norm(gs.import_onnx(model), min_elements=1)
    after = to_model(graph)
    assert count == 1
    assert [n.op_type for n in after.graph.node] == ["Reshape", "LayerNormalization", "Reshape", "Mul", "Add"]
    ln = next(n for n in after.graph.node if n.op_type == "LayerNormalization")
    attrs = {a.name: helper.get_attribute_value(a) for a in ln.attribute}
    assert attrs["axis"] == 2 and attrs["epsilon"] == pytest.approx(1e-5)
    assert [o.name for o in after.graph.output] == ["y"]
    feeds = {"x": _x((1, 8, 6, 5))}
    expected = run_ort(model, feeds)[0]
    np.testing.assert_allclose(run_ort(after, feeds)[0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run_reference(after, feeds)[0], expected, rtol=1e-5, atol=1e-5)


def test_identity_affine_needs_no_mul_or_add():
    model = _norm_model(scale=np.ones(8), bias=np.zeros(8))
    graph, count = expand_group_norm(gs.import_onnx(model), min_elements=1)
    after = to_model(graph)
    assert count == 1 and ops(after) == {"Reshape": 2, "LayerNormalization": 1}
    feeds = {"x": _x((1, 8, 6, 5))}
    np.testing.assert_allclose(run_ort(after, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, groups", [((2, 6, 10), 3), ((1, 16, 3, 4, 5), 8), ((3, 4, 7, 7), 4)])
def test_other_ranks_and_group_sizes(shape, groups):
    model = _norm_model(shape=shape, groups=groups)
    graph, count = expand_group_norm(gs.import_onnx(model), min_elements=1)
    after = to_model(graph)
    assert count == 1 and "GroupNormalization" not in ops(after)
    feeds = {"x": _x(shape)}
    np.testing.assert_allclose(run_ort(after, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_symbolic_batch():
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2)
    model = make_model([node], [VI("x", TensorProto.FLOAT, ["N", 4, 3, 3])], [VI("y", TensorProto.FLOAT, ["N", 4, 3, 3])],
                       [_arr("s", RNG.standard_normal(4)), _arr("b", RNG.standard_normal(4))])
    graph, count = expand_group_norm(gs.import_onnx(model), min_elements=1)
    after = to_model(graph)
    assert count == 1
    for batch in (1, 3):
        feeds = {"x": _x((batch, 4, 3, 3))}
        np.testing.assert_allclose(run_ort(after, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_gathered_scale_bias_from_fold_norm_scale_shift():
    """After fold_norm_scale_shift the scale/bias are rows of [T, C] tables: gathered as [C, 1, 1]."""
    T, C = 4, 8
    nodes = [helper.make_node("GroupNormalization", ["x", "g", "b"], ["n"], num_groups=4),
             helper.make_node("Gather", ["mt", "t_index"], ["m"], axis=0),
             helper.make_node("Gather", ["at", "t_index"], ["a"], axis=0),
             helper.make_node("Mul", ["n", "m"], ["nm"]), helper.make_node("Add", ["nm", "a"], ["y"])]
    model = make_model(nodes, [VI("x", TensorProto.FLOAT, [1, C, 5, 5]), VI("t_index", TensorProto.INT64, [1])],
                       [VI("y", TensorProto.FLOAT, [1, C, 5, 5])],
                       [_arr("g", 1 + RNG.standard_normal(C) * 0.3), _arr("b", RNG.standard_normal(C) * 0.3),
                        _arr("mt", RNG.standard_normal((T, C, 1, 1))), _arr("at", RNG.standard_normal((T, C, 1, 1)))])
    graph, folded = fold_norm_scale_shift(gs.import_onnx(model))
    graph, count = expand_group_norm(graph, min_elements=1)
    after = to_model(graph)
    assert (folded, count) == (1, 1)
    assert ops(after) == {"Squeeze": 1, "Gather": 2, "Reshape": 2, "LayerNormalization": 1, "Mul": 1, "Add": 1}
    gathered = [n for n in graph.nodes if n.op == "Gather"]
    assert all(n.inputs[0].values.shape == (T, C, 1, 1) for n in gathered)
    for t in range(T):
        feeds = {"x": _x((1, C, 5, 5)), "t_index": np.array([t], dtype=np.int64)}
        np.testing.assert_allclose(run_ort(after, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_default_threshold_keeps_small_norms():
    model = _norm_model(shape=(1, 64, 128, 128), groups=32)  # 2^20 elements per sample: below 2^21
    graph = gs.import_onnx(model)
    before = fingerprint(graph)
    graph, count = expand_group_norm(graph)
    assert count == 0 and fingerprint(graph) == before
    assert 64 * 128 * 128 < DEFAULT_MIN_ELEMENTS <= 64 * 256 * 256
    graph, count = expand_group_norm(gs.import_onnx(_norm_model(shape=(1, 64, 256, 256), groups=32)))
    assert count == 1


@pytest.mark.parametrize("case", ["opset18", "dynamic_spatial", "computed_scale"])
def test_leaves_other_graphs_alone(case):
    if case == "dynamic_spatial":
        node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2)
        model = make_model([node], [VI("x", TensorProto.FLOAT, [1, 4, "H", "W"])],
                           [VI("y", TensorProto.FLOAT, [1, 4, "H", "W"])], [_arr("s", np.ones(4)), _arr("b", np.zeros(4))])
    elif case == "computed_scale":  # scale is a graph input: neither a constant nor a gathered table row
        node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2)
        model = make_model([node], [VI("x", TensorProto.FLOAT, [1, 4, 3, 3]), VI("s", TensorProto.FLOAT, [4])],
                           [VI("y", TensorProto.FLOAT, [1, 4, 3, 3])], [_arr("b", np.zeros(4))])
    else:
        model = _norm_model()
    graph = gs.import_onnx(model)
    if case == "opset18":
        graph.opset = 18  # GroupNormalization-18: per-group scale/bias (onnx's checker refuses the model)
    before = fingerprint(graph)
    graph, count = expand_group_norm(graph, min_elements=1)
    assert count == 0 and fingerprint(graph) == before


def test_idempotent():
    graph, first = expand_group_norm(gs.import_onnx(_norm_model()), min_elements=1)
    snapshot = fingerprint(graph)
    graph, second = expand_group_norm(graph, min_elements=1)
    assert (first, second) == (1, 0) and fingerprint(graph) == snapshot


@pytest.mark.parametrize("case, reason", [
    ("default", "below min_elements (1,048,576 < 2,097,152)"),
    ("opset18", "opset 18 < 21"),
    ("dynamic_spatial", "input rank < 3 or channel/spatial dims not static"),
    ("computed_scale", "scale is not a constant or gathered table row"),
])
def test_skip_reasons(case, reason):
    options = {"min_elements": 1}
    if case == "default":
        model, options = _norm_model(shape=(1, 64, 128, 128), groups=32), {}
    elif case == "dynamic_spatial":
        node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2)
        model = make_model([node], [VI("x", TensorProto.FLOAT, [1, 4, "H", "W"])],
                           [VI("y", TensorProto.FLOAT, [1, 4, "H", "W"])], [_arr("s", np.ones(4)), _arr("b", np.zeros(4))])
    elif case == "computed_scale":
        node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2)
        model = make_model([node], [VI("x", TensorProto.FLOAT, [1, 4, 3, 3]), VI("s", TensorProto.FLOAT, [4])],
                           [VI("y", TensorProto.FLOAT, [1, 4, 3, 3])], [_arr("b", np.zeros(4))])
    else:
        model = _norm_model()
    graph = gs.import_onnx(model)
    if case == "opset18":
        graph.opset = 18
    graph, count, skipped = run_with_skips(expand_group_norm, graph, **options)
    assert count == 0 and skipped == {reason: 1}
