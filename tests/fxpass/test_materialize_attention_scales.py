"""materialize_attention_scales: 1/sqrt(sqrt(ch)) to a constant, folded into the qkv q and k rows.

Before::                                            After::

    qkv = conv1d(h); ch = qkv.shape[1] // 6             qkv = conv1d'(h)  (q, k rows × s)
    s = 1 / sqrt(sqrt(ch))                               q, k, v = split(reshape(qkv), ch)
    q, k, v = split(reshape(qkv), ch)                    w = einsum(q, k)
    w = einsum(q * s, k * s)
"""

from __future__ import annotations

import math

import pytest
import torch
from user_models import TinyAttention

from fxpass import capture
from fxpass.passes import materialize_attention_scales, strip_asserts


def _tensor_muls(gm):
    """Multiplies whose operand is a tensor (not shape arithmetic on ints)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "mul"
            and any(isinstance(a, torch.fx.Node) and "fxpass_shape" in a.meta for a in n.args)]


def _graph(new_order):
    torch.manual_seed(0)
    model = TinyAttention(channels=8, heads=2, new_order=new_order).eval()
    x = torch.randn(2, 8, 4, 4)
    gm = strip_asserts(capture(model, (x,))).graph_module
    return model, x, gm


@pytest.mark.parametrize("new_order", [False, True])
def test_folds_scale_into_q_and_k_rows(new_order):
    model, x, gm = _graph(new_order)
    assert sum(1 for n in gm.graph.nodes if n.target is math.sqrt) == 2
    weight_before = model.attention.qkv.weight.detach().clone()
    result = materialize_attention_scales(gm)
    assert result.modified
    gm = result.graph_module
    assert not any(n.target is math.sqrt for n in gm.graph.nodes)
    assert _tensor_muls(gm) == []
    assert gm.meta["fxpass_attention_scales"] == {"materialized": 2, "folded": 2}
    assert gm.meta["fxpass_rewrites"]["materialize_attention_scales"] == 4
    # q and k rows scaled by 1/sqrt(sqrt(ch)), v rows unchanged (ch = 8 // 2 = 4)
    scale = 1 / math.sqrt(math.sqrt(4))
    ratio = gm.attention.qkv.weight.detach() / weight_before
    rows = ratio.reshape(24, -1)[:, 0]
    assert sorted(set(round(float(r), 6) for r in rows)) == sorted({round(scale, 6), 1.0})
    assert int((rows - 1.0).abs().lt(1e-6).sum()) == 8  # the 8 v rows
    # the user's model is untouched
    torch.testing.assert_close(model.attention.qkv.weight, weight_before, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=1e-5)


def test_skips_graph_without_scales():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv1d(4, 4, 1)))
    result = materialize_attention_scales(gm, example_inputs=(torch.randn(1, 4, 3),))
    assert not result.modified


def test_skips_fold_when_scaled_channels_are_read_elsewhere():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv1d(4, 4, 1)

        def forward(self, x):
            p = self.proj(x)
            return p * (1 / math.sqrt(p.shape[1])) + p  # p is also read unscaled

    torch.manual_seed(0)
    model, x = Shared().eval(), torch.randn(1, 4, 3)
    gm = capture(model, (x,))
    result = materialize_attention_scales(gm)
    gm = result.graph_module
    assert gm.meta["fxpass_attention_scales"] == {"materialized": 1, "folded": 0}
    assert [m.args[1] for m in _tensor_muls(gm)] == [0.5]
    torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("new_order", [False, True])
def test_idempotent(new_order):
    model, x, gm = _graph(new_order)
    gm = materialize_attention_scales(gm).graph_module
    code = gm.code
    again = materialize_attention_scales(gm)
    assert not again.modified and again.graph_module.code == code
    with torch.no_grad():
        torch.testing.assert_close(again.graph_module(x), model(x), atol=1e-6, rtol=1e-5)
