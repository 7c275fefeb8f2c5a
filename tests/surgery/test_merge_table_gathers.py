"""merge_table_gathers: Gathers of constant tables by one index → one Gather of the tables side by side + Split.

    before:  Gather(A[T,Ca,*R], t) ─▶ a     Gather(B[T,Cb,*R], t) ─▶ b     Gather(C[T,Cc,*R], t) ─▶ c
    after:   Gather([A|B|C], t) ─▶ Split(axis=rank(t), [Ca, Cb, Cc]) ─▶ a, b, c
"""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from surgery_helpers import fingerprint, make_model, ops, run_ort, run_with_skips, to_model

from surgery.merge_table_gathers import merge_table_gathers

VI = helper.make_tensor_value_info
RNG = np.random.default_rng(3)
T = 6


def _model(channels=(3, 5, 4), rest=(1, 1), index_shape=(1,), second_index=False, int_table=False):
    """One Gather per table, each row added to its own slice of x, the results summed to one output."""
    inits, nodes, terms = [], [], []
    for i, c in enumerate(channels):
        table = RNG.standard_normal((T, c, *rest)).astype(np.float32)
        inits.append(numpy_helper.from_array(table, f"table{i}"))
        idx = "t2" if (second_index and i == len(channels) - 1) else "t"
        nodes.append(helper.make_node("Gather", [f"table{i}", idx], [f"row{i}"], axis=0))
        nodes.append(helper.make_node("ReduceSum", [f"row{i}"], [f"sum{i}"], keepdims=0))
        terms.append(f"sum{i}")
    if int_table:
        inits.append(numpy_helper.from_array(np.arange(T * 2, dtype=np.int64).reshape(T, 2), "itable"))
        nodes.append(helper.make_node("Gather", ["itable", "t"], ["irow"], axis=0))
        nodes.append(helper.make_node("Cast", ["irow"], ["frow"], to=TensorProto.FLOAT))
        nodes.append(helper.make_node("ReduceSum", ["frow"], ["isum"], keepdims=0))
        terms.append("isum")
    nodes.append(helper.make_node("Sum", terms, ["y"]))
    inputs = [VI("t", TensorProto.INT64, list(index_shape))]
    if second_index:
        inputs.append(VI("t2", TensorProto.INT64, list(index_shape)))
    # one gathered row is also a graph output, to compare shapes and values element by element
    outputs = [VI("y", TensorProto.FLOAT, []), VI("row1", TensorProto.FLOAT, list(index_shape) + [channels[1], *rest])]
    return make_model(nodes, inputs, outputs, inits)


def _feeds(model, t, index_shape=(1,)):
    feeds = {"t": np.full(index_shape, t, dtype=np.int64)}
    if any(i.name == "t2" for i in model.graph.input):
        feeds["t2"] = np.full(index_shape, (t + 1) % T, dtype=np.int64)
    return feeds


def test_merges_gathers_sharing_an_index():
    model = _model()
    graph, count = merge_table_gathers(gs.import_onnx(model))
    after = to_model(graph)
    assert count == 2
    assert ops(after)["Gather"] == 1 and ops(after)["Split"] == 1
    gather = next(n for n in graph.nodes if n.op == "Gather")
    assert gather.inputs[0].values.shape == (T, 12, 1, 1)
    split = next(n for n in graph.nodes if n.op == "Split")
    assert split.attrs["axis"] == 1 and list(split.inputs[1].values) == [3, 5, 4]
    assert [o.name for o in after.graph.output] == ["y", "row1"]
    for t in range(T):
        got, expected = run_ort(after, _feeds(model, t)), run_ort(model, _feeds(model, t))
        np.testing.assert_array_equal(got[1], expected[1])  # a row is copied, never recomputed
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("index_shape, rest", [((), ()), ((), (1, 1)), ((2,), (3,))])
def test_index_ranks_and_trailing_shapes(index_shape, rest):
    model = _model(rest=rest, index_shape=index_shape)
    graph, count = merge_table_gathers(gs.import_onnx(model))
    after = to_model(graph)
    assert count == 2
    split = next(n for n in graph.nodes if n.op == "Split")
    assert split.attrs["axis"] == len(index_shape)
    for t in (0, T - 1):
        got, expected = run_ort(after, _feeds(model, t, index_shape)), run_ort(model, _feeds(model, t, index_shape))
        np.testing.assert_array_equal(got[1], expected[1])


def test_groups_by_index_and_dtype():
    model = _model(channels=(3, 5, 4, 2), second_index=True, int_table=True)
    graph, count = merge_table_gathers(gs.import_onnx(model))
    after = to_model(graph)
    # the three float tables gathered by t merge; the one by t2 and the int64 table stay alone
    assert count == 2 and ops(after)["Gather"] == 3 and ops(after)["Split"] == 1
    for t in range(T):
        np.testing.assert_allclose(run_ort(after, _feeds(model, t))[0], run_ort(model, _feeds(model, t))[0],
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(channels=(3, 5)), dict(opset=12)])
def test_leaves_other_graphs_alone(kwargs):
    """Two gathers would become two nodes anyway; below opset 13 Split's sizes are an attribute."""
    opset = kwargs.pop("opset", 21)
    graph = gs.import_onnx(_model(**kwargs))
    graph.opset = opset
    before = fingerprint(graph)
    graph, count = merge_table_gathers(graph)
    assert count == 0 and fingerprint(graph) == before


def test_idempotent():
    graph, first = merge_table_gathers(gs.import_onnx(_model()))
    snapshot = fingerprint(graph)
    graph, second = merge_table_gathers(graph)
    assert (first, second) == (2, 0) and fingerprint(graph) == snapshot


def test_skip_reasons():
    _, count, skipped = run_with_skips(merge_table_gathers, gs.import_onnx(_model(channels=(3, 5))))
    assert count == 0 and skipped == {"below min_group (2 < 3 gathers share index, dtype and row shape)": 2}
    graph = gs.import_onnx(_model())
    graph.opset = 12
    _, count, skipped = run_with_skips(merge_table_gathers, graph)
    assert count == 0 and skipped == {"opset 12 < 13": 3}
    # the gather by t2 is alone in its group; the other three merge
    _, count, skipped = run_with_skips(merge_table_gathers, gs.import_onnx(_model(channels=(3, 5, 4, 2), second_index=True)))
    assert count == 2 and skipped == {"below min_group (1 < 3 gathers share index, dtype and row shape)": 1}
