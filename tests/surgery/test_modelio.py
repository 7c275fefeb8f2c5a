"""surgery.modelio: the one 2 GiB rule (simulated with a lowered limit), saving, staging, metadata.

    small model ─▶ serialized() bytes        save_model ─▶ model.onnx
    large model ─▶ serialized() None         save_model ─▶ model.onnx + model.onnx.data
                   staged_path() ─▶ <tmp>/model.onnx + model.onnx.data
"""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from surgery_helpers import make_model, run_ort

import surgery
from surgery import modelio

VI = helper.make_tensor_value_info
W = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)  # 16 KiB of weights


def _model():
    """x[2,64] ─▶ MatMul(W) ─▶ Relu ─▶ y, with metadata on the model and on x."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    model = make_model(nodes, [VI("x", TensorProto.FLOAT, [2, 64])], [VI("y", TensorProto.FLOAT, [2, 64])],
                       [numpy_helper.from_array(W, "w")])
    model.metadata_props.add(key="fxpass.config", value="tiny")
    model.graph.input[0].metadata_props.add(key="fxpass.role", value="noisy image")
    model.doc_string = "a test model"
    return model


@pytest.fixture
def small_limit(monkeypatch):
    """Every model over 4 KiB counts as large (as if it were over 2 GiB)."""
    monkeypatch.setattr(modelio, "LARGE_MODEL_BYTES", 4096)


def _feeds():
    return {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)}


def test_the_rule():
    assert surgery.LARGE_MODEL_BYTES == modelio.LARGE_MODEL_BYTES == 2**31 - 2**26
    assert surgery.is_large is modelio.is_large and surgery.save_model is modelio.save_model
    model = _model()
    assert not modelio.is_large(model)
    assert modelio.serialized(model) == model.SerializeToString()


def test_is_large_with_a_lowered_limit(small_limit):
    model = _model()
    assert model.ByteSize() > 4096 and modelio.is_large(model) and modelio.serialized(model) is None
    tiny = make_model([helper.make_node("Relu", ["x"], ["y"])], [VI("x", TensorProto.FLOAT, [2])],
                      [VI("y", TensorProto.FLOAT, [2])])
    assert not modelio.is_large(tiny) and modelio.serialized(tiny) == tiny.SerializeToString()


def test_unsizable_model_counts_as_large():
    class Huge:
        def ByteSize(self):
            raise ValueError("message too large")

    assert modelio.is_large(Huge())


def test_save_model_small_is_one_file(tmp_path):
    path = tmp_path / "out" / "model.onnx"
    modelio.save_model(_model(), path)
    assert sorted(os.listdir(path.parent)) == ["model.onnx"]
    np.testing.assert_array_equal(run_ort(onnx.load(str(path)), _feeds())[0], run_ort(_model(), _feeds())[0])


def test_save_model_large_writes_external_data(small_limit, tmp_path):
    model = _model()
    before = model.SerializeToString()
    path = tmp_path / "model.onnx"
    modelio.save_model(model, path)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "model.onnx.data").stat().st_size == W.nbytes
    assert path.stat().st_size < 1024
    assert model.SerializeToString() == before  # the caller's proto keeps its tensors
    loaded = onnx.load(str(path))
    assert {p.key: p.value for p in loaded.metadata_props} == {"fxpass.config": "tiny"}
    np.testing.assert_array_equal(run_ort(loaded, _feeds())[0], run_ort(model, _feeds())[0])


def test_staged_path_writes_external_data_that_lives_with_the_handle():
    import onnxruntime as ort

    model = _model()
    path, folder = modelio.staged_path(model)
    try:
        assert sorted(os.listdir(os.path.dirname(path))) == ["model.onnx", "model.onnx.data"]
        assert os.path.basename(path) == "model.onnx" and os.path.getsize(path) < 1024
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(session.run(None, _feeds())[0], run_ort(model, _feeds())[0])
    finally:
        folder.cleanup()
    assert not os.path.exists(path)
    assert len(model.graph.initializer[0].raw_data) == W.nbytes  # the caller's proto is untouched


def test_light_call_runs_on_an_external_data_copy(small_limit):
    model = _model()
    seen = []

    def tool(m):
        seen.append(m.graph.initializer[0].data_location)
        return onnx.shape_inference.infer_shapes(m)

    result = modelio.light_call(model, tool)
    assert seen == [TensorProto.EXTERNAL]
    assert result.graph.initializer[0].data_location == TensorProto.DEFAULT  # loaded back
    np.testing.assert_array_equal(numpy_helper.to_array(result.graph.initializer[0]), W)


def test_metadata_round_trip():
    model = _model()
    saved = modelio.io_metadata(model)
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.metadata_props[:]
    del stripped.graph.input[0].metadata_props[:]
    stripped.doc_string = ""
    stripped.metadata_props.add(key="fxpass.config", value="newer")  # present values win
    modelio.restore_metadata(stripped, saved)
    assert {p.key: p.value for p in stripped.metadata_props} == {"fxpass.config": "newer"}
    assert {p.key: p.value for p in stripped.graph.input[0].metadata_props} == {"fxpass.role": "noisy image"}
    assert stripped.doc_string == "a test model"


def test_small_facts():
    model = _model()
    assert modelio.op_histogram(model) == {"MatMul": 1, "Relu": 1}
    assert list(surgery.op_histogram(make_model(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
         helper.make_node("Neg", ["b"], ["y"])], [VI("x", TensorProto.FLOAT, [2])], [VI("y", TensorProto.FLOAT, [2])]
    ))) == ["Neg", "Relu"]
    assert modelio.default_opset(model) == 21
    assert modelio.graph_io_names(model) == (["x"], ["y"])


def test_simplify_keeps_metadata_of_a_large_model(small_limit):
    with pytest.warns(UserWarning, match="over 2 GB"):
        result, report = surgery.simplify(_model(), 21)
    assert report["simplifier"]["status"] == "skipped: model over 2 GB"
    assert {p.key: p.value for p in result.metadata_props} == {"fxpass.config": "tiny"}
    assert {p.key: p.value for p in result.graph.input[0].metadata_props} == {"fxpass.role": "noisy image"}
