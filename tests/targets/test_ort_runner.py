"""targets.ort: the ONNX Runtime runner, including models too large to serialize in one message."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from polygraphy.comparator import Comparator

import targets.ort as ort_target


def _model(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["out"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(runner, x):
    results = Comparator.run([runner], data_loader=[{"x": x}])
    return results[runner.name][0]["out"]


def test_runs_a_model_proto_on_the_cpu():
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    x = np.ones((1, 64), np.float32)
    out = _run(ort_target.ort_runner(_model(w), cuda=False), x)
    np.testing.assert_allclose(out, x @ w, rtol=1e-5, atol=1e-5)


def test_large_models_go_through_external_data(monkeypatch):
    """Over the serialization limit the runner writes the model with external data and loads the file."""
    import surgery.modelio

    monkeypatch.setattr(surgery.modelio, "LARGE_MODEL_BYTES", 1024)  # this 16 KiB model now counts as "too large"
    w = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    x = np.ones((1, 64), np.float32)
    model = _model(w)
    runner = ort_target.ort_runner(model, cuda=False)
    assert runner._fxpass_staging is not None
    np.testing.assert_allclose(_run(runner, x), x @ w, rtol=1e-5, atol=1e-5)
    assert model.graph.initializer[0].raw_data  # the caller's proto keeps its weights inline
