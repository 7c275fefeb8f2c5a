"""convert_precision: float16 everywhere except the float32 islands; float32 graph inputs/outputs.

    before (all f32):  x ─▶ Conv ─▶ GroupNormalization ─▶ SiLU ─▶ Add ◀─ Unsqueeze ◀─ Gather(table, t_index)
                       ─▶ Conv ─▶ Softmax ─▶ Add ◀─ Sin ◀─ Mul(freqs) ◀─ timesteps
    after:             Conv, SiLU, Conv in f16; GroupNormalization, Softmax, Gather (f32 table),
                       the Add reading the table row, the Sin branch in f32; Casts in between
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from surgery_helpers import fingerprint, make_model, ops, run_ort, run_reference, to_model

from surgery import simplify
from surgery.convert_precision import convert_precision, float32_islands

VI = helper.make_tensor_value_info
RNG = np.random.default_rng(0)


def _model():
    f = lambda *s: (RNG.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    inits = [
        numpy_helper.from_array(f(8, 4, 3, 3), "w1"),
        numpy_helper.from_array(f(8), "b1"),
        numpy_helper.from_array(1 + f(8), "gn_scale"),
        numpy_helper.from_array(f(8), "gn_bias"),
        numpy_helper.from_array((RNG.standard_normal((10, 8)) * 2).astype(np.float32), "table"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes23"),
        numpy_helper.from_array(f(4, 8, 1, 1), "w2"),
        numpy_helper.from_array(np.array([1, 4, 64], np.int64), "flat"),
        numpy_helper.from_array(np.array([1, 4, 8, 8], np.int64), "square"),
        numpy_helper.from_array(np.exp(-np.arange(4) * 2.0).astype(np.float32).reshape(1, 4), "freqs"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("GroupNormalization", ["c1", "gn_scale", "gn_bias"], ["n"], num_groups=4, epsilon=1e-5),
        helper.make_node("Sigmoid", ["n"], ["sg"]),
        helper.make_node("Mul", ["n", "sg"], ["silu"]),
        helper.make_node("Gather", ["table", "t_index"], ["row"], axis=0),
        helper.make_node("Unsqueeze", ["row", "axes23"], ["row4"]),
        helper.make_node("Add", ["silu", "row4"], ["h"]),
        helper.make_node("Conv", ["h", "w2"], ["c2"]),
        helper.make_node("Reshape", ["c2", "flat"], ["r"]),
        helper.make_node("Softmax", ["r"], ["sm"], axis=-1),
        helper.make_node("Reshape", ["sm", "square"], ["att"]),
        helper.make_node("Unsqueeze", ["timesteps", "axis1"], ["t2"]),
        helper.make_node("Mul", ["t2", "freqs"], ["args"]),
        helper.make_node("Sin", ["args"], ["emb"]),
        helper.make_node("Unsqueeze", ["emb", "axes23"], ["emb4"]),
        helper.make_node("Add", ["att", "emb4"], ["out"]),
    ]
    return make_model(
        nodes,
        [VI("x", TensorProto.FLOAT, [1, 4, 8, 8]), VI("t_index", TensorProto.INT64, [1]),
         VI("timesteps", TensorProto.FLOAT, [1])],
        [VI("out", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )


FEEDS = {
    "x": RNG.standard_normal((1, 4, 8, 8)).astype(np.float32),
    "t_index": np.array([7], np.int64),
    "timesteps": np.array([3999.0], np.float32),  # large: t·freq in float16 would be off by ~1 rad
}


def _converted():
    model = _model()
    graph, count = convert_precision(gs.import_onnx(model))
    return model, graph, count


def _node(graph, op, nth=0):
    return [n for n in graph.nodes if n.op == op][nth]


def test_islands_are_found_by_structure():
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(_model()))
    for i, node in enumerate(graph.nodes):
        node.name = f"n{i}"
    islands = float32_islands(graph)
    by_op = {}
    for node in graph.nodes:
        by_op.setdefault(node.op, []).append(node.name in islands)
    assert by_op["GroupNormalization"] == [True] and by_op["Softmax"] == [True]
    assert by_op["Gather"] == [True] and by_op["Sin"] == [True]
    assert by_op["Add"] == [True, True]  # both read the conditioning cone
    assert by_op["Conv"] == [False, False] and by_op["Sigmoid"] == [False]


def test_converts_outside_float32_islands():
    model, graph, count = _converted()
    after = to_model(graph)
    assert count > 0
    assert "Cast" not in ops(model) and ops(after)["Cast"] > 0
    # float32 at the boundary
    assert [(i.name, i.type.tensor_type.elem_type) for i in after.graph.input] == [
        ("x", TensorProto.FLOAT), ("t_index", TensorProto.INT64), ("timesteps", TensorProto.FLOAT)]
    assert [(o.name, o.type.tensor_type.elem_type) for o in after.graph.output] == [("out", TensorProto.FLOAT)]
    dtype = lambda t: t.dtype  # noqa: E731
    # float16 torso
    conv = _node(graph, "Conv")
    assert dtype(conv.inputs[0]) == np.float16 and dtype(conv.inputs[1]) == np.float16
    assert dtype(_node(graph, "Sigmoid").outputs[0]) == np.float16
    # float32 islands
    gn = _node(graph, "GroupNormalization")
    assert all(dtype(t) == np.float32 for t in gn.inputs + gn.outputs)
    assert dtype(_node(graph, "Softmax").inputs[0]) == np.float32
    gather = _node(graph, "Gather")
    assert dtype(gather.inputs[0]) == np.float32 and dtype(gather.outputs[0]) == np.float32
    assert all(dtype(a.outputs[0]) == np.float32 for a in graph.nodes if a.op == "Add")
    sin = _node(graph, "Sin")
    assert dtype(sin.inputs[0]) == np.float32 and sin.inputs[0].inputs[0].op == "Mul"


def test_numerics_onnxruntime():
    model, graph, _ = _converted()
    (expected,) = run_ort(model, FEEDS)
    try:
        (got,) = run_ort(graph, FEEDS)
    except Exception as exc:  # noqa: BLE001 - a CPU build without a float16 kernel
        if "NOT_IMPLEMENTED" in str(exc) or "Could not find an implementation" in str(exc):
            pytest.skip(f"ONNX Runtime has no float16 kernel here: {str(exc).splitlines()[0]}")
        raise
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-2)


def test_numerics_reference_evaluator():
    model, graph, _ = _converted()
    (expected,) = run_reference(model, FEEDS)
    (got,) = run_reference(graph, FEEDS)
    np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-2)


def test_unet_float16_matches_float32(tiny_unet):
    model, feeds, expected = tiny_unet
    simplified, _ = simplify(model, 21, simplifier=None)
    graph, count = convert_precision(gs.import_onnx(simplified))
    after = to_model(graph)
    assert count > 100
    assert {i.name: i.type.tensor_type.elem_type for i in after.graph.input} == {
        "x": TensorProto.FLOAT, "timesteps": TensorProto.FLOAT}
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in after.graph.output)
    for node in graph.nodes:
        if node.op in ("GroupNormalization", "Softmax", "Sin", "Cos"):
            assert all(t.dtype == np.float32 for t in node.inputs if not t.is_empty()), node.name
    (got,) = run_ort(after, feeds)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-2 * scale)


def test_skips_graph_without_float():
    model = make_model(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        [VI("a", TensorProto.INT64, [3]), VI("b", TensorProto.INT64, [3])],
        [VI("c", TensorProto.INT64, [3])],
    )
    graph = gs.import_onnx(model)
    before = fingerprint(graph)
    graph, count = convert_precision(graph)
    assert count == 0
    assert fingerprint(graph) == before


def test_idempotent():
    _, graph, first = _converted()
    before = fingerprint(graph)
    graph, second = convert_precision(graph)
    assert first > 0 and second == 0
    assert fingerprint(graph) == before


def _res_block_after_the_speed_passes():
    """A scale-shift norm, an upsample and a second norm, in the form the speed passes leave them.

    fp32:  x ─▶ Conv ─▶ GroupNormalization ─▶ Mul(Gather) ─▶ Add(Gather) ─▶ SiLU ─▶ Resize×2 ─▶ Conv
              ─▶ GroupNormalization ─▶ Mul(Gather) ─▶ Add(Gather) ─▶ out
    then fold_norm_scale_shift, expand_group_norm (every norm), rewrite_upsample_conv and
    merge_table_gathers, so that the float16 conversion sees LayerNormalization on gathered rows,
    GroupNormalization with gathered scale/bias, DepthToSpace and a Split of table rows.
    """
    from surgery.expand_group_norm import expand_group_norm
    from surgery.fold_norm_scale_shift import fold_norm_scale_shift
    from surgery.merge_table_gathers import merge_table_gathers
    from surgery.rewrite_upsample_conv import rewrite_upsample_conv

    f = lambda *s: (RNG.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    T = 5
    inits = [numpy_helper.from_array(f(8, 4, 3, 3), "w1"), numpy_helper.from_array(f(8, 8, 3, 3), "w2"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1])]
    src = "c1"
    for k in range(2):
        inits += [numpy_helper.from_array(1 + f(8), f"g{k}"), numpy_helper.from_array(f(8), f"b{k}"),
                  numpy_helper.from_array(1 + f(T, 8, 1, 1), f"m{k}"), numpy_helper.from_array(f(T, 8, 1, 1), f"a{k}")]
        nodes += [helper.make_node("GroupNormalization", [src, f"g{k}", f"b{k}"], [f"n{k}"], num_groups=4),
                  helper.make_node("Gather", [f"m{k}", "t_index"], [f"mr{k}"], axis=0),
                  helper.make_node("Gather", [f"a{k}", "t_index"], [f"ar{k}"], axis=0),
                  helper.make_node("Mul", [f"n{k}", f"mr{k}"], [f"s{k}"]),
                  helper.make_node("Add", [f"s{k}", f"ar{k}"], ["h0" if k == 0 else "out"])]
        if k == 0:
            nodes += [helper.make_node("Sigmoid", ["h0"], ["sg"]), helper.make_node("Mul", ["h0", "sg"], ["silu"]),
                      helper.make_node("Resize", ["silu", "", "scales"], ["up"], mode="nearest",
                                       coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
                      helper.make_node("Conv", ["up", "w2"], ["c2"], pads=[1, 1, 1, 1])]
            src = "c2"
    model = make_model(nodes, [VI("x", TensorProto.FLOAT, [1, 4, 6, 6]), VI("t_index", TensorProto.INT64, [1])],
                       [VI("out", TensorProto.FLOAT, [1, 8, 12, 12])], inits)
    # onnx's shape inference stops at GroupNormalization-21; torch's exporter writes every shape
    for name, shape in (("c1", [1, 8, 6, 6]), ("n0", [1, 8, 6, 6]), ("h0", [1, 8, 6, 6]), ("silu", [1, 8, 6, 6]), ("up", [1, 8, 12, 12]),
                        ("c2", [1, 8, 12, 12]), ("n1", [1, 8, 12, 12])):
        model.graph.value_info.append(VI(name, TensorProto.FLOAT, shape))
    graph = gs.import_onnx(model)
    graph, folded = fold_norm_scale_shift(graph)
    graph, expanded = expand_group_norm(graph, min_elements=8 * 12 * 12)  # the second norm only
    graph, upsampled = rewrite_upsample_conv(graph)
    graph, merged = merge_table_gathers(graph, min_group=2)  # pairs here: [C] rows and [C,1,1] rows
    assert (folded, expanded, upsampled, merged) == (2, 1, 1, 2)
    return model, to_model(graph)


def test_float16_after_the_speed_passes():
    model, fast = _res_block_after_the_speed_passes()
    assert {"LayerNormalization", "GroupNormalization", "DepthToSpace", "Split"} <= set(ops(fast))
    graph, count = convert_precision(gs.import_onnx(fast))
    half = to_model(graph)
    assert count > 0
    for node in graph.nodes:
        if node.op in ("GroupNormalization", "LayerNormalization", "Gather", "Split"):
            assert all(t.dtype == np.float32 for t in node.inputs + node.outputs
                       if not t.is_empty() and t.dtype != np.int64), node.name
    assert any(n.op == "Conv" and n.inputs[1].dtype == np.float16 for n in graph.nodes)
    for t in range(5):
        feeds = {"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32), "t_index": np.array([t], np.int64)}
        (expected,) = run_ort(model, feeds)
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(run_ort(fast, feeds)[0], expected, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(run_ort(half, feeds)[0], expected, rtol=0, atol=2e-2 * scale)
        np.testing.assert_allclose(run_reference(half, feeds)[0], expected, rtol=0, atol=2e-2 * scale)
