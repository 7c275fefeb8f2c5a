"""remove_identities and remove_noop_casts.

remove_identities::    h ─ Dropout(eval) ─ Identity ─ conv      →   h ─ conv
remove_noop_casts::    h ─ float() ─ group_norm ─ type(h.dtype)  →   h ─ group_norm   (h float32)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fxpass import capture
from fxpass.passes import remove_identities, remove_noop_casts


class WithIdentities(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.same = nn.Identity()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.conv(self.same(self.drop(x))).contiguous()


class WithCasts(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(1, 2)

    def forward(self, x):
        h = self.norm(x.float()).type(x.dtype)
        return h.to(torch.float64)  # a genuine cast: stays


def _ops(gm, op, targets):
    return [n for n in gm.graph.nodes if n.op == op and n.target in targets]


def test_remove_identities_structure_numerics_count():
    torch.manual_seed(0)
    model = WithIdentities().eval()
    x = torch.randn(1, 2, 3, 3)
    gm = capture(model, (x,))
    result = remove_identities(gm)
    assert result.modified
    gm = result.graph_module
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv"]
    assert not _ops(gm, "call_method", {"contiguous"})
    assert gm.meta["fxpass_rewrites"]["remove_identities"] == 3
    torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)


def test_remove_identities_skips_training_dropout():
    model = WithIdentities().train()
    gm = torch.fx.symbolic_trace(model)
    gm = remove_identities(gm).graph_module
    assert "drop" in [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_remove_identities_idempotent():
    gm = remove_identities(capture(WithIdentities().eval(), (torch.randn(1, 2, 3, 3),))).graph_module
    assert not remove_identities(gm).modified


def test_remove_noop_casts_structure_numerics_count():
    torch.manual_seed(0)
    model = WithCasts().eval()
    x = torch.randn(1, 2, 3, 3)
    gm = capture(model, (x,))
    result = remove_noop_casts(gm)
    gm = result.graph_module
    assert result.modified and gm.meta["fxpass_rewrites"]["remove_noop_casts"] == 2
    casts = [n.target for n in gm.graph.nodes if n.op == "call_method"]
    assert casts == ["to"]
    torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)


def test_remove_noop_casts_skips_real_casts():
    model = WithCasts().eval()
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)  # x.float() is a real cast here
    gm = capture(model, (x,))
    result = remove_noop_casts(gm)
    gm = result.graph_module
    assert "float" in [n.target for n in gm.graph.nodes if n.op == "call_method"]
    torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)


def test_remove_noop_casts_idempotent():
    gm = remove_noop_casts(capture(WithCasts().eval(), (torch.randn(1, 2, 3, 3),))).graph_module
    assert not remove_noop_casts(gm).modified
