"""merge_timestep_tables (issue #28): the folded timestep tables gathered once, for routes that convert the fx
graph (--format tflite).  Structure, numerics (bit for bit), negative cases and idempotence."""

from __future__ import annotations

import torch
from user_models import TinyTimeNet, UserUNet

from fxpass import capture
from fxpass.errors import FxpassError
from fxpass.passes import fold_timesteps
from fxpass.passes.merge_timestep_tables import MERGED, merge_timestep_tables

SCHEDULE = [0, 10, 250, 500, 999]


def _folded(model):
    torch.manual_seed(0)
    model = model.eval()
    x = torch.randn(2, 3, 8, 8) if isinstance(model, TinyTimeNet) else torch.randn(2, 3, 16, 16)
    return model, x, fold_timesteps(capture(model, (x, torch.tensor([5, 5]))), SCHEDULE).graph_module


def _gathers(gm):
    return [n for n in gm.graph.nodes if n.target is torch.index_select]


def test_one_gather_reads_every_table():
    _, _, gm = _folded(TinyTimeNet())
    tables = {name: b.clone() for name, b in gm.named_buffers() if name.startswith("_fxpass_ttable")}
    assert len(_gathers(gm)) == len(tables) == 2
    result = merge_timestep_tables(gm)
    assert result.modified and gm.meta["fxpass_rewrites"]["merge_timestep_tables"] == 2
    (gather,) = _gathers(gm)
    assert gather.args[0].target == MERGED
    buffers = dict(gm.named_buffers())
    assert not any(name in buffers for name in tables)  # the separate tables are gone
    merged = buffers[MERGED]
    assert merged.shape == (len(SCHEDULE), sum(t[0].numel() for t in tables.values()))


def test_outputs_equal_bit_for_bit_at_every_index():
    for model in (TinyTimeNet(), UserUNet()):
        _, x, gm = _folded(model)
        before = [gm(x, torch.tensor([i, (i + 2) % len(SCHEDULE)])) for i in range(len(SCHEDULE))]
        merge_timestep_tables(gm)
        after = [gm(x, torch.tensor([i, (i + 2) % len(SCHEDULE)])) for i in range(len(SCHEDULE))]
        for b, a in zip(before, after):
            assert torch.equal(a, b)


def test_idempotent():
    _, x, gm = _folded(UserUNet())
    merge_timestep_tables(gm)
    code = gm.code
    again = merge_timestep_tables(gm)
    assert not again.modified and gm.code == code and len(_gathers(gm)) == 1


def test_a_graph_without_tables_is_left_as_it_is():
    model = TinyTimeNet().eval()
    gm = capture(model, (torch.randn(1, 3, 8, 8), torch.tensor([5])))  # not folded: no tables
    code = gm.code
    assert not merge_timestep_tables(gm).modified and gm.code == code


def test_not_a_graph_module_is_refused():
    import pytest

    with pytest.raises(FxpassError, match="expected a torch.fx.GraphModule"):
        merge_timestep_tables(torch.nn.Linear(2, 2))
