"""capture(): unmodified guided-diffusion code into torch.fx, with guards, asserts and math nodes."""

from __future__ import annotations

import math
import operator

import pytest
import torch

from fxpass import capture
from fxpass.checkpoint import init_model
from fxpass.concrete_tracer import ASSERT_PREFIX, GUARD_PREFIX
from fxpass.errors import FxpassError

from user_models import BadBranch, FailingAssert, Unsupported, UserUNet

ATOL = 1e-6


def _asserts(gm, prefix):
    return [n for n in gm.graph.nodes if n.target is torch._assert and str(n.args[1]).startswith(prefix)]


def test_captures_small_unet_and_matches_eager(small_cfg, one_thread):
    model = init_model(small_cfg, seed=0)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([7, 7])
    gm = capture(model, (x, t))
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "timesteps"]
    with torch.no_grad():
        ref = model(x, t)
        # the graph is not specialised to the example values: other inputs, same shapes
        x2, t2 = torch.randn(2, 3, 32, 32), torch.tensor([400, 400])
        torch.testing.assert_close(gm(x, t), ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(gm(x2, t2), model(x2, t2), atol=ATOL, rtol=0)


def test_records_the_timestep_check_as_a_guard(small_cfg, one_thread):
    model = init_model(small_cfg, seed=0)
    gm = capture(model, (torch.randn(1, 3, 32, 32), torch.tensor([3])))
    guards = _asserts(gm, GUARD_PREFIX)
    assert len(guards) == 1
    assert "timesteps[0].item() > self.conf.diffusion_steps" in guards[0].args[1]
    assert "unet.py" in guards[0].args[1]
    # the guard holds the condition that held (not (t > steps)); it fails for a larger timestep
    with pytest.raises(AssertionError, match=GUARD_PREFIX):
        gm(torch.randn(1, 3, 32, 32), torch.tensor([small_cfg.diffusion_steps + 1]))


def test_keeps_asserts_shape_arithmetic_and_math_nodes(small_cfg, one_thread):
    model = init_model(small_cfg, seed=0)
    gm = capture(model, (torch.randn(1, 3, 32, 32), torch.tensor([3])))
    asserts = _asserts(gm, ASSERT_PREFIX)
    sources = " ".join(n.args[1] for n in asserts)
    assert "assert x.shape[1] == self.channels" in sources
    assert "assert width % (3 * self.n_heads) == 0" in sources
    sqrt_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is math.sqrt]
    attention_blocks = sum(1 for name, _ in model.named_modules() if name.endswith(".attention"))
    assert len(sqrt_nodes) == 2 * attention_blocks  # 1 / sqrt(sqrt(ch)) per attention
    assert any(n.target is operator.floordiv for n in gm.graph.nodes)  # ch = width // (3 * heads)


def test_graph_stays_at_the_torch_level(small_cfg, one_thread):
    model = init_model(small_cfg, seed=0)
    gm = capture(model, (torch.randn(1, 3, 32, 32), torch.tensor([3])))
    modules = {type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"}
    assert {"Conv2d", "Conv1d", "Linear", "SiLU"} <= modules
    # the sliced Sequential of ResBlock.out_layers[1:] is traced through, its layers named
    assert any(".out_layers.3" in str(n.target) for n in gm.graph.nodes if n.op == "call_module")


def test_specialises_optional_arguments_away(small_cfg, one_thread):
    model = init_model(small_cfg.replace(class_cond=True), seed=0)
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([5, 5]), torch.tensor([3, 9])
    gm = capture(model, {"x": x, "timesteps": t, "y": y})
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "timesteps", "y"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x, t, y), model(x, t, y), atol=ATOL, rtol=0)


def test_fp16_model_captures(small_cfg, one_thread):
    from fxpass.config import build_model

    torch.manual_seed(0)
    model = build_model(small_cfg, fp16=True)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([5])
    gm = capture(model, (x, t))
    with torch.no_grad():
        ref = model(x, t)
        torch.testing.assert_close(gm(x, t), ref, atol=1e-3, rtol=0)
    casts = [n for n in gm.graph.nodes if n.op == "call_method" and n.target in ("type", "float")]
    assert casts, "fp16 models keep their casts as nodes"


def test_use_checkpoint_runs_inline(small_cfg, one_thread):
    model = init_model(small_cfg.replace(use_checkpoint=True), seed=0)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([5])
    gm = capture(model, (x, t))
    with torch.no_grad():
        torch.testing.assert_close(gm(x, t), model(x, t), atol=ATOL, rtol=0)
    assert not any("apply" in str(n.target) for n in gm.graph.nodes)


def test_leaves_the_user_model_untouched(small_cfg, one_thread):
    model = init_model(small_cfg, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    capture(model, (torch.randn(1, 3, 32, 32), torch.tensor([3])))
    assert model.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_data_branch_becomes_a_guard():
    gm = capture(BadBranch(), (torch.ones(2),))
    guards = _asserts(gm, GUARD_PREFIX)
    assert len(guards) == 1 and "x.sum() > 0" in guards[0].args[1]
    torch.testing.assert_close(gm(torch.ones(2)), torch.full((2,), 2.0))
    with pytest.raises(AssertionError):
        gm(-torch.ones(2))


def test_error_names_the_users_source_line():
    with pytest.raises(FxpassError) as info:
        capture(Unsupported(), (torch.ones(2),))
    message = str(info.value)
    assert "user_models.py" in message and "np.asarray(x)" in message
    assert "\n" not in message


def test_failing_assert_at_the_example_is_an_error():
    with pytest.raises(FxpassError, match="assert fails on the example inputs"):
        capture(FailingAssert(), (torch.ones(1, 3),))


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("scale_shift", [True, False])
def test_captures_a_users_own_copy(new_order, scale_shift, one_thread):
    torch.manual_seed(0)
    model = UserUNet(new_order=new_order, scale_shift=scale_shift).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 10])
    gm = capture(model, (x, t))
    assert len(_asserts(gm, GUARD_PREFIX)) == 1
    assert len(_asserts(gm, ASSERT_PREFIX)) >= 5
    with torch.no_grad():
        torch.testing.assert_close(gm(x, t), model(x, t), atol=ATOL, rtol=0)


def test_rejects_non_modules():
    with pytest.raises(FxpassError, match="expected a torch.nn.Module"):
        capture(lambda x: x, (torch.ones(1),))
