"""The bench's precision section: row selection, the fidelity summary, which row ``--repaint-full`` takes,
and how rows render (an unavailable row says why, never a number).  One small end-to-end run of the
section on a tiny config with two rows and one held-out image.

Nothing here asserts a timing or a quantization quality: benchmarks measure, tests check the bookkeeping.
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a top-level package of the repo; older editable installs miss it
    sys.path.insert(0, str(ROOT))

from bench.precision import ROW_KEYS, parse_rows

# test_bench.py's tiny config: one level, no attention outside the middle block, a 10-step schedule
MINI = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1", "attention_resolutions": "",
        "num_heads": 1, "diffusion_steps": 100, "timestep_respacing": "10"}


def _row(key, runtime="ONNX Runtime", precision="fp32", latency=None, fidelity=None):
    return {"key": key, "runtime": runtime, "precision": precision, "what": f"{key} row",
            "latency": latency if latency is not None else {}, "fidelity": fidelity if fidelity is not None else {}}


def _section(rows, **extra):
    return {"rows": rows, "threads": 2, "latency_config": {"batch": 1, "image_size": 256, "t_index": 125},
            "fidelity": {"model": "fxpass/reference/digits.pt", "images": 32, "steps": 50, "seed": 0,
                         "image_range": [8, 40]},
            "baseline_calibration": "8 random inputs", "repaint_full": {"skipped": "off by default (--repaint-full)"},
            **extra}


def test_parse_rows_keeps_the_reference_and_the_table_order():
    assert parse_rows(None) == ROW_KEYS and parse_rows("") == ROW_KEYS
    assert parse_rows("nncf_int8, ort_fp32") == ("eager", "ort_fp32", "nncf_int8")
    with pytest.raises(ValueError, match="unknown precision rows bogus"):
        parse_rows("ort_fp32,bogus")


def test_baseline_feeds_are_seeded_and_spread_over_the_schedule():
    from bench.precision_baselines import baseline_feeds

    feeds = baseline_feeds(32, 50, count=8, seed=3)
    assert len(feeds) == 8
    assert [int(f["t_index"][0]) for f in feeds] == [0, 7, 14, 21, 28, 35, 42, 49]
    assert all(f["x"].shape == (1, 3, 32, 32) and f["x"].dtype == np.float32 for f in feeds)
    assert all(f["t_index"].dtype == np.int64 for f in feeds)
    again = baseline_feeds(32, 50, count=8, seed=3)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(feeds, again))


def test_fidelity_stats_worst_is_farthest_from_one():
    from bench.precision_fidelity import fidelity_stats

    rows = [{"t_index": i, "timestep": 20 * i, "ratio": {"q": r}} for i, r in enumerate([1.01, 0.90, 1.05, 1.02])]
    stats = fidelity_stats(rows, "q")
    assert stats["worst_ratio"] == 0.90 and stats["t_index"] == 1 and stats["timestep"] == 20
    assert stats["max_ratio"] == 1.05 and stats["max_ratio_t_index"] == 2
    assert stats["mean_ratio"] == pytest.approx(0.995) and stats["steps"] == 4


def test_repaint_takes_the_fastest_gated_ort_or_openvino_row():
    from bench.precision import pick_repaint_row

    rows = [
        _row("eager", "PyTorch", latency={"median_s": 0.01}, fidelity={"reference": True}),
        _row("ort_fp32", latency={"median_s": 1.0}, fidelity={"max_ratio": 1.0001}),
        _row("ort_int8", precision="int8", latency={"median_s": 0.3}, fidelity={"max_ratio": 1.30}),  # over the gate
        _row("openvino_bf16", "OpenVINO", "bf16", latency={"median_s": 0.5}, fidelity={"max_ratio": 1.02}),
        _row("nncf_int8", "OpenVINO", "int8", latency={"unavailable": "nncf is not installed"},
             fidelity={"unavailable": "nncf is not installed"}),
    ]
    key, why = pick_repaint_row(rows)
    assert key == "openvino_bf16" and "gate" in why
    assert pick_repaint_row(rows, budget=0.5)[0] == "ort_int8"
    key, why = pick_repaint_row(rows[:1] + rows[2:3])
    assert key is None and "within" in why
    assert pick_repaint_row([rows[0]]) == (None, "no ONNX Runtime or OpenVINO row was timed")
    nan = [_row("ort_fp32", latency={"median_s": 1.0}, fidelity={"max_ratio": float("nan")})]
    assert pick_repaint_row(nan)[0] is None


def test_cells_say_why_a_row_has_no_number():
    from bench.summary import eps_text, precision_cells

    section = _section([
        _row("eager", "PyTorch", latency={"median_s": 1.5, "ratio_vs_eager": 1.0}, fidelity={"reference": True}),
        _row("ort_int8", precision="int8", latency={"median_s": 0.4, "ratio_vs_eager": 0.4 / 1.5},
             fidelity={"worst_ratio": 1.0312, "t_index": 0, "timestep": 0, "max_ratio": 1.0312}),
        _row("openvino_bf16", "OpenVINO", "bf16", latency={"unavailable": "this CPU has no bf16 support"},
             fidelity={"unavailable": "this CPU has no bf16 support"}),
        _row("nncf_int8", "OpenVINO", "int8", latency={"error": "RuntimeError: boom"}, fidelity={}),
        _row("torch_compile", "PyTorch", latency={"skipped": "not in --precision-rows"},
             fidelity={"skipped": "not in --precision-rows"}),
    ])
    cells = {c["key"]: c for c in precision_cells(section)}
    assert cells["eager"]["latency"] == "1500.0 ms"
    assert cells["eager"]["vs_eager"] == "1.00×" and cells["eager"]["eps"] == "reference"
    assert cells["ort_int8"]["vs_eager"] == "0.27×" and cells["ort_int8"]["eps"] == "1.031× at t_index 0"
    bf16 = cells["openvino_bf16"]
    assert bf16["latency"] == bf16["eps"] == "unavailable: this CPU has no bf16 support"
    assert bf16["vs_eager"] == "—"
    assert cells["nncf_int8"]["latency"] == "error: RuntimeError: boom" and cells["nncf_int8"]["eps"] == "not run"
    assert cells["torch_compile"]["latency"].startswith("skipped: ")
    for key in ("openvino_bf16", "nncf_int8", "torch_compile"):
        assert not re.search(r"\d\s*(ms|s|×)$", cells[key]["latency"] + cells[key]["vs_eager"])
    assert eps_text(None) == "not run"


def test_readme_precision_table(tmp_path):
    from bench.report import render_precision

    section = _section([
        _row("eager", "PyTorch", latency={"median_s": 1.441, "ratio_vs_eager": 1.0}, fidelity={"reference": True}),
        _row("ort_int8_default", precision="int8", latency={"median_s": 0.599, "ratio_vs_eager": 0.599 / 1.441,
                                                            "build": {"quantize_s": 34.0}},
             fidelity={"worst_ratio": 1.9, "t_index": 3, "timestep": 61, "max_ratio": 1.9}),
        _row("nncf_int8", "OpenVINO", "int8", latency={"unavailable": "nncf is not installed (a|b)"},
             fidelity={"unavailable": "nncf is not installed (a|b)"}),
    ], fxpass_int8={"bench": {"quantize_s": 200.0, "plan": {"float_layers": ["a", "b"], "layers": 90}}},
        repaint_full={"row": "ort_int8", "why": "fastest gated", "t_T": 250, "jump_length": 10, "jump_n_sample": 10,
                      "model_calls": 2410, "wall_s": 900.0, "model_s": 880.0})
    text = "\n".join(render_precision(section))
    assert "| runtime | precision | what | per step | vs eager | eps-MSE vs fp32, worst over t |" in text
    assert "| PyTorch | fp32 | eager PyTorch row |" not in text  # "what" comes from the row
    assert "| PyTorch | fp32 | eager row | 1,441 ms | 1.00× | reference |" in text
    assert "| ONNX Runtime | int8 | ort_int8_default row | 599 ms | 0.42× | 1.900× at t_index 3 |" in text
    assert "| unavailable: nncf is not installed (a\\|b) | — | unavailable: nncf is not installed (a\\|b) |" in text
    assert "fxpass int8 on the bench config (calibrated on the model's own trajectories) 200.0 s " \
           "(2 of 90 layers kept in float)" in text
    assert "ORT quantize_static 34.0 s" in text and "QUInt8" in text
    assert "2,410 model calls) on ort_int8: 900.0 s (15.0 min" in text
    assert "32 held-out images (numbers 8..39: fxpass's int8 calibrates on the 8 before them)" in text
    assert render_precision(None) == [] and render_precision({"skipped": "--skip precision"}) == []
    assert "error: boom" in "\n".join(render_precision({"error": "boom"}))


def test_rich_table_prints_unavailable_rows():
    from rich.console import Console

    from bench.summary import print_precision

    buffer = io.StringIO()
    section = _section([_row("eager", "PyTorch", latency={"median_s": 1.0, "ratio_vs_eager": 1.0},
                             fidelity={"reference": True}),
                        _row("nncf_int8", "OpenVINO", "int8", latency={"unavailable": "nncf is not installed"},
                             fidelity={"unavailable": "nncf is not installed"})])
    print_precision(section, Console(file=buffer, width=200))
    text = buffer.getvalue()
    assert "unavailable: nncf is not installed" in text and "reference" in text
    buffer = io.StringIO()
    print_precision({"skipped": "--skip precision"}, Console(file=buffer, width=200))
    assert "skipped: --skip precision" in buffer.getvalue()


def test_missing_packages_make_rows_unavailable(monkeypatch, tmp_path):
    import importlib.util

    from bench import precision_builds as builds

    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in ("nncf", "fxpass.precision") else real(name, *args, **kwargs)

    monkeypatch.setattr(builds.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(builds, "_openvino_reason", lambda precision: None)
    subject = builds.Subject("t", model=None, proto=None, cfg=None, model_timesteps=[0], workdir=tmp_path,
                             threads=1)
    with pytest.raises(builds.Unavailable, match="nncf is not installed"):
        builds.build_variant("nncf_int8", subject)
    for key in ("ort_int8", "openvino_int8"):  # the second is answered from the cache
        with pytest.raises(builds.Unavailable, match="fxpass.precision"):
            builds.build_variant(key, subject)
    monkeypatch.setattr(builds, "_openvino_reason", lambda precision: f"no {precision} here")
    with pytest.raises(builds.Unavailable, match="no bf16 here"):
        builds.build_variant("openvino_bf16", subject)


def test_cli_refuses_bad_precision_arguments(capsys):
    from bench.cli import main

    with pytest.raises(SystemExit):
        main(["--precision-rows", "ort_fp32,bogus"])
    assert "unknown precision rows bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--repaint-full", "eager"])
    assert "choose one of ort_fp32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--precision-images", "0"])


def test_section_end_to_end_on_a_tiny_config(tmp_path):
    """Two rows (eager and fxpass fp32 on ORT), latency on a tiny config, eps-MSE on one held-out digit."""
    import torch

    from bench.cpu import Options, make_setup
    from bench.precision import run_precision
    from fxpass.config import from_dict

    before = torch.get_num_threads()
    try:
        setup = make_setup(from_dict(MINI))
        opts = Options(runs=7, warmup=1, threads=1, precision_images=1, precision_rows="ort_fp32")
        out = run_precision(setup, opts, log=lambda message: None)
    finally:
        torch.set_num_threads(before)
    rows = {r["key"]: r for r in out["rows"]}
    assert list(rows) == list(ROW_KEYS)
    assert rows["eager"]["fidelity"]["reference"] is True
    lat = rows["ort_fp32"]["latency"]
    assert lat["runs"] == 7 and lat["interleaved"] and lat["ratio_vs_eager"] == pytest.approx(
        lat["median_s"] / rows["eager"]["latency"]["median_s"])
    assert lat["max_rel_to_scale_vs_eager"] < 1e-4
    fid = rows["ort_fp32"]["fidelity"]
    assert fid["steps"] == 50 and abs(fid["worst_ratio"] - 1.0) < 1e-3  # fp32 ORT: the reference's error
    assert out["fidelity"]["images"] == 1 and len(out["fidelity"]["per_t"]) == 50
    assert out["fidelity"]["image_range"][1] - out["fidelity"]["image_range"][0] == 1
    assert rows["nncf_int8"]["latency"] == {"skipped": "not in --precision-rows"}
    assert out["repaint_full"] == {"skipped": "off by default (--repaint-full)"}
