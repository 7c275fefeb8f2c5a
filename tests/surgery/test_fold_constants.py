"""fold_constants: constant subgraphs and static Shape reads become initializers.

    before:  Constant(a) ─▶ Mul ◀─ Constant(b)          W ─▶ Transpose ─▶ MatMul ◀─ x
                             └─▶ Add ◀─ x              Shape(x) ─▶ Reshape(x)
    after:   (a·b) ─▶ Add ◀─ x        Wᵀ ─▶ MatMul ◀─ x        Reshape(x, [2, 12])
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper
from surgery_helpers import fingerprint, make_model, ops, run_ort, run_reference, to_model

from surgery.fold_constants import fold_constants

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 3, 4)).astype(np.float32)
W = RNG.standard_normal((4, 4)).astype(np.float32)


def _model():
    a = helper.make_node("Constant", [], ["a"], value=numpy_helper.from_array(np.full((4,), 2.0, np.float32)))
    b = helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(np.arange(4, dtype=np.float32)))
    nodes = [
        a,
        b,
        helper.make_node("Mul", ["a", "b"], ["ab"]),
        helper.make_node("Add", ["x", "ab"], ["h"]),
        helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "Wt"], ["m"]),
        helper.make_node("Shape", ["m"], ["s"]),
        helper.make_node("Reshape", ["m", "flat"], ["r"]),
        helper.make_node("Reshape", ["r", "s"], ["y"]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.array([2, 12], np.int64), "flat")],
    )


def test_folds_constant_subgraphs_and_static_shapes():
    model = _model()
    # Shape folding needs the shapes (simplify runs shape inference before the passes)
    graph, count = fold_constants(gs.import_onnx(onnx.shape_inference.infer_shapes(model)))
    after = to_model(graph)
    # Constant ×2, Mul, Transpose and the Shape of a static tensor are gone
    assert count == 5
    assert ops(model) == {"Constant": 2, "Mul": 1, "Add": 1, "Transpose": 1, "MatMul": 1, "Shape": 1, "Reshape": 2}
    assert ops(after) == {"Add": 1, "MatMul": 1, "Reshape": 2}
    assert [i.name for i in after.graph.input] == ["x"] and [o.name for o in after.graph.output] == ["y"]
    (expected,) = run_ort(model, {"x": X})
    (got,) = run_ort(after, {"x": X})
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    (ref,) = run_reference(after, {"x": X})
    np.testing.assert_allclose(ref, (X + 2.0 * np.arange(4)) @ W.T, rtol=1e-5, atol=1e-5)


def test_skips_graph_without_constants():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])],
    )
    graph = gs.import_onnx(model)
    before = fingerprint(graph)
    graph, count = fold_constants(graph)
    assert count == 0
    assert fingerprint(graph) == before


def test_skips_dynamic_shape():
    model = make_model(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    graph, count = fold_constants(gs.import_onnx(model))
    assert count == 0
    assert ops(graph) == {"Shape": 1, "Reshape": 1}


def test_idempotent():
    graph, first = fold_constants(gs.import_onnx(onnx.shape_inference.infer_shapes(_model())))
    before = fingerprint(graph)
    graph, second = fold_constants(graph)
    assert first > 0 and second == 0
    assert fingerprint(graph) == before
