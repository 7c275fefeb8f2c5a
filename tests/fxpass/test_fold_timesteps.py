"""fold_timesteps: the timestep cone folded to constants (fixed) or gathered tables (t_index).

Before::                                        After (table)::

    timesteps ─ item ─ gt ─ _assert (guard)         t_index ─ index_select(table0) ─┐
    timesteps ─ sinusoid ─ mlp ─ chunk ─ 1+s ─┐                 index_select(table1) ─┤
    x ─ conv ─────────────────────────── mul ─ add   x ─ conv ────────────── mul ─ add
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.passes.infra.pass_manager import PassManager
from user_models import TinyTimeNet, UserUNet

from fxpass import capture
from fxpass.errors import FxpassError
from fxpass.passes import FoldTimesteps, fold_timesteps

SCHEDULE = [0, 10, 250, 500, 999]


def _captured(model=None, t=5):
    torch.manual_seed(0)
    model = model or TinyTimeNet().eval()
    x = torch.randn(2, 3, 8, 8)
    return model, x, capture(model, (x, torch.tensor([t, t])))


def _placeholders(gm):
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def test_table_mode_structure_and_count():
    model, x, gm = _captured()
    result = fold_timesteps(gm, SCHEDULE)
    assert result.modified
    gm = result.graph_module
    assert _placeholders(gm) == ["x", "t_index"]
    gathers = [n for n in gm.graph.nodes if n.target is torch.index_select]
    assert len(gathers) == 2  # 1 + scale, shift: the cone goes that deep
    assert gm.meta["fxpass_rewrites"]["fold_timesteps"] == 2
    assert not any(n.target is torch._assert for n in gm.graph.nodes)  # the guard was checked and dropped
    tables = [b for name, b in gm.named_buffers() if name.startswith("_fxpass_ttable")]
    assert all(t.shape[0] == len(SCHEDULE) for t in tables)
    assert not any(n.op == "call_module" and "mlp" in n.target for n in gm.graph.nodes)


@pytest.mark.parametrize("index", range(len(SCHEDULE)))
def test_table_mode_numerics(index):
    model, x, gm = _captured()
    gm = fold_timesteps(gm, SCHEDULE).graph_module
    with torch.no_grad():
        ref = model(x, torch.tensor([SCHEDULE[index]] * 2))
        out = gm(x, torch.tensor([index] * 2))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_table_mode_mixed_indices_in_a_batch():
    model, x, gm = _captured()
    gm = fold_timesteps(gm, SCHEDULE).graph_module
    with torch.no_grad():
        out = gm(x, torch.tensor([1, 4]))
        for row, t in enumerate((SCHEDULE[1], SCHEDULE[4])):
            torch.testing.assert_close(out[row : row + 1], model(x[row : row + 1], torch.tensor([t])),
                                       atol=1e-6, rtol=1e-6)


def test_fixed_mode_removes_the_timestep_input():
    model, x, gm = _captured()
    gm = fold_timesteps(gm, 125).graph_module
    assert _placeholders(gm) == ["x"]
    assert not any(n.target is torch.index_select for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x, torch.tensor([125, 125])), atol=1e-6, rtol=1e-6)


def test_entry_breaking_the_guard_is_named():
    _, _, gm = _captured()
    with pytest.raises(FxpassError, match=r"t_index 2, timestep 1001 breaks fxpass guard.*diffusion_steps"):
        fold_timesteps(gm, [0, 5, 1001])
    _, _, gm = _captured()
    with pytest.raises(FxpassError, match=r"timestep 5000 breaks"):
        fold_timesteps(gm, 5000)


def test_skips_graph_without_a_timestep_input():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    before = gm.code
    result = fold_timesteps(gm, SCHEDULE)
    assert not result.modified and result.graph_module.code == before


def test_idempotent():
    _, x, gm = _captured()
    gm = fold_timesteps(gm, SCHEDULE).graph_module
    code = gm.code
    again = fold_timesteps(gm, SCHEDULE)
    assert not again.modified and again.graph_module.code == code


def test_runs_under_torch_fx_pass_manager():
    model, x, gm = _captured()
    result = PassManager(passes=[FoldTimesteps(SCHEDULE)])(gm)
    assert _placeholders(result.graph_module) == ["x", "t_index"]


def test_works_on_plain_symbolic_trace_graphs():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 4)

        def forward(self, x, t):
            return x * self.lin(t[:, None].float())

    torch.manual_seed(0)
    model = Plain()
    gm = torch.fx.symbolic_trace(model)
    gm = fold_timesteps(gm, [1, 2, 3], example_inputs=(torch.ones(2, 4), torch.tensor([1, 1]))).graph_module
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x, torch.tensor([2, 0])), model(x, torch.tensor([3, 1])), atol=1e-6, rtol=0)


def test_class_conditional_keeps_the_label_path():
    torch.manual_seed(0)
    model = UserUNet(num_classes=10).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 3]), torch.tensor([1, 7])
    gm = capture(model, {"x": x, "timesteps": t, "y": y})
    gm = fold_timesteps(gm, SCHEDULE).graph_module
    assert _placeholders(gm) == ["x", "t_index", "y"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x, torch.tensor([2, 2]), y), model(x, torch.tensor([250, 250]), y),
                                   atol=1e-5, rtol=1e-5)


def test_static_reads_of_the_timestep_outside_the_cone_are_resolved():
    """``assert x.device == timesteps.device`` (a 3-D model's asserts) reads only a static attribute of
    the timestep: it is resolved to the folded input's device, not left holding the timestep input."""
    from user_models import Volume3DNet

    torch.manual_seed(0)
    model = Volume3DNet().eval()
    x = torch.randn(1, 1, 8, 8, 8)
    gm = capture(model, (x, torch.tensor([999])))
    gm = fold_timesteps(gm, SCHEDULE).graph_module
    assert _placeholders(gm) == ["x", "t_index"]
    for k, t in enumerate(SCHEDULE):
        torch.testing.assert_close(gm(x, torch.tensor([k])), model(x, torch.tensor([t])), atol=1e-6, rtol=1e-5)


class _TimestepsMeetX(torch.nn.Module):
    """The timesteps' values meet x with no op of their own first: they are a table of their own."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, timesteps):
        return self.conv(x) * (x.mean(dim=(1, 2, 3)) * timesteps)[:, None, None, None]


def test_timesteps_read_outside_the_cone_become_a_table():
    model = _TimestepsMeetX().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fold_timesteps(capture(model, (x, torch.tensor([5, 5]))), SCHEDULE).graph_module
    assert _placeholders(gm) == ["x", "t_index"]
    for index in range(len(SCHEDULE)):
        with torch.no_grad():
            ref = model(x, torch.tensor([SCHEDULE[index], SCHEDULE[0]]))
            out = gm(x, torch.tensor([index, 0]))
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert not fold_timesteps(gm, SCHEDULE).modified  # idempotent: no timestep input left
