"""remove_cast_pairs: no-op casts and lossless round trips go, lossy round trips stay.

    before:  x:f32 ─▶ Cast(f64) ─▶ Cast(f32) ─▶ Cast(f32) ─▶ Add ◀─ Cast(f16) ◀─ Cast(f32) ◀─ h:f16
    after:   x:f32 ─────────────────────────────────────────▶ Add ◀─ Cast(f32) ◀─ h:f16
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper
from surgery_helpers import fingerprint, make_model, ops, run_ort, run_reference, run_with_skips, to_model

from surgery.remove_cast_pairs import holds_exactly, remove_cast_pairs

VI = helper.make_tensor_value_info
RNG = np.random.default_rng(0)
X = (RNG.standard_normal((3, 4)) * 100).astype(np.float32)
H = RNG.standard_normal((3, 4)).astype(np.float16)
I = RNG.integers(-(2**31) + 1, 2**31 - 1, (3, 4), dtype=np.int64).astype(np.int32)


def cast(src, dst, to):
    return helper.make_node("Cast", [src], [dst], to=to)


def _model():
    nodes = [
        cast("x", "x64", TensorProto.DOUBLE),
        cast("x64", "x32", TensorProto.FLOAT),  # f32 → f64 → f32: lossless
        cast("x32", "xx", TensorProto.FLOAT),  # f32 → f32: no-op
        cast("h", "h32", TensorProto.FLOAT),
        cast("h32", "h16", TensorProto.FLOAT16),  # f16 → f32 → f16: lossless
        cast("h16", "hf", TensorProto.FLOAT),
        helper.make_node("Add", ["xx", "hf"], ["y"]),
        helper.make_node("Neg", ["i"], ["n"]),
        cast("n", "n64", TensorProto.INT64),
        cast("n64", "j", TensorProto.INT32),  # i32 → i64 → i32: lossless, writes a graph output
    ]
    return make_model(
        nodes,
        [VI("x", TensorProto.FLOAT, [3, 4]), VI("h", TensorProto.FLOAT16, [3, 4]), VI("i", TensorProto.INT32, [3, 4])],
        [VI("y", TensorProto.FLOAT, [3, 4]), VI("j", TensorProto.INT32, [3, 4])],
    )


def _feeds():
    return {"x": X, "h": H, "i": I}


def test_removes_noop_and_lossless_round_trips():
    model = onnx.shape_inference.infer_shapes(_model())
    graph, count = remove_cast_pairs(gs.import_onnx(model))
    after = to_model(graph)
    assert count == 4  # x32→xx no-op, the f64 pair, the f16 pair, the int32 pair
    assert ops(model) == {"Cast": 8, "Add": 1, "Neg": 1}
    assert ops(after) == {"Cast": 1, "Add": 1, "Neg": 1}  # h ─▶ Cast(f32) ─▶ Add; Neg now writes j
    assert [o.name for o in after.graph.output] == ["y", "j"]
    expected = run_ort(model, _feeds())
    got = run_ort(after, _feeds())
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)
    ref = run_reference(after, _feeds())
    np.testing.assert_allclose(ref[0], X + H.astype(np.float32), rtol=0, atol=0)
    np.testing.assert_array_equal(ref[1], -I)


def test_skips_lossy_round_trips():
    nodes = [
        cast("x", "x16", TensorProto.FLOAT16),
        cast("x16", "y", TensorProto.FLOAT),  # f32 → f16 → f32 rounds: kept
        cast("i", "if", TensorProto.FLOAT),
        cast("if", "j", TensorProto.INT64),  # i64 → f32 → i64 loses digits: kept
    ]
    model = make_model(
        nodes,
        [VI("x", TensorProto.FLOAT, [3, 4]), VI("i", TensorProto.INT64, [3, 4])],
        [VI("y", TensorProto.FLOAT, [3, 4]), VI("j", TensorProto.INT64, [3, 4])],
    )
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    before = fingerprint(graph)
    graph, count = remove_cast_pairs(graph)
    assert count == 0
    assert fingerprint(graph) == before
    big = np.array([[2**40 + 1] * 4] * 3, np.int64)
    y, j = run_ort(graph, {"x": X, "i": big})
    assert not np.array_equal(j, big)  # the kept pair really is lossy


def test_skips_unknown_source_type():
    # no value info for "a": the pass cannot tell whether Cast(to=float) is a no-op
    nodes = [helper.make_node("Relu", ["x"], ["a"]), cast("a", "y", TensorProto.FLOAT)]
    model = make_model(nodes, [VI("x", TensorProto.FLOAT, [3])], [VI("y", TensorProto.FLOAT, [3])])
    graph = gs.import_onnx(model)
    graph.tensors()["a"].dtype = None
    before = fingerprint(graph)
    graph, count = remove_cast_pairs(graph)
    assert count == 0
    assert fingerprint(graph) == before


@pytest.mark.parametrize(
    "narrow, wide, expected",
    [
        (np.float16, np.float32, True),
        (np.float32, np.float64, True),
        (np.float32, np.float16, False),
        (np.float16, np.float64, True),
        (np.int8, np.float16, True),
        (np.uint8, np.float16, True),
        (np.int16, np.float16, False),
        (np.int16, np.float32, True),
        (np.int32, np.float32, False),
        (np.int32, np.float64, True),
        (np.int64, np.float64, False),
        (np.uint8, np.int8, False),
        (np.uint8, np.int16, True),
        (np.int8, np.uint16, False),
        (np.bool_, np.float16, True),
    ],
)
def test_holds_exactly_matches_numpy(narrow, wide, expected):
    """The table agrees with a brute-force round trip over (a sample of) the narrow type's values."""
    to_onnx = onnx.helper.np_dtype_to_tensor_dtype
    assert holds_exactly(to_onnx(np.dtype(wide)), to_onnx(np.dtype(narrow))) is expected
    if np.dtype(narrow).kind == "f":
        bits = np.arange(2 ** (8 * np.dtype(narrow).itemsize) if np.dtype(narrow).itemsize <= 2 else 2**20,
                         dtype=np.uint64)
        if np.dtype(narrow).itemsize > 2:  # float32: a spread of bit patterns incl. subnormals
            bits = np.concatenate([bits, bits * 4093 % 2**32]).astype(np.uint32)
        values = bits.astype(f"u{np.dtype(narrow).itemsize}").view(narrow)
        values = values[np.isfinite(values)]
    elif np.dtype(narrow).kind == "b":
        values = np.array([False, True])
    else:
        info = np.iinfo(narrow)
        values = np.array(sorted({info.min, info.min + 1, max(-1, info.min), 0, 1, info.max - 1, info.max}), dtype=narrow)
    # exact: the wide type holds each value (compared as Python numbers: no integer wrap-around)
    with np.errstate(all="ignore"):
        wide_values = values.astype(wide)
    exact = all(float(w) == float(v) and (np.dtype(narrow).kind == "f" or int(w) == int(v))
                for w, v in zip(wide_values.tolist(), values.tolist()))
    assert exact is expected


