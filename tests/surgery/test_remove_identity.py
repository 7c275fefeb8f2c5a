"""remove_identity: Identity and inference Dropout nodes disappear; graph output names stay.

    before:  x ─▶ Identity ─▶ Relu ─▶ Dropout(ratio=.3) ─▶ Identity ─▶ y (graph output)
    after:   x ─▶ Relu ─▶ y        (Relu's output takes the output's name)
"""

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper
from surgery_helpers import fingerprint, make_model, ops, run_ort, run_reference, run_with_skips, to_model

from surgery.remove_identity import remove_identity

X = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
VI = helper.make_tensor_value_info


def _model():
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Dropout", ["b", "ratio"], ["c"]),
        helper.make_node("Identity", ["c"], ["y"]),
    ]
    return make_model(
        nodes,
        [VI("x", TensorProto.FLOAT, [2, 5])],
        [VI("y", TensorProto.FLOAT, [2, 5])],
        [numpy_helper.from_array(np.array(0.3, np.float32), "ratio")],
    )


def test_removes_identity_and_inference_dropout():
    model = _model()
    graph, count = remove_identity(gs.import_onnx(model))
    after = to_model(graph)
    assert count == 3
    assert ops(model) == {"Identity": 2, "Relu": 1, "Dropout": 1}
    assert ops(after) == {"Relu": 1}
    assert [i.name for i in after.graph.input] == ["x"] and [o.name for o in after.graph.output] == ["y"]
    (expected,) = run_ort(model, {"x": X})
    (got,) = run_ort(after, {"x": X})
    np.testing.assert_allclose(got, expected, rtol=0, atol=0)
    (ref,) = run_reference(after, {"x": X})
    np.testing.assert_allclose(ref, np.maximum(X, 0), rtol=0, atol=0)


def test_skips_identity_from_input_to_output():
    # x ─▶ Identity ─▶ y: removing it would merge a graph input with a graph output
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [VI("x", TensorProto.FLOAT, [2, 5])],
                       [VI("y", TensorProto.FLOAT, [2, 5])])
    graph = gs.import_onnx(model)
    before = fingerprint(graph)
    graph, count = remove_identity(graph)
    assert count == 0
    assert fingerprint(graph) == before


def test_skips_training_dropout_and_used_mask():
    nodes = [
        helper.make_node("Dropout", ["x", "ratio", "training"], ["a"]),  # training mode is an input
        helper.make_node("Dropout", ["a"], ["b", "mask"]),  # mask is read
        helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["b", "m"], ["y"]),
    ]
    model = make_model(
        nodes,
        [VI("x", TensorProto.FLOAT, [2, 5]), VI("training", TensorProto.BOOL, [])],
        [VI("y", TensorProto.FLOAT, [2, 5])],
        [numpy_helper.from_array(np.array(0.3, np.float32), "ratio")],
    )
    graph = gs.import_onnx(model)
    before = fingerprint(graph)
    graph, count = remove_identity(graph)
    assert count == 0
    assert fingerprint(graph) == before


def test_idempotent():
    graph, first = remove_identity(gs.import_onnx(_model()))
    before = fingerprint(graph)
    graph, second = remove_identity(graph)
    assert first == 3 and second == 0
    assert fingerprint(graph) == before


def test_skip_reasons():
    nodes = [
        helper.make_node("Dropout", ["x", "ratio", "training"], ["a"]),
        helper.make_node("Dropout", ["a"], ["b", "mask"]),
        helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["b", "m"], ["s"]),
        helper.make_node("Identity", ["x"], ["y"]),
    ]
    model = make_model(nodes, [VI("x", TensorProto.FLOAT, [2, 5]), VI("training", TensorProto.BOOL, [])],
                       [VI("s", TensorProto.FLOAT, [2, 5]), VI("y", TensorProto.FLOAT, [2, 5])],
                       [numpy_helper.from_array(np.array(0.3, np.float32), "ratio")])
    _, count, skipped = run_with_skips(remove_identity, gs.import_onnx(model))
    assert count == 0
    assert skipped == {"Dropout training_mode is not a constant false": 1, "Dropout mask is used": 1,
                       "writes a graph output its input cannot take over (a graph input, constant or other output)": 1}
