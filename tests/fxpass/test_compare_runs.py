"""``fxpass evaluate --run``: several samplers on the same cases, quality against model time
(:mod:`fxpass.compare_runs`), on NumPy fakes and, for the CLI, the tiny lowered model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from check_helpers import gray_image_and_half_mask, sample_in_a_fresh_process
from test_samplers import SIZE, TableModel, _case, _diffusion

from fxpass.cli import main
from fxpass.compare_runs import compare, paired_difference
from fxpass.inpainting import fixed_masks
from fxpass.samplers import Settings

RUNS = [Settings("repaint", jump_length=3, jump_n_sample=2), Settings("ddim", t_T=8, steps=4),
        Settings("ddnm", steps=5, travel_length=2, travel_repeat=2)]


@pytest.fixture(scope="module")
def report():
    d = _diffusion()
    images = np.stack([_case(s)[0][0] for s in (1, 2)])
    return compare(TableModel(d), images, fixed_masks(SIZE, ("box", "half")), RUNS, seed=3, names=["a", "b"])


def test_every_run_inpaints_the_same_cases(report):
    keys = [[(c["image"], c["mask"], c["seed"], c["name"]) for c in run["cases"]] for run in report["runs"]]
    assert keys[0] == keys[1] == keys[2] == [(0, "box", 3, "a"), (0, "half", 4, "a"), (1, "box", 5, "b"),
                                             (1, "half", 6, "b")]
    for run in report["runs"]:
        for case in run["cases"]:
            assert set(case) >= {"psnr", "ssim", "calls", "seconds"} and case["seconds"] > 0
    json.dumps(report, allow_nan=False)


def test_calls_per_case_are_each_samplers_plan(report):
    d = _diffusion()
    for settings, run, row in zip(RUNS, report["runs"], report["summary"]):
        calls = settings.build(d).calls
        assert run["settings"]["model_calls_per_case"] == calls == row["calls_per_case"]
        assert {c["calls"] for c in run["cases"]} == {calls}
    assert [r["calls_per_case"] for r in report["summary"]] == [19, 4, 9]
    assert report["runs"][1]["settings"]["label"] == "DDIM (t_T 8, steps 4, eta 0.85)"


def test_paired_differences_are_a_hand_computation(report):
    first = report["runs"][0]["cases"]
    assert "diff_to_first" not in report["summary"][0]
    for run, row in zip(report["runs"][1:], report["summary"][1:]):
        for metric in ("psnr", "ssim"):
            d = [b[metric] - a[metric] for a, b in zip(first, run["cases"])]
            mean = sum(d) / len(d)
            se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1)) / math.sqrt(len(d))
            assert row["diff_to_first"][metric]["mean"] == pytest.approx(mean, abs=1e-12)
            assert row["diff_to_first"][metric]["se"] == pytest.approx(se, abs=1e-12)
            assert row[metric] == pytest.approx(sum(c[metric] for c in run["cases"]) / 4)
    assert paired_difference([1.0], [3.0]) == {"mean": 2.0, "se": None}


# ---- the CLI on the tiny lowered model ------------------------------------------------------------
@pytest.fixture
def data_dir(tmp_path):
    img, _ = gray_image_and_half_mask(tmp_path, 32)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(img.read_bytes())
    return data


def test_cli_runs_write_the_report_and_the_plot(tmp_path, capsys, tiny_onnx, data_dir):
    pytest.importorskip("matplotlib")
    out, plot = tmp_path / "runs.json", tmp_path / "runs.png"
    rc = main(["evaluate", str(tiny_onnx), "--data", str(data_dir), "-o", str(out), "--plot", str(plot),
               "--masks", "box,half", "--run", "ddim:steps=3", "--run", "ddnm:t_T=6,steps=3,travel_length=1,travel_repeat=2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "1. DDIM" in captured.out and "2. DDNM" in captured.out and f"wrote {plot}" in captured.out
    report = json.loads(out.read_text())
    assert [r["settings"]["model_calls_per_case"] for r in report["runs"]] == [3, 5]
    assert [len(r["cases"]) for r in report["runs"]] == [2, 2]
    assert set(report["summary"][1]["diff_to_first"]) == {"psnr", "ssim"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_runs_path_does_not_import_torch(tmp_path, tiny_onnx, data_dir):
    out = tmp_path / "runs.json"
    args = [str(tiny_onnx), "--data", str(data_dir), "-o", str(out), "--masks", "box", "--run", "ddim:steps=2",
            "--run", "repaint:t_T=3,jump_n_sample=1"]
    assert sample_in_a_fresh_process(args, "onnxruntime", "evaluate") == "torch-free"
    assert [r["settings"]["model_calls_per_case"] for r in json.loads(out.read_text())["runs"]] == [2, 3]


@pytest.mark.parametrize(("args", "line"), [
    (["--run", "euler"], "--run euler: unknown sampler 'euler'; choose from repaint, ddim, ddnm"),
    (["--run", "ddim:speed=3"], "--run ddim:speed=3: unknown knob 'speed'; choose from t_T, jump_length,"),
    (["--run", "ddnm:eta=1.5"], "--run ddnm:eta=1.5: argument --eta: expected a number in [0, 1], got 1.5"),
    (["--run", "ddim:steps=0"], "--run ddim:steps=0: argument --steps: expected a positive integer, got 0"),
    (["--run", "ddim:steps"], "--run ddim:steps: expected each knob once, as knob=value, got 'steps'"),
    (["--run", "ddim:jump_length=3"], "--run ddim:jump_length=3: jump_length is for --sampler repaint, not --sampler ddim"),
    (["--run", "ddim:t_T=3,steps=4"], "--run ddim:t_T=3,steps=4: --steps 4 is more than --t-T 3"),
    (["--run", "ddim:steps=11"], "{model}: --run ddim:steps=11: --steps 11 is more than the model's 10 respaced steps"),
    (["--run", "ddim", "--steps", "3"], "--run and --steps do not go together"),
    (["--run", "ddim", "--sampler", "ddnm"], "--run and --sampler do not go together"),
    (["--plot", "p.png"], "--plot draws the --run entries against each other: give at least one --run"),
])
def test_cli_bad_runs_one_line_exit_2(tmp_path, capsys, tiny_onnx, data_dir, args, line):
    out = tmp_path / "r.json"
    rc = main(["evaluate", str(tiny_onnx), "--data", str(data_dir), "-o", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"fxpass: error: {line.format(model=tiny_onnx)}") and err.count("\n") == 1
    assert not out.exists()
