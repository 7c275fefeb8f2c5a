"""The benchmark harness's mechanics on a tiny config: results schema, medians over ≥ 7 runs, the
sampled schedule's labelling, the ``fxpass lower`` subprocess parsing, the README section generator.

Nothing here asserts a timing: benchmarks measure, tests check the bookkeeping.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a top-level package of the repo; older editable installs miss it
    sys.path.insert(0, str(ROOT))

# one level, no attention outside the middle block, a 10-step schedule: lowers in a few seconds
MINI = {
    "image_size": 32,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1",
    "attention_resolutions": "",
    "num_heads": 1,
    "diffusion_steps": 100,
    "timestep_respacing": "10",
}
SCHEDULE_STEPS = 3


@pytest.fixture(scope="module")
def mini_yaml(tmp_path_factory) -> Path:
    import yaml

    path = tmp_path_factory.mktemp("bench") / "mini.yml"
    path.write_text(yaml.safe_dump(MINI, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def results(mini_yaml):
    """One in-process bench run on the tiny config (the CLI subprocess, precision and GPU sections left out;
    tests/bench/test_precision.py covers the precision section)."""
    import torch

    from bench.cli import run_bench
    from bench.cpu import Options

    before = torch.get_num_threads()
    opts = Options(runs=7, warmup=1, schedule="sample", schedule_steps=SCHEDULE_STEPS,
                   skip=frozenset({"cli", "gpu", "precision"}))
    try:
        yield run_bench(config_path=str(mini_yaml), opts=opts, log=lambda message: None)
    finally:
        torch.set_num_threads(before)


def _timing_ok(timing: dict, runs: int = 7) -> None:
    """The figures are those of its own samples: one a timed run, the median, the extremes."""
    samples = timing["samples_s"]
    assert timing["runs"] == runs == len(samples)
    assert timing["median_s"] == statistics.median(samples)
    assert (timing["min_s"], timing["max_s"]) == (min(samples), max(samples))


def test_results_json_schema(results, tmp_path):
    from bench import SCHEMA
    from bench.harness import host_kind, results_path, write_results

    path = write_results(results, results_path(results, tmp_path))
    assert path.name == f"{results['date'][:10]}-{host_kind(results['machine'])}-mini.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["schema"] == SCHEMA
    assert {"date", "machine", "config", "settings", "cpu", "flops", "gpu", "load", "targets", "wall_s"} <= set(data)
    machine = data["machine"]
    assert machine["cpu_model"] and machine["cores"] == os.cpu_count()
    assert {"torch", "onnx", "onnxruntime", "fxpass"} <= set(machine["versions"])
    assert all(machine["versions"][k] for k in ("torch", "onnx", "onnxruntime", "fxpass"))
    assert data["config"]["name"] == "mini" and data["config"]["values"]["image_size"] == 32
    assert data["settings"]["threads"] == data["settings"]["ort_intra_op_num_threads"]
    cpu = data["cpu"]
    assert {"eager", "naive_ort", "fxpass_ort", "ratios", "nodes", "naive_build", "fxpass_build", "schedule"} <= set(cpu)
    assert cpu["lower_cli"] == {"skipped": "--skip cli"}  # left out of this run
    medians = {key: cpu[key]["median_s"] for key in ("eager", "naive_ort", "fxpass_ort")}
    assert cpu["ratios"] == {"fxpass_over_eager": medians["fxpass_ort"] / medians["eager"],
                             "fxpass_over_naive": medians["fxpass_ort"] / medians["naive_ort"],
                             "naive_over_eager": medians["naive_ort"] / medians["eager"]}
    assert cpu["nodes"]["naive"] == cpu["naive_build"]["graph"]["nodes"] > 0
    assert cpu["nodes"]["fxpass"] == cpu["fxpass_build"]["graph"]["nodes"] > 0
    assert "t_index" in cpu["fxpass_build"]["graph"]["inputs"]
    assert "timesteps" in cpu["naive_build"]["graph"]["inputs"]
    assert set(cpu["fxpass_build"]["stages_s"]) >= {"capture", "passes", "export", "surgery"}
    assert data["gpu"] == {"skipped": "--skip gpu"}
    load = data["load"]
    assert load["max_load1"] == (max(p["load1"] for p in load["samples"]) if load["samples"] else None)


def test_medians_over_at_least_seven_runs(results):
    for key in ("eager", "naive_ort", "fxpass_ort"):
        _timing_ok(results["cpu"][key])
    ratios = results["cpu"]["ratios"]
    assert ratios["fxpass_over_eager"] == results["cpu"]["fxpass_ort"]["median_s"] / results["cpu"]["eager"]["median_s"]


def test_outputs_agree_with_eager(results):
    for key in ("naive_ort", "fxpass_ort"):
        assert results["cpu"][key]["max_rel_to_scale_vs_eager"] < 1e-4


def test_measure_counts_warmup_and_runs():
    from bench.harness import measure

    calls = []
    timing = measure(lambda: calls.append(1), runs=9, warmup=3)
    assert len(calls) == 12
    _timing_ok(timing, runs=9)
    with pytest.raises(ValueError, match="at least 7"):
        measure(lambda: None, runs=6)


def test_sampled_schedule_is_labelled_extrapolated(results):
    sched = results["cpu"]["schedule"]
    assert sched["mode"] == "sample" and sched["extrapolated"] is True
    assert sched["steps_total"] == 10 and sched["steps_timed"] == SCHEDULE_STEPS
    assert sched["t_indices"] == [0, 4, 9] or sched["t_indices"] == [0, 5, 9]
    assert "extrapolated" in sched["how"]
    for side in ("fxpass_ort", "eager"):
        steps = sched[side]["per_step"]["samples_s"]
        assert len(steps) == SCHEDULE_STEPS
        assert sched[side]["total_s"] == pytest.approx(statistics.mean(steps) * 10)


def test_full_schedule_indices():
    from bench.cpu import schedule_indices

    assert schedule_indices(250, "full", 25) == list(range(250))
    sample = schedule_indices(250, "sample", 25)
    assert len(sample) == 25 and sample[0] == 0 and sample[-1] == 249
    assert schedule_indices(10, "sample", 25) == list(range(10))


def test_flops_counted(results):
    """The convolutions' count is the one their shapes give (2 per multiply-add), counted here with hooks."""
    import torch

    from bench.cpu import make_setup
    from fxpass.config import from_dict

    setup = make_setup(from_dict(MINI))
    expected = []

    def count(conv, inputs, out):
        expected.append(2 * out.numel() * conv.in_channels // conv.groups * conv.weight[0, 0].numel())

    hooks = [m.register_forward_hook(count) for m in setup.model.modules()
             if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))]
    try:
        with torch.inference_mode():
            setup.model(*setup.eager_args())
    finally:
        for hook in hooks:
            hook.remove()
    flops = results["flops"]
    assert flops["by_op"]["convolution"] == sum(expected) and len(expected) > 10
    assert flops["flops"] == sum(flops["by_op"].values()) and flops["gflop"] == flops["flops"] / 1e9