def test_idempotent():
    graph, first = remove_cast_pairs(gs.import_onnx(onnx.shape_inference.infer_shapes(_model())))
    before = fingerprint(graph)
    graph, second = remove_cast_pairs(graph)
    assert first == 4 and second == 0
    assert fingerprint(graph) == before


def test_skip_reasons_name_the_casts_that_stay():
    nodes = [cast("x", "x16", TensorProto.FLOAT16), cast("x16", "y", TensorProto.FLOAT),  # lossy round trip
             helper.make_node("Relu", ["x"], ["a"]), cast("a", "z", TensorProto.DOUBLE)]  # unknown source type
    model = make_model(nodes, [VI("x", TensorProto.FLOAT, [3, 4])],
                       [VI("y", TensorProto.FLOAT, [3, 4]), VI("z", TensorProto.DOUBLE, [3, 4])])
    graph = gs.import_onnx(model)
    graph.tensors()["a"].dtype = None
    _, count, skipped = run_with_skips(remove_cast_pairs, graph)
    # the first Cast of the lossy pair is a real conversion
    assert count == 0
    assert skipped == {"a real conversion (not a round trip)": 1, "a lossy round trip": 1,
                       "source or target type unknown": 1}
    # only the casts still there afterwards are reported (not the first halves of the pairs removed)
    _, count, skipped = run_with_skips(remove_cast_pairs, gs.import_onnx(onnx.shape_inference.infer_shapes(_model())))
    assert count == 4 and skipped == {"a real conversion (not a round trip)": 1}
