"""strip_asserts: asserts and guards that hold at the captured shapes go, with their shape arithmetic.

Before::                                       After::

    s = x.shape; w = s[1]                          x ─ reshape(2, 4, 5) ─ mul
    _assert(w % 2 == 0, "fxpass assert: ...")
    x ─ reshape(b * 2, w // 2, t) ─ mul
"""

from __future__ import annotations

import operator

import pytest
import torch
from user_models import AssertThenReshape

from fxpass import capture
from fxpass.errors import FxpassError
from fxpass.passes import strip_asserts


def _asserts(gm):
    return [n for n in gm.graph.nodes if n.target is torch._assert]


def test_removes_true_asserts_and_their_arithmetic():
    x = torch.randn(1, 8, 5)
    gm = capture(AssertThenReshape(), (x,))
    assert len(_asserts(gm)) == 1
    mods_before = sum(1 for n in gm.graph.nodes if n.target is operator.mod)
    result = strip_asserts(gm)
    assert result.modified
    gm = result.graph_module
    assert _asserts(gm) == []
    assert mods_before == 1 and not any(n.target is operator.mod for n in gm.graph.nodes)
    assert gm.meta["fxpass_rewrites"]["strip_asserts"] == 1
    torch.testing.assert_close(gm(x), AssertThenReshape()(x), atol=0, rtol=0)


def test_assert_false_at_the_shapes_is_an_error():
    x = torch.randn(1, 8, 5)
    gm = capture(AssertThenReshape(heads=2), (x,))
    # pretend the graph was captured for 3 heads: the recorded fact no longer holds
    gm.meta["fxpass_example_inputs"] = {"x": torch.randn(1, 7, 5)}
    for node in gm.graph.nodes:
        node.meta.pop("fxpass_value", None)
        node.meta.pop("fxpass_shape", None)
    with pytest.raises(FxpassError, match="false at the captured shapes.*width % self.heads"):
        strip_asserts(gm)


def test_skips_data_dependent_guards():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x + 1 if x.sum() > 0 else x

    gm = capture(Branchy(), (torch.ones(3),))
    result = strip_asserts(gm)
    assert not result.modified
    assert len(_asserts(result.graph_module)) == 1  # a value guard cannot be proved from shapes


def test_skips_graph_without_asserts():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    result = strip_asserts(gm)
    assert not result.modified


def test_idempotent():
    gm = strip_asserts(capture(AssertThenReshape(), (torch.randn(1, 8, 5),))).graph_module
    code = gm.code
    again = strip_asserts(gm)
    assert not again.modified and again.graph_module.code == code