def test_targets_are_reported_not_asserted(results):
    targets = results["targets"]
    assert targets["applies_here"] is False  # not the CAMUS config
    ids = [row["id"] for row in targets["rows"]]
    assert ids == ["fxpass_over_eager", "fxpass_over_naive", "lower_cli_s"]
    by_id = {row["id"]: row for row in targets["rows"]}
    assert by_id["lower_cli_s"]["met"] is None  # the CLI section was skipped: not measured
    for key in ("fxpass_over_eager", "fxpass_over_naive"):
        assert by_id[key]["met"] == (by_id[key]["value"] <= by_id[key]["limit"])


def test_tables_print(results):
    from rich.console import Console

    from bench.summary import print_results

    buffer = io.StringIO()
    print_results(results, Console(file=buffer, width=160))
    text = buffer.getvalue()
    assert "fxpass / naive" in text and "EXTRAPOLATED" in text and "GPU section skipped" in text


STUB = r'''
import json, sys
from pathlib import Path
args = sys.argv[1:]
if args[0] == "init":
    Path(args[1]).write_bytes(b"stub")
    sys.exit(0)
assert args[0] == "lower"
report = Path(args[args.index("--report") + 1])
# like fxpass lower's report: a numpy bool written through json.dumps(default=str)
report.write_text(json.dumps({"total_s": 0.05, "stages_s": {"load": 0.01, "capture": 0.02},
                              "onnx_nodes": 42, "check": {"passed": "True", "max_rel_to_scale": 1e-7}}))
'''


