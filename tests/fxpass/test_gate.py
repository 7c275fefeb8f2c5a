"""The numeric gate of `fxpass lower` / `check` / `golden`: schedule coverage, batches, non-finite numbers.

(Guards on input data and on the batch size are in test_guards.py.)
"""

from __future__ import annotations

import json

import pytest
import torch

import fxpass
from fxpass.checkpoint import init_model, save_checkpoint
from fxpass.cli import main
from fxpass.config import CAMUS
from fxpass.pipeline import lower_with_report

TINY = CAMUS.replace(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16",
                     diffusion_steps=100, timestep_respacing="10")


def test_gate_covers_the_schedule_and_mixed_batches_when_dynamic():
    eager = init_model(TINY.replace(class_cond=True), seed=1)
    lowered = lower_with_report(eager, config=TINY.replace(class_cond=True), dynamic_batch=True)
    per_input = lowered.check["per_input"]
    assert {0, 5, 9} <= {e["t_index"] for e in per_input} and len({e["t_index"] for e in per_input}) >= 4
    batches = {e.get("batch", 1) for e in per_input}
    assert batches == {1, 2, 3}
    mixed = [e["t_indices"] for e in per_input if "t_indices" in e]
    assert mixed and all(len(set(rows)) > 1 for rows in mixed)
    assert lowered.check["passed"] and lowered.check["max_rel_to_scale"] <= 1e-4


@pytest.fixture(scope="module")
def nan_files(tmp_path_factory, write_yaml):
    root = tmp_path_factory.mktemp("nan")
    cfg = write_yaml(root / "tiny.yml", {k: TINY.to_dict()[k] for k in (
        "image_size", "num_channels", "num_res_blocks", "attention_resolutions", "diffusion_steps",
        "timestep_respacing")})
    model = init_model(TINY, seed=0)
    with torch.no_grad():
        model.out[-1].weight[0, 0, 0, 0] = float("nan")  # the output conv: every output pixel of channel 0
    ckpt = root / "nan.pt"
    save_checkpoint(model, ckpt)
    return root, cfg, ckpt


def _run(capsys, argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_nan_weights_are_refused_by_every_command(nan_files, capsys, tmp_path):
    root, cfg, ckpt = nan_files
    for argv in (["lower", ckpt, "--config", cfg, "-o", tmp_path / "m.onnx"],
                 ["golden", ckpt, "--config", cfg, "-o", tmp_path / "g"]):
        code, _, err = _run(capsys, argv)
        assert code == 2 and "has NaN values (pass --allow-nonfinite" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_nan_outputs_are_a_failure_that_says_so(nan_files, capsys, tmp_path):
    root, cfg, ckpt = nan_files
    out = tmp_path / "m.onnx"
    code, _, err = _run(capsys, ["lower", ckpt, "--config", cfg, "-o", out, "--allow-nonfinite"])
    assert code == 1 and "non-finite" in err and "NaN" in err and "0·max|ref|" not in err and not out.exists()
    code, _, err = _run(capsys, ["golden", ckpt, "--config", cfg, "-o", tmp_path / "g", "--allow-nonfinite"])
    assert code == 1 and "NaN or Inf" in err and not (tmp_path / "g").exists()
    # written anyway with --force: check then reports the NaN, never "max abs 0"
    report = tmp_path / "r.json"
    code, _, _ = _run(capsys, ["lower", ckpt, "--config", cfg, "-o", out, "--allow-nonfinite", "--force",
                               "--report", report])
    assert code == 1 and out.exists() and json.loads(report.read_text())["check"]["passed"] is False
    code, printed, _ = _run(capsys, ["check", out, "--model", ckpt, "--allow-nonfinite"])
    assert code == 1 and "NaN" in printed and "FAIL" in printed


@pytest.mark.parametrize("tolerance", ["nan,0", "inf,0", "0,0", "-1,0", "1e-4,nan"])
def test_check_refuses_tolerances_that_pass_anything(tiny_onnx, tiny_ckpt, capsys, tolerance):
    code, _, err = _run(capsys, ["check", tiny_onnx, "--model", tiny_ckpt, f"--tolerance={tolerance}"])
    assert code == 2 and err.startswith("fxpass: error: --tolerance") and err.count("\n") == 1


def test_api_refuses_a_wrong_model_and_may_opt_out():
    eager = init_model(TINY, seed=0)
    with torch.no_grad():
        eager.out[-1].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(fxpass.FxpassError, match="non-finite"):
        fxpass.lower(eager, config=TINY)
    assert fxpass.lower(eager, config=TINY, verify=False).graph.node
