"""rewrite_einsum_attention: the attention einsums become Transpose + MatMul.

    before:  q ─┐                                   w ─┐
                Einsum("bct,bcs->bts") ─▶ w            Einsum("bts,bcs->bct")
             k ─┘                                   v ─┘
    after:   q ─▶ Transpose(0,2,1) ─▶ MatMul ◀─ k    v ─▶ MatMul ◀─ Transpose(0,2,1) ◀─ w
"""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper
from surgery_helpers import fingerprint, make_model, ops, randomize, run_ort, run_reference, run_with_skips, to_model

from surgery.rewrite_einsum_attention import plan_einsum, rewrite_einsum_attention

SIZES = dict(b=2, c=3, t=4, s=5, h=2, q=3, k=4, d=6, i=3, j=4)


def _einsum_model(equation, shapes):
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip("AB", shapes)]
    out_shape = np.einsum(equation.replace(" ", ""), *(np.zeros(s) for s in shapes)).shape
    return make_model(
        [helper.make_node("Einsum", ["A", "B"], ["Y"], equation=equation)],
        inputs,
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_shape)],
        opset=18,
    )


def _attention_model(torch_export, new_order):
    import torch

    from fxpass.models.layers import AttentionBlock

    x = torch.randn(2, 64, 4, 4)
    return torch_export(
        f"attention_{new_order}",
        lambda: randomize(AttentionBlock(64, num_heads=4, use_new_attention_order=new_order)),
        (x,),
    ), x.numpy()


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy", "new_order"])
def test_rewrites_attention_block_einsums(torch_export, new_order):
    (model, expected), x = _attention_model(torch_export, new_order)
    assert ops(model)["Einsum"] == 2
    graph, count = rewrite_einsum_attention(gs.import_onnx(model))
    after = to_model(graph)
    assert count == 2
    hist = ops(after)
    assert "Einsum" not in hist and hist["MatMul"] == 2 and hist["Transpose"] == 2  # one transpose per einsum
    (before_out,) = run_ort(model, {"x": x})
    (got,) = run_ort(after, {"x": x})
    np.testing.assert_allclose(got, before_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    (ref,) = run_reference(after, {"x": x})
    np.testing.assert_allclose(ref, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "equation, transposes",
    [
        ("bct,bcs->bts", 1),
        ("bts,bcs->bct", 1),
        ("bhqd,bhkd->bhqk", 1),
        ("bhqk,bhkd->bhqd", 0),
        ("ij,jk->ik", 0),
        ("ij,jk", 0),  # implicit output "ik"
        ("ik,jk->ij", 1),
        ("bij,bjk->bki", 1),
        ("tbc,bsc->bts", 2),
        (" b c t , b c s -> b t s ", 1),
    ],
)
def test_family_equations_match_numpy(equation, transposes):
    a_term, b_term = equation.replace(" ", "").split("->")[0].split(",")
    shapes = [[SIZES[c] for c in a_term], [SIZES[c] for c in b_term]]
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    graph, count = rewrite_einsum_attention(gs.import_onnx(_einsum_model(equation, shapes)))
    after = to_model(graph)
    assert count == 1
    assert ops(after)["MatMul"] == 1 and ops(after)["Transpose"] == transposes and "Einsum" not in ops(after)
    (got,) = run_ort(after, {"A": a, "B": b})
    np.testing.assert_allclose(got, np.einsum(equation.replace(" ", ""), a, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "equation",
    ["bii,bij->bj", "...ij,...jk->...ik", "bcd,bce->be", "ab,cd->abcd", "bik,bjk->b", "bcd,bcd->b", "ab,bc,cd->ad"],
)
def test_skips_equations_outside_the_family(equation):
    assert plan_einsum(equation) is None


def test_skips_graph_without_family_einsum():
    model = _einsum_model("bcd,bcd->b", [[2, 3, 4], [2, 3, 4]])
    graph = gs.import_onnx(model)
    before = fingerprint(graph)
    graph, count = rewrite_einsum_attention(graph)
    assert count == 0
    assert fingerprint(graph) == before


def test_keeps_output_name_when_einsum_writes_graph_output():
    graph, _ = rewrite_einsum_attention(gs.import_onnx(_einsum_model("bij,bjk->bki", [[2, 3, 4], [2, 4, 5]])))
    assert [t.name for t in graph.outputs] == ["Y"]
    assert graph.outputs[0].inputs[0].op == "Transpose"


def test_idempotent(torch_export):
    (model, _), _ = _attention_model(torch_export, False)
    graph, first = rewrite_einsum_attention(gs.import_onnx(model))
    before = fingerprint(graph)
    graph, second = rewrite_einsum_attention(graph)
    assert first == 2 and second == 0
    assert fingerprint(graph) == before


@pytest.mark.parametrize(
    "equation, shapes, reason",
    [
        ("bcd,bcd->b", [[2, 3, 4], [2, 3, 4]], "2 summed letters (MatMul sums one)"),
        ("ab,cd->abcd", [[2, 3], [4, 5]], "0 summed letters (MatMul sums one)"),
        ("bcd,bce->be", [[2, 3, 4], [2, 3, 5]], "a letter is summed within one operand"),
        ("bii,bij->bj", [[2, 3, 3], [2, 3, 4]], "an operand repeats a letter or has a non-letter index"),
        ("...ij,...jk->...ik", [[2, 3, 4], [2, 4, 5]], "equation has an ellipsis"),
    ],
)
def test_skip_reasons(equation, shapes, reason):
    _, count, skipped = run_with_skips(rewrite_einsum_attention, gs.import_onnx(_einsum_model(equation, shapes)))
    assert count == 0 and skipped == {reason: 1}
    assert plan_einsum(equation) is None