def test_lower_cli_times_the_subprocess_and_reads_its_report(tmp_path, monkeypatch):
    import bench.cpu

    stub = tmp_path / "fxpass_stub.py"
    stub.write_text(STUB, encoding="utf-8")
    monkeypatch.setattr(bench.cpu, "fxpass_command", lambda: [sys.executable, str(stub)])
    result = bench.cpu.lower_cli("cfg.yml")
    assert "error" not in result, result
    assert result["command"].startswith("fxpass lower model.pt -o model.onnx --report report.json --config cfg.yml")
    assert result["returncode"] == 0
    assert result["stages_s"] == {"load": 0.01, "capture": 0.02}
    assert result["check_and_other_s"] == pytest.approx(0.02)
    assert result["startup_s"] == pytest.approx(result["wall_s"] - 0.05)
    assert result["onnx_nodes"] == 42 and result["check_passed"] is True


def test_lower_cli_failure_is_recorded(tmp_path, monkeypatch):
    import bench.cpu

    stub = tmp_path / "fail.py"
    stub.write_text("import sys\nprint('fxpass: error: nope', file=sys.stderr)\nsys.exit(2)\n", encoding="utf-8")
    monkeypatch.setattr(bench.cpu, "fxpass_command", lambda: [sys.executable, str(stub)])
    result = bench.cpu.lower_cli(None)
    assert "fxpass init exited 2" in result["error"] and "nope" in result["error"]


def test_naive_model_is_the_model_without_the_check():
    import torch

    from bench.naive import NaiveUNetModel
    from fxpass.checkpoint import init_model
    from fxpass.config import from_dict

    small_cfg = from_dict(MINI)
    model = init_model(small_cfg, seed=0)
    naive = NaiveUNetModel.from_model(model)
    assert type(model).__name__ == "UNetModel" and isinstance(naive, type(model))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10])
    with torch.inference_mode():
        assert torch.equal(naive(x, t), model(x, t))
        too_late = torch.tensor([small_cfg.diffusion_steps + 1])
        with pytest.raises(RuntimeError, match="larger than diffusion steps"):
            model(x, too_late)
        naive(x, too_late)  # the check is gone


def test_gpu_section_skips_with_a_reason_without_cuda(monkeypatch):
    import torch

    from bench.gpu import skip_reason

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert skip_reason() == (f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__} "
                             "is a CPU-only build)")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert skip_reason() == "no CUDA device: torch.cuda.is_available() is False (no CUDA device visible)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert skip_reason() is None



