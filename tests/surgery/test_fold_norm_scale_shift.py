"""fold_norm_scale_shift: per-channel Mul/Add after GroupNormalization → its scale and bias.

    before:  x ─▶ GroupNormalization(γ, β) ─▶ Mul ◀─ Gather(M[T,C,1,1], t) ─▶ Add ◀─ Gather(A, t) ─▶ y
    after:   x ─▶ GroupNormalization(Gather(γ·M, t₀), Gather(β·M + A, t₀)) ─▶ y     (t₀ = Squeeze(t))
"""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from surgery_helpers import fingerprint, make_model, ops, run_ort, run_with_skips, to_model

from surgery.fold_norm_scale_shift import fold_norm_scale_shift

VI = helper.make_tensor_value_info
RNG = np.random.default_rng(0)
C, G, T = 8, 4, 5


def _arr(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _scale_shift_model(batch=1, mul_operand="table", add_operand="table", second_index=False, extra_reader=False,
                       opset=21, spatial=(6, 6)):
    """GroupNormalization → Mul(operand) → Add(operand) → y, operands gathered by t_index or constant."""
    inits = [_arr("gamma", 1 + 0.3 * RNG.standard_normal(C)), _arr("beta", 0.3 * RNG.standard_normal(C))]
    nodes = [helper.make_node("GroupNormalization", ["x", "gamma", "beta"], ["n"], num_groups=G, epsilon=1e-5)]
    for op, kind, name, idx in (("Mul", mul_operand, "m", "t_index"),
                                ("Add", add_operand, "a", "t2" if second_index else "t_index")):
        if kind == "table":
            inits.append(_arr(f"{name}_table", RNG.standard_normal((T, C, 1, 1))))
            nodes.append(helper.make_node("Gather", [f"{name}_table", idx], [name], axis=0))
        elif kind == "const":
            inits.append(_arr(name, RNG.standard_normal((1, C, 1, 1))))
        elif kind == "spatial":  # varies along H: not per channel
            inits.append(_arr(name, RNG.standard_normal((1, 1, spatial[0], 1))))
    nodes.append(helper.make_node("Mul", ["n", "m"], ["nm"]))
    nodes.append(helper.make_node("Add", ["a", "nm"], ["y"]))  # operand first: the pass must not care
    outputs = [VI("y", TensorProto.FLOAT, [batch, C, *spatial])]
    if extra_reader:
        nodes.append(helper.make_node("Sigmoid", ["n"], ["side"]))
        outputs.append(VI("side", TensorProto.FLOAT, [batch, C, *spatial]))
    inputs = [VI("x", TensorProto.FLOAT, [batch, C, *spatial]), VI("t_index", TensorProto.INT64, [1])]
    if second_index:
        inputs.append(VI("t2", TensorProto.INT64, [1]))
    return make_model(nodes, inputs, outputs, inits, opset=opset)


def _feeds(model, t, batch=1, spatial=(6, 6)):
    x = (RNG.standard_normal((batch, C, *spatial)) * 2 + 0.5).astype(np.float32)
    names = {i.name for i in model.graph.input}
    feeds = {"x": x, "t_index": np.array([t], dtype=np.int64)}
    if "t2" in names:
        feeds["t2"] = np.array([t], dtype=np.int64)
    return feeds


def test_folds_gathered_scale_shift_into_the_norm():
    model = _scale_shift_model()
    graph, count = fold_norm_scale_shift(gs.import_onnx(model))
    after = to_model(graph)
    assert count == 1
    assert ops(after) == {"GroupNormalization": 1, "Gather": 2, "Squeeze": 1}
    norm = next(n for n in graph.nodes if n.op == "GroupNormalization")
    tables = [n.inputs[1].inputs[0].inputs[0].values for n in [norm]]  # scale's Gather table
    assert tables[0].shape == (T, C)
    assert all(t.inputs[0].op == "Gather" for t in norm.inputs[1:])
    for t in range(T):
        feeds = _feeds(model, t)
        np.testing.assert_allclose(run_ort(after, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_constant_operands_fold_at_any_batch():
    model = _scale_shift_model(batch=3, mul_operand="const", add_operand="const")
    graph, count = fold_norm_scale_shift(gs.import_onnx(model))
    after = to_model(graph)
    assert count == 1 and ops(after) == {"GroupNormalization": 1}
    feeds = _feeds(model, 0, batch=3)
    np.testing.assert_allclose(run_ort(after, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_mixed_constant_and_gathered_operands():
    model = _scale_shift_model(mul_operand="const", add_operand="table")
    graph, count = fold_norm_scale_shift(gs.import_onnx(model))
    after = to_model(graph)
    assert count == 1 and ops(after) == {"GroupNormalization": 1, "Gather": 2, "Squeeze": 1}
    for t in (0, T - 1):
        feeds = _feeds(model, t)
        np.testing.assert_allclose(run_ort(after, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, why",
    [
        (dict(batch=2), "gathered rows with two samples: GroupNormalization's scale is per channel, not per sample"),
        (dict(mul_operand="spatial", add_operand="spatial"), "operand varies along H, not per channel"),
        (dict(extra_reader=True), "the norm's output has another reader"),
        (dict(opset=18), "GroupNormalization-18 has per-group scale/bias"),
    ],
)
def test_leaves_other_graphs_alone(kwargs, why):
    opset = kwargs.pop("opset", 21)
    model = _scale_shift_model(**kwargs)
    graph = gs.import_onnx(model)
    graph.opset = opset  # onnx's checker refuses a GroupNormalization-18 model outright; the pass must too
    before = fingerprint(graph)
    graph, count = fold_norm_scale_shift(graph)
    assert count == 0, why
    assert fingerprint(graph) == before


def test_two_index_tensors_fold_only_the_first_operand():
    model = _scale_shift_model(second_index=True)
    graph, count = fold_norm_scale_shift(gs.import_onnx(model))
    after = to_model(graph)
    # Mul (by t_index) folds; the Add gathered by another index stays a separate node
    assert count == 1 and ops(after)["Add"] == 1 and "Mul" not in ops(after)
    feeds = _feeds(model, 2)
    feeds["t2"] = np.array([4], dtype=np.int64)
    np.testing.assert_allclose(run_ort(after, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_idempotent():
    graph, first = fold_norm_scale_shift(gs.import_onnx(_scale_shift_model()))
    snapshot = fingerprint(graph)
    graph, second = fold_norm_scale_shift(graph)
    assert (first, second) == (1, 0)
    assert fingerprint(graph) == snapshot


def test_shares_one_squeeze_between_norms():
    """Two norms gathered by the same t_index read one Squeeze'd scalar."""
    inits, nodes = [], []
    for k in range(2):
        inits += [_arr(f"g{k}", 1 + 0.3 * RNG.standard_normal(C)), _arr(f"b{k}", 0.3 * RNG.standard_normal(C)),
                  _arr(f"m{k}t", RNG.standard_normal((T, C, 1, 1))), _arr(f"a{k}t", RNG.standard_normal((T, C, 1, 1)))]
        src = "x" if k == 0 else "y0"
        nodes += [helper.make_node("GroupNormalization", [src, f"g{k}", f"b{k}"], [f"n{k}"], num_groups=G),
                  helper.make_node("Gather", [f"m{k}t", "t_index"], [f"m{k}"], axis=0),
                  helper.make_node("Gather", [f"a{k}t", "t_index"], [f"a{k}"], axis=0),
                  helper.make_node("Mul", [f"n{k}", f"m{k}"], [f"nm{k}"]),
                  helper.make_node("Add", [f"nm{k}", f"a{k}"], [f"y{k}"])]
    model = make_model(nodes, [VI("x", TensorProto.FLOAT, [1, C, 4, 4]), VI("t_index", TensorProto.INT64, [1])],
                       [VI("y1", TensorProto.FLOAT, [1, C, 4, 4])], inits)
    model.graph.value_info.append(VI("y0", TensorProto.FLOAT, [1, C, 4, 4]))
    graph, count = fold_norm_scale_shift(gs.import_onnx(model))
    after = to_model(graph)
    assert count == 2 and ops(after) == {"GroupNormalization": 2, "Gather": 4, "Squeeze": 1}
    feeds = {"x": RNG.standard_normal((1, C, 4, 4)).astype(np.float32), "t_index": np.array([3], dtype=np.int64)}
    np.testing.assert_allclose(run_ort(after, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(batch=2), "gathered operand needs a static batch of 1"),
        (dict(mul_operand="spatial", add_operand="spatial"), "Mul operand is not a per-channel constant or gathered table row"),
        (dict(extra_reader=True), "output has other readers (or is a graph output)"),
        (dict(opset=18), "opset 18 < 21"),
    ],
)
def test_skip_reasons(kwargs, reason):
    opset = kwargs.pop("opset", 21)
    graph = gs.import_onnx(_scale_shift_model(**kwargs))
    graph.opset = opset
    graph, count, skipped = run_with_skips(fold_norm_scale_shift, graph)
    assert count == 0 and skipped == {reason: 1}


def test_skip_reason_of_an_already_folded_norm():
    graph, first = fold_norm_scale_shift(gs.import_onnx(_scale_shift_model()))
    graph, second, skipped = run_with_skips(fold_norm_scale_shift, graph)
    assert (first, second) == (1, 0)
    assert skipped == {"scale/bias are not constant [C] vectors (already folded?)": 1}
