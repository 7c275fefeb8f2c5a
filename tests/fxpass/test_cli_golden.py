"""``fxpass golden`` and the ``polygraphy run`` regression command that replays a golden set."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fxpass.cli import main

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "golden" / "camus-seed0"

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


def run(capsys, argv: list) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def polygraphy(command: str, onnx_path: Path, placeholder: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a manifest's regression command with ``placeholder`` replaced by ``onnx_path``."""
    argv = shlex.split(command)
    assert argv[:2] == ["polygraphy", "run"] and argv[2] == placeholder, command
    argv[2] = str(onnx_path)
    exe = shutil.which("polygraphy") or str(Path(sys.executable).with_name("polygraphy"))
    return subprocess.run([exe, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=600)


# ---- the files -----------------------------------------------------------------------------------
def test_writes_polygraphy_json_and_a_manifest(tiny_golden, tiny_ckpt, tiny_onnx):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    assert sorted(p.name for p in tiny_golden.iterdir()) == ["inputs.json", "manifest.json", "outputs.json"]
    feeds = load_json(str(tiny_golden / "inputs.json"))  # what `polygraphy run --load-inputs` reads
    assert isinstance(feeds, list) and len(feeds) == 2
    assert [sorted(f) for f in feeds] == [["t_index", "x"], ["t_index", "x"]]
    assert [int(f["t_index"][0]) for f in feeds] == [0, 9]
    assert feeds[0]["x"].shape == (1, 3, 32, 32) and feeds[0]["x"].dtype == np.float32
    assert not np.array_equal(feeds[0]["x"], feeds[1]["x"])

    results = RunResults.load(str(tiny_golden / "outputs.json"))  # what `--load-outputs` reads
    assert list(results.keys()) == ["torch-fp32"]
    outputs = [dict(it.items()) for it in results["torch-fp32"]]
    assert [o["out"].shape for o in outputs] == [(1, 6, 32, 32)] * 2

    manifest = json.loads((tiny_golden / "manifest.json").read_text())
    assert manifest["checkpoint"]["sha256"] == hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    assert manifest["config"]["timestep_respacing"] == "10" and manifest["config"]["image_size"] == 32
    assert manifest["t_index"] == [0, 9] and manifest["timesteps"] == [0, 99]
    assert manifest["outputs"]["runner"] == "torch-fp32"
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxruntime", "polygraphy"}
    fp32 = manifest["tolerances"]["fp32"]
    scale = max(float(np.abs(o["out"]).max()) for o in outputs)
    assert fp32["atol_scale"] == 1e-4 and fp32["atol"] == pytest.approx(1e-4 * scale, rel=0.05)
    assert manifest["tolerances"]["fp16"]["atol_scale"] == 2e-2
    assert manifest["verified_with"]["passed"] is True
    assert manifest["verified_with"]["sha256"] == hashlib.sha256(tiny_onnx.read_bytes()).hexdigest()
    command = manifest["regression"]["commands"]["fp32"]
    assert command == (f"polygraphy run {tiny_onnx} --onnxrt --load-inputs {tiny_golden}/inputs.json "
                       f"--load-outputs {tiny_golden}/outputs.json --atol {fp32['atol']:g} --rtol 0")


def test_outputs_are_the_eager_model_on_the_inputs(tiny_golden, tiny_ckpt):
    import torch
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    from fxpass.checkpoint import load_model
    from fxpass.config import from_dict

    manifest = json.loads((tiny_golden / "manifest.json").read_text())
    model = load_model(tiny_ckpt, from_dict(manifest["config"]))
    feeds = load_json(str(tiny_golden / "inputs.json"))
    results = RunResults.load(str(tiny_golden / "outputs.json"))["torch-fp32"]
    assert len(feeds) == len(results) == len(manifest["model_timesteps"]) == 2  # t_index 0 and 9
    for feed, result, timestep in zip(feeds, results, manifest["model_timesteps"]):
        with torch.no_grad():
            expected = model(torch.from_numpy(feed["x"]), torch.tensor([timestep])).numpy()
        np.testing.assert_allclose(result["out"], expected, rtol=0, atol=1e-6)


def test_refuses_to_overwrite_and_force_regenerates_the_same_bytes(capsys, tmp_path, tiny_ckpt, tiny_yaml):
    out = tmp_path / "set"
    argv = ["golden", tiny_ckpt, "-o", out, "--config", tiny_yaml, "--t-index", "3,5", "--seed", "7"]
    assert run(capsys, argv)[0] == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    manifest = json.loads(first["manifest.json"])
    assert manifest["t_index"] == [3, 5] and manifest["seed"] == 7 and manifest["verified_with"] is None
    assert manifest["regression"]["onnx"] == "MODEL.onnx"

    code, _, err = run(capsys, argv)
    assert (code, err.strip()) == (2, f"fxpass: error: {out}: already exists (pass --force to overwrite)")
    assert run(capsys, [*argv, "--force"])[0] == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # deterministic per seed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temp or backup dirs left


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--t-index", "10"], "--t-index 10: out of range 0..9 (10-step schedule)"),
        (["--t-index", "one"], "--t-index one: expected integers such as 0 249"),
    ],
)
def test_usage_errors_write_nothing(capsys, tmp_path, tiny_ckpt, tiny_yaml, extra, message):
    out = tmp_path / "set"
    code, _, err = run(capsys, ["golden", tiny_ckpt, "-o", out, "--config", tiny_yaml, *extra])
    assert (code, err.strip()) == (2, f"fxpass: error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_refuses_an_onnx_model_that_does_not_match(capsys, tmp_path, tiny_ckpt, tiny_onnx_perturbed):
    out = tmp_path / "set"
    code, _, err = run(capsys, ["golden", tiny_ckpt, "-o", out, "--onnx", tiny_onnx_perturbed])
    assert code == 1
    assert err.startswith(f"fxpass: error: {tiny_onnx_perturbed}: ONNX Runtime differs from the eager model")
    assert err.rstrip().endswith("golden set not written")
    assert list(tmp_path.iterdir()) == []


# ---- the regression command, both ways -------------------------------------------------------------
def test_polygraphy_regression_passes_the_lowering_and_fails_a_perturbed_weight(
        tiny_golden, tiny_onnx, tiny_onnx_perturbed):
    manifest = json.loads((tiny_golden / "manifest.json").read_text())
    command = manifest["regression"]["commands"]["fp32"]
    good = polygraphy(command, tiny_onnx, str(tiny_onnx))
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    assert "PASSED" in good.stdout + good.stderr
    bad = polygraphy(command, tiny_onnx_perturbed, str(tiny_onnx))
    assert bad.returncode != 0, bad.stdout[-3000:]
    assert "FAILED" in bad.stdout + bad.stderr and "Difference exceeds tolerance" in bad.stdout + bad.stderr


# ---- the committed CAMUS golden set --------------------------------------------------------------------
def test_committed_set_is_small_and_complete():
    sizes = {p.name: p.stat().st_size for p in COMMITTED.iterdir()}
    assert sorted(sizes) == ["inputs.json", "manifest.json", "outputs.json"]
    assert sum(sizes.values()) < 10 * 2**20
    manifest = json.loads((COMMITTED / "manifest.json").read_text())
    from fxpass.config import CAMUS

    assert manifest["config"] == CAMUS.to_dict()
    assert manifest["t_index"] == [0, 249] and manifest["timesteps"] == [0, 3999]
    assert manifest["regression"]["commands"]["fp32"].startswith(
        "polygraphy run MODEL.onnx --onnxrt --load-inputs golden/camus-seed0/inputs.json "
        "--load-outputs golden/camus-seed0/outputs.json --atol ")


@pytest.mark.slow
def test_committed_camus_set_passes_a_camus_lowering_and_fails_a_perturbed_one(tmp_path, camus_seed0):
    """``fxpass init --seed 0`` + ``fxpass lower`` of the CAMUS model, replayed by the README's command."""
    import onnx

    from check_helpers import PERTURBATION, scale_output_conv_weight

    manifest = json.loads((COMMITTED / "manifest.json").read_text())
    ckpt, good, _ = camus_seed0  # the checkpoint and its lowering by the CLI (conftest)
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == manifest["checkpoint"]["sha256"], (
        "fxpass init --seed 0 no longer makes the checkpoint golden/camus-seed0 was made from; "
        "run golden/regenerate.sh")
    proto = onnx.load(str(good))
    scale_output_conv_weight(proto, PERTURBATION)
    bad = tmp_path / "camus-perturbed.onnx"
    onnx.save(proto, str(bad))
    del proto

    command = manifest["regression"]["commands"]["fp32"]
    result = polygraphy(command, good, "MODEL.onnx")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    result = polygraphy(command, bad, "MODEL.onnx")
    assert result.returncode != 0 and "Difference exceeds tolerance" in result.stdout + result.stderr
