"""`fxpass lower --step-graph`: one whole denoising step (U-Net + posterior), checked against the NumPy loop."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import fxpass
from fxpass.checkpoint import init_model
from fxpass.config import CAMUS
from fxpass.errors import FxpassError
from fxpass.diffusion import Diffusion
from fxpass.schedule import respaced

TINY = CAMUS.replace(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16",
                     diffusion_steps=100, timestep_respacing="10", use_fp16=False)


@pytest.fixture(scope="module")
def eager():
    return init_model(TINY, seed=0)


@pytest.fixture(scope="module")
def step_session(eager):
    model = fxpass.lower(eager, config=TINY, step_graph=True)
    assert [i.name for i in model.graph.input] == ["x", "t_index", "noise"]
    assert [o.name for o in model.graph.output] == ["x_prev", "pred_xstart"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["fxpass.mode"] == "step" and json.loads(meta["fxpass.timesteps"]) == respaced(100, "10")
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_a_whole_loop_matches_the_numpy_loop(eager, step_session):
    kept = respaced(100, "10")
    diffusion = Diffusion.from_config(TINY.to_dict())

    def model(x, t_index):
        with torch.no_grad():
            return eager(torch.from_numpy(x), torch.tensor([kept[int(t)] for t in t_index])).numpy()

    rng = np.random.default_rng(0)
    xa = xb = rng.standard_normal((1, 3, 32, 32), dtype=np.float32)
    for t in reversed(range(len(kept))):
        z = rng.standard_normal((1, 3, 32, 32), dtype=np.float32)
        xa, _ = diffusion.p_sample(model, xa, t, z)
        xb, _ = step_session.run(None, {"x": xb, "t_index": np.array([t]), "noise": z})
    assert np.abs(xa - xb).max() < 1e-3
    assert np.abs(xa).max() > 0.1  # a real image came out, not a vacuous comparison


def test_no_noise_at_the_last_step(step_session):
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)
    a = step_session.run(None, {"x": x, "t_index": np.array([0]), "noise": np.zeros_like(x)})[0]
    b = step_session.run(None, {"x": x, "t_index": np.array([0]), "noise": np.ones_like(x)})[0]
    np.testing.assert_array_equal(a, b)


def test_step_graph_needs_the_schedule(eager):
    with pytest.raises(FxpassError, match="--step-graph needs a config and the respaced schedule"):
        fxpass.lower(eager, config=TINY, timesteps=5, step_graph=True)


def test_cli_step_graph_checks_against_the_numpy_posterior(eager, tmp_path):
    import yaml

    from fxpass.checkpoint import save_checkpoint
    from fxpass.cli import main

    cfg, ckpt = tmp_path / "tiny.yml", tmp_path / "tiny.pt"
    cfg.write_text(yaml.safe_dump(TINY.to_dict()))
    save_checkpoint(eager, ckpt)
    out, report = tmp_path / "step.onnx", tmp_path / "step.json"
    assert main(["lower", str(ckpt), "--config", str(cfg), "-o", str(out), "--step-graph", "--report", str(report)]) == 0
    check = json.loads(report.read_text())["check"]
    assert check["passed"] and check["reference"] == "eager model + NumPy posterior"
    assert {e["output"] for e in check["per_input"]} == {"x_prev", "pred_xstart"}
    # pred_xstart's bound is widened by sqrt(1/abar - 1) at each t_index; x_prev's is not
    assert all("conditioning" not in e for e in check["per_input"] if e["output"] == "x_prev")


def test_class_conditional_step_graph_takes_labels():
    cfg = TINY.replace(class_cond=True, learn_sigma=False)
    eager = init_model(cfg, seed=2)
    model = fxpass.lower(eager, config=cfg, step_graph=True)
    assert [i.name for i in model.graph.input] == ["x", "t_index", "noise", "y"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    kept = respaced(100, "10")
    diffusion = Diffusion.from_config(cfg.to_dict())
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 32, 32), dtype=np.float32)
    z = rng.standard_normal((1, 3, 32, 32), dtype=np.float32)
    y = np.array([7])
    with torch.no_grad():
        out = eager(torch.from_numpy(x), torch.tensor([kept[4]]), torch.from_numpy(y)).numpy()
    mean, log_var, _ = diffusion.p_mean_variance(out, x, 4)  # fixed ("large") variance: 3 output channels
    ref = mean + np.exp(0.5 * log_var) * z
    got = session.run(None, {"x": x, "t_index": np.array([4]), "noise": z, "y": y})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
