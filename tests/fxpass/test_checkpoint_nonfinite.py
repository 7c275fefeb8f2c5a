"""fxpass.checkpoint.load_model refuses weights with NaN/Inf (naming the first such tensor) unless
``allow_nonfinite=True``: a model built from them only ever outputs non-finite numbers."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from fxpass.checkpoint import first_nonfinite, load_model
from fxpass.errors import FxpassError

pytestmark = pytest.mark.usefixtures("one_thread")


def _save_with(tmp_path, state, name: str, index: tuple, value: float):
    state = OrderedDict((k, v.clone()) for k, v in state.items())
    state[name][index] = value
    path = tmp_path / "ck.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("value, kind", [(math.nan, "NaN"), (math.inf, "Inf"), (-math.inf, "Inf")])
def test_nonfinite_weights_are_refused_naming_the_tensor(tmp_path, small_cfg, small_state, value, kind):
    name = "input_blocks.0.0.weight"
    path = _save_with(tmp_path, small_state, name, (0, 0, 0, 0), value)
    with pytest.raises(FxpassError) as info:
        load_model(path, small_cfg)
    text = str(info.value)
    assert text == f"{path}: tensor {name} has {kind} values (pass --allow-nonfinite to load it anyway)"
    assert "\n" not in text


def test_the_first_bad_tensor_in_the_checkpoint_is_named(tmp_path, small_cfg, small_state):
    names = [k for k, v in small_state.items() if v.ndim >= 1]
    first, later = names[3], names[-2]
    state = OrderedDict((k, v.clone()) for k, v in small_state.items())
    state[later].view(-1)[0] = math.nan
    state[first].view(-1)[-1] = math.inf
    path = tmp_path / "ck.pt"
    torch.save(state, path)
    with pytest.raises(FxpassError, match=f"tensor {first} has Inf values"):
        load_model(path, small_cfg)


def test_allow_nonfinite_loads_it(tmp_path, small_cfg, small_state):
    name = "out.2.bias"
    path = _save_with(tmp_path, small_state, name, (1,), math.nan)
    model = load_model(path, small_cfg, allow_nonfinite=True)
    assert torch.isnan(model.state_dict()[name][1])
    assert not model.training


def test_finite_checkpoints_load_as_before(small_ckpt, small_cfg, small_state):
    model = load_model(small_ckpt, small_cfg)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, small_state[k], atol=0, rtol=0)


def test_trusted_pickled_module_is_checked_too(tmp_path):
    module = nn.Linear(2, 2)
    with torch.no_grad():
        module.bias[0] = math.inf
    path = tmp_path / "module.pt"
    torch.save(module, path)
    with pytest.raises(FxpassError, match="tensor bias has Inf values"):
        load_model(path, trust_pickle=True)
    assert isinstance(load_model(path, trust_pickle=True, allow_nonfinite=True), nn.Linear)


def test_first_nonfinite_skips_integer_tensors_and_reports_both_kinds():
    both = torch.tensor([math.nan, math.inf, 1.0])
    assert first_nonfinite([("steps", torch.tensor([1, 2])), ("w", torch.ones(3)), ("b", both)]) == ("b", "NaN and Inf")
    assert first_nonfinite([("w", torch.ones(3))]) is None
