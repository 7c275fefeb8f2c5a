"""``python -m bench.sampling_time`` on the tests' tiny config: the rows, the paper estimate's labelling, the
reuse of a kept workdir's lowering, ``--show``; and the explicit flags of a cached preset row.

Nothing here asserts a timing beyond its being positive: benchmarks measure, tests check the bookkeeping.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a top-level package of the repo; older editable installs miss it
    sys.path.insert(0, str(ROOT))

TINY = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "16", "num_heads": 2,
        "diffusion_steps": 100, "timestep_respacing": "10"}


def _diffusion():
    from fxpass.config import from_dict
    from fxpass.diffusion import Diffusion

    return Diffusion.from_config(from_dict(TINY).to_dict())


@pytest.mark.parametrize("preset", ["fast", "balanced", "paper"])
def test_a_cached_row_runs_the_presets_plan_through_explicit_flags(preset):
    """The CLI takes no knob beside --preset, so a row with --cache-interval spells the preset's knobs out:
    they must make the same plan as the preset, with the interval."""
    from bench.sampling_time import sample_flags
    from fxpass.cli import build_parser
    from fxpass.cli.sampling import settings_from
    from fxpass.samplers import PRESETS

    diffusion = _diffusion()
    assert sample_flags(preset, 1, diffusion.num_steps) == ["--preset", preset]
    flags = sample_flags(preset, 3, diffusion.num_steps)
    args = build_parser().parse_args(["sample", "m.onnx", "-o", "o.png", *flags])
    explicit, reference = settings_from(args).build(diffusion), PRESETS[preset].build(diffusion)
    assert explicit.cache_interval == 3 and flags[-2:] == ["--cache-interval", "3"]
    assert type(explicit) is type(reference) and explicit.calls == reference.calls
    assert explicit.plan == reference.plan and getattr(explicit, "eta", None) == getattr(reference, "eta", None)


def test_no_sampling_results_is_a_clear_error(tmp_path):
    from bench.sampling_report import latest_sampling_results

    (tmp_path / "2026-01-01-cpu2.json").write_text("{}", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="python -m bench.sampling_time"):
        latest_sampling_results(tmp_path)


@pytest.mark.slow
def test_end_to_end_on_the_tiny_config_then_reuses_the_lowering(tmp_path, capsys):
    import yaml

    from bench.sampling_time import main
    from fxpass.samplers import PRESETS

    config = tmp_path / "tiny.yml"
    config.write_text(yaml.safe_dump(TINY, sort_keys=False), encoding="utf-8")
    workdir, out = tmp_path / "work", tmp_path / "results.json"
    argv = ["--config", str(config), "--workdir", str(workdir), "--precisions", "fp32", "--runtimes", "ort",
            "--presets", "fast", "--paper-calls", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    first = capsys.readouterr()
    assert "lower model-fp32.onnx" in first.err and "reuse model-fp32.onnx" not in first.err
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["config"]["name"] == "tiny" and data["machine"]["cores"] >= 1
    assert data["lowerings"]["fp32"]["reused"] is False
    diffusion = _diffusion()
    (paper,) = [r for r in data["rows"] if r["preset"] == "paper"]
    (fast,) = [r for r in data["rows"] if r["preset"] == "fast"]
    assert fast["calls"] == fast["calls_reported"] == PRESETS["fast"].build(diffusion).calls
    assert fast["wall_s"] > 0 and fast["peak_rss_mib"] > 0 and fast["cache_interval"] == 1
    assert (workdir / fast["png"]).is_file() and fast["vs_paper"] > 0
    assert paper["estimated"] is True and paper["label"].startswith("estimate: ")
    assert paper["calls"] == PRESETS["paper"].build(diffusion).calls and paper["paper_calls_timed"] == 3
    assert len(paper["samples_s"]) == 3 and paper["per_call_s"] > 0
    assert paper["wall_s"] == pytest.approx(paper["calls"] * paper["per_call_s"])
    assert data["paper_reference"] == "fp32 · ort · paper (estimate)"
    assert "| lowering | runtime | preset | model calls | wall s / image | peak RSS MiB | vs paper |" in first.out
    assert "| fp32 | ort | paper (estimate) |" in first.out
    assert "Measured by `python -m bench.sampling_time`" in first.out

    lowered = workdir / "model-fp32.onnx"
    mtime = lowered.stat().st_mtime_ns
    again = tmp_path / "again.json"
    assert main([*argv, "--out", str(again)]) == 0
    second = capsys.readouterr()
    assert "reuse model-fp32.onnx" in second.err and "lower model-fp32.onnx" not in second.err
    assert "fxpass init" not in second.err and lowered.stat().st_mtime_ns == mtime
    assert json.loads(again.read_text(encoding="utf-8"))["lowerings"]["fp32"]["reused"] is True

    assert main(["--show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "| fp32 | ort | fast |" in shown and "| fp32 | ort | paper (estimate) |" in shown