@pytest.mark.slow
def test_gpu_section_dry_run_on_the_cpu():
    """``run_gpu(device="cpu")`` walks the section on the CPU: every row at each batch, in order, its figures
    from its own samples and its utilisation from the FLOPs given; TensorRT says why it was left out."""
    from bench.cpu import Options, make_setup
    from bench.gpu import BATCHES, run_gpu
    from fxpass.config import from_dict

    out = run_gpu(make_setup(from_dict(MINI)), Options(runs=7, warmup=0), flops_per_step=2e9,
                  log=lambda message: None, device="cpu", compile_mode=None)
    assert out["device"] == {"name": "cpu (dry run)", "cuda": None} and out["peak"] is None
    assert out["settings"]["compile_mode"] is None
    names = {"eager PyTorch": "fp32", "eager PyTorch (use_fp16)": "fp16", "fxpass fx graph (eager)": "fp16",
             "TensorRT (fxpass ONNX)": "fp16"}
    assert [(r["name"], r["precision"], r["batch"]) for r in out["rows"]] == [
        (name, precision, batch) for batch in BATCHES for name, precision in names.items()]
    for row in out["rows"]:
        if row["name"].startswith("TensorRT"):
            assert row == {"name": row["name"], "precision": "fp16", "batch": row["batch"],
                           "skipped": "dry run on the CPU"}
            continue
        _timing_ok(row)
        assert row["warmup"] == 3  # at least 3 before timing a device, whatever --warmup says
        assert row["achieved_tflops"] == pytest.approx(2e9 * row["batch"] / row["median_s"] / 1e12)
        assert "percent_of_peak" not in row  # no peak figure for a CPU

# ---- README section ----------------------------------------------------------------------------
def test_readme_section_replaces_only_between_markers(results):
    from bench.report import END, START, render_section, update_text

    before = "# fxpass\n\nintro\n\n"
    after = "\n\n## Layout\n\nunchanged | table\n"
    text = f"{before}{START}\nold numbers 123 ms\n{END}{after}"
    body = render_section(results, "bench/results/x.json")
    new = update_text(text, body)
    assert new.startswith(before + START + "\n## Performance\n")
    assert new.endswith(END + after)
    assert "old numbers" not in new
    assert update_text(new, body) == new  # idempotent
    assert results["machine"]["cpu_model"] in body and results["date"][:10] in body
    assert "EXTRAPOLATED".lower() in body.lower() or "extrapolated" in body


def test_readme_without_markers_gets_them_appended_and_bad_markers_refused(results):
    from bench.report import END, START, MarkerError, replace_between_markers, update_text

    new = update_text("# title\n", "## Performance\n\nx")
    assert new == f"# title\n\n{START}\n## Performance\n\nx\n{END}\n"
    with pytest.raises(MarkerError):
        update_text(f"{START}\na\n{START}\nb\n{END}\n", "x")
    with pytest.raises(MarkerError):
        replace_between_markers(f"{END}\na\n{START}\n", "x")


def test_readme_command_updates_a_file_from_the_latest_results(results, tmp_path):
    from bench.cli import main
    from bench.harness import write_results
    from bench.report import END, START, latest_results

    older = dict(results, date="2000-01-01T00:00:00+00:00")
    write_results(older, tmp_path / "results" / "old.json")
    write_results(results, tmp_path / "results" / "new.json")
    (tmp_path / "results" / "junk.json").write_text("{not json", encoding="utf-8")
    assert latest_results(tmp_path / "results", config=None).name == "new.json"
    with pytest.raises(FileNotFoundError):
        latest_results(tmp_path / "results")  # no CAMUS run among them
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{START}\nstale\n{END}\nbottom\n", encoding="utf-8")
    assert main(["--readme", "--results", str(tmp_path / "results" / "new.json"), "--readme-path", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith(f"top\n{START}\n## Performance") and text.endswith(f"{END}\nbottom\n")
    assert "stale" not in text


def test_interleaved_rounds_alternate_direction():
    from bench.harness import measure_interleaved

    calls = []
    result = measure_interleaved({name: (lambda n=name: calls.append(n)) for name in "abc"}, runs=7, warmup=0)
    assert "".join(calls) == "abc" + "cba" + "abc" + "cba" + "abc" + "cba" + "abc"
    assert all(len(r["samples_s"]) == 7 and r["interleaved"] for r in result.values())
