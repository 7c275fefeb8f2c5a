"""The trained reference model (fxpass/reference) and the fidelity metric on real data (eps-MSE along t).

Measured on this machine (64 held-out images, every one of the 50 steps): fp32 ONNX Runtime vs eager,
eps-MSE ratio 1.0000 at every step; fp16 (float32 islands) 0.99996-1.0002 (worst at t_index 0).
"""

from __future__ import annotations

import json

import pytest

from fxpass.checkpoint import load_model
from fxpass.cli import main
from fxpass.config import load_config
from fxpass.denoisers import OnnxDenoiser, TorchDenoiser
from fxpass.fidelity import eps_mse_along_t, summarize
from fxpass.images import load_image_dir
from fxpass.reference import CHECKPOINT, CONFIG, HELDOUT_DIR

IMAGES = 8


@pytest.fixture(scope="module")
def reference():
    cfg = load_config(CONFIG)
    return cfg, load_model(CHECKPOINT, cfg)


def test_the_reference_model_is_in_the_repo_and_loads(reference):
    cfg, model = reference
    assert sum(p.numel() for p in model.parameters()) == 1_679_782
    assert cfg.image_size == 32 and cfg.learn_sigma and cfg.use_scale_shift_norm and cfg.attention_resolutions == "16,8"
    assert CHECKPOINT.stat().st_size <= 10 * 2**20
    heldout = sorted(HELDOUT_DIR.glob("*.png"))
    assert len(heldout) == 197


def _eps_rows(model, onnx_path, count=IMAGES):
    onnx_model = OnnxDenoiser(onnx_path)
    x0 = load_image_dir(HELDOUT_DIR, 32, count)
    torch_model = TorchDenoiser(model, onnx_model.diffusion, onnx_model.meta.model_timesteps)
    return eps_mse_along_t({"eager": torch_model, "onnx": onnx_model}, x0, onnx_model.diffusion, reference="eager",
                           seed=0)


@pytest.mark.slow
def test_it_learned_and_fp32_onnx_eps_mse_equals_eager_at_every_step(reference, digits_onnx):
    _, model = reference
    rows = _eps_rows(model, digits_onnx("fp32"))
    assert len(rows) == 50
    # it learned: eps_hat = 0 scores 1; the model scores below 0.12 everywhere, below 0.02 from t_index 1
    assert all(r["eps_mse"]["eager"] < 0.12 for r in rows)
    assert all(r["eps_mse"]["eager"] < 0.02 for r in rows[1:])
    # the lowering keeps it: the same eps-MSE within 1e-4 relative at every step
    assert all(abs(r["ratio"]["onnx"] - 1.0) <= 1e-4 for r in rows), summarize(rows)


@pytest.mark.slow
def test_fp16_onnx_eps_mse_ratio_along_t(reference, digits_onnx):
    """Measured: ratio within 0.99996..1.0002 over 64 images, 0.99969..1.00028 over these 8 (worst |r - 1|
    3.1e-4); the bound, 2e-3, is six times that."""
    _, model = reference
    rows = _eps_rows(model, digits_onnx("fp16"))
    worst = max(abs(r["ratio"]["onnx"] - 1.0) for r in rows)
    assert worst <= 2e-3, summarize(rows)


@pytest.mark.slow
def test_check_data_reports_and_gates_on_an_eps_budget(reference, digits_onnx, tmp_path, capsys):
    report = tmp_path / "r.json"
    code = main(["check", str(digits_onnx("fp32")), "--model", str(CHECKPOINT), "--data", str(HELDOUT_DIR),
                 "--data-count", "8", "--eps-budget", "0.01", "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "eps-MSE on 8 images" in out and "onnxrt-fp32 / ref" in out
    data = json.loads(report.read_text())["data"]
    assert len(data["rows"]) == 50 and data["failed"] == []
    assert all(abs(r["ratio"]["onnxrt-fp32"] - 1) <= 1e-4 for r in data["rows"])


@pytest.mark.slow
def test_check_data_fails_outside_the_budget(digits_onnx, capsys):
    code = main(["check", str(digits_onnx("fp16")), "--model", str(CHECKPOINT), "--data", str(HELDOUT_DIR),
                 "--data-count", "4", "--eps-budget", "1e-9", "--precision", "fp16"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL onnxrt-fp16: eps-MSE" in out and "check: FAIL" in out


def test_check_data_errors_are_one_line(digits_onnx, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["check", str(digits_onnx("fp32")), "--model", str(CHECKPOINT), "--data", str(empty)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"fxpass: error: {empty}: no images (.png, .jpg, .jpeg, .bmp, .tif, .tiff, .webp) in this directory\n"
