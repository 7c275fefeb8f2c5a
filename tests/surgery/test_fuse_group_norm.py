"""fuse_group_norm: torch's InstanceNormalization GroupNorm pattern → GroupNormalization (opset 21).

    before:  x ─▶ Reshape([0,G,-1]) ─▶ InstanceNormalization ─▶ Reshape(x.shape) ─▶ Mul(γ) ─▶ Add(β) ─▶ y
    after:   x ─▶ GroupNormalization(scale=γ, bias=β, num_groups=G) ─▶ y
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from surgery_helpers import fingerprint, make_model, ops, randomize, run_ort, run_reference, run_with_skips, to_model

from surgery.fuse_group_norm import fuse_group_norm

VI = helper.make_tensor_value_info
RNG = np.random.default_rng(0)


def _to21(model):
    return onnx.version_converter.convert_version(model, 21)


def _group_norm32(torch_export, opset=18):
    import torch

    from fxpass.models.layers import GroupNorm32

    def make():
        gn = GroupNorm32(32, 64)
        with torch.no_grad():
            gn.weight.copy_(1 + 0.3 * torch.randn(64))
            gn.bias.copy_(0.3 * torch.randn(64))
        return gn

    x = torch.randn(2, 64, 4, 4) * 3 + 1
    model, expected = torch_export(f"group_norm32_{opset}", make, (x,), opset=opset)
    return model, expected, x.numpy()


def test_fuses_group_norm32_export(torch_export):
    model, expected, x = _group_norm32(torch_export)
    assert ops(model) == {"Reshape": 2, "InstanceNormalization": 1, "Mul": 1, "Add": 1}
    graph, count = fuse_group_norm(gs.import_onnx(_to21(model)))
    after = to_model(graph)
    assert count == 1
    assert ops(after) == {"GroupNormalization": 1}
    (node,) = after.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_groups"] == 32 and attrs["epsilon"] == pytest.approx(1e-5)
    assert [i.name for i in after.graph.input] == ["x"]
    assert [o.name for o in after.graph.output] == [o.name for o in model.graph.output]
    (before_out,) = run_ort(model, {"x": x})
    (got,) = run_ort(after, {"x": x})
    np.testing.assert_allclose(got, before_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    (ref,) = run_reference(after, {"x": x})
    np.testing.assert_allclose(ref, expected, rtol=1e-5, atol=1e-5)


def test_fuses_both_norms_of_a_res_block(torch_export):
    import torch

    from fxpass.models.layers import ResBlock

    x, emb = torch.randn(2, 64, 8, 8), torch.randn(2, 128)
    model, expected = torch_export(
        "resblock", lambda: randomize(ResBlock(64, 128, 0.0, out_channels=96, use_scale_shift_norm=True)), (x, emb)
    )
    assert ops(model)["InstanceNormalization"] == 2
    graph, count = fuse_group_norm(gs.import_onnx(_to21(model)))
    after = to_model(graph)
    assert count == 2
    assert ops(after)["GroupNormalization"] == 2 and "InstanceNormalization" not in ops(after)
    feeds = {"x": x.numpy(), "emb": emb.numpy()}
    (got,) = run_ort(after, feeds)
    np.testing.assert_allclose(got, run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_fuses_dynamic_batch_pattern_with_shape_node(torch_export):
    """With a dynamic batch the Reshape back reads Shape(x) instead of a constant."""
    import torch

    from fxpass.models.layers import AttentionBlock

    x = torch.randn(2, 64, 4, 4)
    model, expected = torch_export(
        "attention_dynamic", lambda: randomize(AttentionBlock(64, num_heads=4)), (x,), dynamic_batch=True
    )
    assert ops(model)["Shape"] == 1
    graph, count = fuse_group_norm(gs.import_onnx(_to21(model)))
    after = to_model(graph)
    assert count == 1
    assert "Shape" not in ops(after) and ops(after)["GroupNormalization"] == 1
    for batch in (1, 3):
        xb = np.random.default_rng(batch).standard_normal((batch, 64, 4, 4)).astype(np.float32)
        np.testing.assert_allclose(run_ort(after, {"x": xb})[0], run_ort(model, {"x": xb})[0], rtol=1e-5, atol=1e-5)


def _pattern_nodes(x="x", out="y", affine=("gamma", "beta"), gamma_first=False):
    nodes = [
        helper.make_node("Reshape", [x, "grouped"], ["g"]),
        helper.make_node("InstanceNormalization", ["g", "s", "b"], ["n"], epsilon=1e-3),
        helper.make_node("Reshape", ["n", "back"], ["r" if affine else out]),
    ]
    if affine:
        mul_in = [affine[0], "r"] if gamma_first else ["r", affine[0]]
        nodes.append(helper.make_node("Mul", mul_in, ["m" if affine[1] else out]))
        if affine[1]:
            nodes.append(helper.make_node("Add", ["m", affine[1]], [out]))
    return nodes


def _reference_group_norm(x, groups, scale, bias, eps):
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1).astype(np.float64)
    y = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return y.reshape(x.shape) * scale.reshape(shape) + bias.reshape(shape)


def _handmade(dtype=np.float32, affine=("gamma", "beta"), gamma_first=False, opset=21):
    groups, channels = 4, 8
    s = (1 + RNG.standard_normal(groups)).astype(dtype)
    b = RNG.standard_normal(groups).astype(dtype)
    gamma = (1 + 0.5 * RNG.standard_normal((channels, 1, 1))).astype(dtype)
    beta = RNG.standard_normal((channels, 1, 1)).astype(dtype)
    inits = [
        numpy_helper.from_array(np.array([0, groups, -1], np.int64), "grouped"),
        numpy_helper.from_array(np.array([2, channels, 3, 5], np.int64), "back"),
        numpy_helper.from_array(s, "s"),
        numpy_helper.from_array(b, "b"),
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(beta, "beta"),
    ]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = make_model(
        _pattern_nodes(affine=affine, gamma_first=gamma_first),
        [VI("x", elem, [2, channels, 3, 5])],
        [VI("y", elem, [2, channels, 3, 5])],
        inits,
        opset=opset,
    )
    per_group = channels // groups
    scale = np.repeat(s.astype(np.float64), per_group)
    bias = np.repeat(b.astype(np.float64), per_group)
    if affine:
        scale, bias = scale * gamma.ravel(), bias * gamma.ravel()
        if affine[1]:
            bias = bias + beta.ravel()
    return model, lambda x: _reference_group_norm(x, groups, scale, bias, 1e-3)


@pytest.mark.parametrize(
    "affine, gamma_first",
    [(("gamma", "beta"), False), (("gamma", "beta"), True), (("gamma", None), False), ((), False)],
    ids=["mul_add", "gamma_first", "mul_only", "no_affine"],
)
def test_folds_per_group_scale_and_optional_affine(affine, gamma_first):
    model, reference = _handmade(affine=affine, gamma_first=gamma_first)
    graph, count = fuse_group_norm(gs.import_onnx(model))
    after = to_model(graph)
    assert count == 1
    assert ops(after) == {"GroupNormalization": 1}
    x = RNG.standard_normal((2, 8, 3, 5)).astype(np.float32)
    (got,) = run_ort(after, {"x": x})
    np.testing.assert_allclose(got, run_ort(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)
    (ref,) = run_reference(after, {"x": x})
    np.testing.assert_allclose(ref, reference(x), rtol=1e-5, atol=1e-5)


def _with_casts():
    """h:f16 ─▶ Cast(f32) ─▶ pattern ─▶ Cast(f16) ─▶ y (GroupNorm32 on a float16 tensor)."""
    model, reference = _handmade()
    g = model.graph
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == "x":
                node.input[i] = "x32"
        for i, name in enumerate(node.output):
            if name == "y":
                node.output[i] = "y32"
    g.node.insert(0, helper.make_node("Cast", ["h"], ["x32"], to=TensorProto.FLOAT))
    g.node.append(helper.make_node("Cast", ["y32"], ["y"], to=TensorProto.FLOAT16))
    del g.input[:]
    del g.output[:]
    g.input.append(VI("h", TensorProto.FLOAT16, [2, 8, 3, 5]))
    g.output.append(VI("y", TensorProto.FLOAT16, [2, 8, 3, 5]))
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model), reference


@pytest.mark.parametrize("absorb", [False, True], ids=["casts_kept", "casts_absorbed"])
def test_cast_pairs_around_the_pattern(absorb):
    model, reference = _with_casts()
    graph, count = fuse_group_norm(gs.import_onnx(model), absorb_casts=absorb)
    after = to_model(graph)
    assert count == 1
    if absorb:
        assert ops(after) == {"GroupNormalization": 1}
        assert after.graph.node[0].input[0] == "h"  # runs on the float16 tensor (stash_type=1)
    else:
        assert ops(after) == {"Cast": 2, "GroupNormalization": 1}
    assert [o.name for o in after.graph.output] == ["y"]
    h = (RNG.standard_normal((2, 8, 3, 5)) * 4).astype(np.float16)
    expected = reference(h.astype(np.float32))
    (got,) = run_ort(after, {"h": h})
    assert got.dtype == np.float16
    # float16 output: one rounding (kept casts) or a float16 scale/bias step (absorbed)
    if absorb:
        np.testing.assert_allclose(got.astype(np.float32), expected, rtol=2e-3, atol=8e-3)
    else:
        np.testing.assert_allclose(got.astype(np.float32), expected, rtol=1e-3, atol=4e-3)


def test_skips_opset_below_21(torch_export):
    model, _, _ = _group_norm32(torch_export)
    graph = gs.import_onnx(model)  # opset 18: GroupNormalization-18 has per-group scale/bias
    before = fingerprint(graph)
    graph, count = fuse_group_norm(graph)
    assert count == 0
    assert fingerprint(graph) == before


def test_skips_export_already_fused_at_opset_21(torch_export):
    model, _, _ = _group_norm32(torch_export, opset=21)
    assert ops(model) == {"GroupNormalization": 1}
    graph, count = fuse_group_norm(gs.import_onnx(model))
    assert count == 0 and ops(graph) == {"GroupNormalization": 1}


def test_skips_plain_instance_norm_and_shared_intermediate():
    inits = [
        numpy_helper.from_array(np.ones(8, np.float32), "s"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b"),
        numpy_helper.from_array(np.array([0, 4, -1], np.int64), "grouped"),
        numpy_helper.from_array(np.array([2, 8, 3, 5], np.int64), "back"),
        numpy_helper.from_array(np.ones(4, np.float32), "s4"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b4"),
    ]
    nodes = [
        helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"]),  # a real instance norm
        helper.make_node("Reshape", ["x", "grouped"], ["g"]),
        helper.make_node("InstanceNormalization", ["g", "s4", "b4"], ["n"]),
        helper.make_node("Reshape", ["n", "back"], ["z"]),
        helper.make_node("ReduceMean", ["g"], ["gm"], keepdims=0),  # the grouped view is read elsewhere
    ]
    model = make_model(
        nodes,
        [VI("x", TensorProto.FLOAT, [2, 8, 3, 5])],
        [VI("y", TensorProto.FLOAT, [2, 8, 3, 5]), VI("z", TensorProto.FLOAT, [2, 8, 3, 5]),
         VI("gm", TensorProto.FLOAT, [])],
        inits,
    )
    graph = gs.import_onnx(model)
    before = fingerprint(graph)
    graph, count = fuse_group_norm(graph)
    assert count == 0
    assert fingerprint(graph) == before


def test_idempotent(torch_export):
    model, _, _ = _group_norm32(torch_export)
    graph, first = fuse_group_norm(gs.import_onnx(_to21(model)))
    before = fingerprint(graph)
    graph, second = fuse_group_norm(graph)
    assert first == 1 and second == 0
    assert fingerprint(graph) == before


def test_skip_reasons(torch_export):
    inits = [numpy_helper.from_array(np.ones(8, np.float32), "s"), numpy_helper.from_array(np.zeros(8, np.float32), "b"),
             numpy_helper.from_array(np.array([0, 4, -1], np.int64), "grouped"),
             numpy_helper.from_array(np.array([2, 8, 3, 5], np.int64), "back"),
             numpy_helper.from_array(np.ones(4, np.float32), "s4"), numpy_helper.from_array(np.zeros(4, np.float32), "b4")]
    nodes = [helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"]),
             helper.make_node("Reshape", ["x", "grouped"], ["g"]),
             helper.make_node("InstanceNormalization", ["g", "s4", "b4"], ["n"]),
             helper.make_node("Reshape", ["n", "back"], ["z"]),
             helper.make_node("ReduceMean", ["g"], ["gm"], keepdims=0)]
    model = make_model(nodes, [VI("x", TensorProto.FLOAT, [2, 8, 3, 5])],
                       [VI("y", TensorProto.FLOAT, [2, 8, 3, 5]), VI("z", TensorProto.FLOAT, [2, 8, 3, 5]),
                        VI("gm", TensorProto.FLOAT, [])], inits)
    _, count, skipped = run_with_skips(fuse_group_norm, gs.import_onnx(model))
    assert count == 0
    assert skipped == {"input is not a Reshape (a plain InstanceNorm)": 1, "grouped view has other readers": 1}
    model, _, _ = _group_norm32(torch_export)  # opset 18
    _, count, skipped = run_with_skips(fuse_group_norm, gs.import_onnx(model))
    assert count == 0 and skipped == {"opset 18 < 21": 1}
