"""fxpass.formats (issue #16): ORT format, ExecuTorch .pte and Core ML .mlpackage on a tiny config.

Each format's tests skip with the reason when its dependency (the ``mobile`` extra) is missing;
Core ML predictions skip off macOS.  The .pte lowering and palettization take ~30 s each: slow.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from check_helpers import lower_format

import fxpass
from fxpass.checkpoint import init_model
from fxpass.config import CAMUS
from fxpass.errors import FxpassError
from fxpass.formats import FORMATS, format_unavailable_reason
from fxpass.schedule import respaced

TINY = CAMUS.replace(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16",
                     diffusion_steps=100, timestep_respacing="10")
SCHEDULE = respaced(100, "10")
T_INDEX = [0, 4, 9]


def _needs(fmt: str):
    reason = format_unavailable_reason(fmt)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def _rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(out).all()
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tiny_model():
    return init_model(TINY, seed=0).eval()


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save_model(fxpass.lower(tiny_model, config=TINY), str(path))
    return path


@pytest.fixture(scope="module")
def tiny_graph(tiny_model):
    """What fxpass.capture + fxpass.passes.rewrite make of the tiny model: inputs x, t_index."""
    from fxpass.capture import capture
    from fxpass.passes import rewrite
    from fxpass.pipeline import example_inputs_for

    gm = rewrite(capture(tiny_model, example_inputs_for(TINY, SCHEDULE[-1])), timesteps=SCHEDULE)
    inputs = dict(gm.meta["fxpass_example_inputs"])
    assert list(inputs) == ["x", "t_index"]
    return gm, inputs


def _eager(model, x: torch.Tensor, t_index: int) -> np.ndarray:
    with torch.no_grad():
        return model(x, torch.tensor([SCHEDULE[t_index]])).numpy()


# --- availability -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,module", [("ort", "onnxruntime"), ("pte", "executorch"), ("mlpackage", "coremltools")])
def test_missing_dependency_is_named_with_the_extra(monkeypatch, tmp_path, fmt, module):
    import importlib.util

    from fxpass.formats import _deps

    real = importlib.util.find_spec
    monkeypatch.setattr(_deps.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    reason = format_unavailable_reason(fmt)
    assert reason == f"--format {fmt} needs {module} (pip install 'fxpass[mobile]')"
    call = {"ort": lambda: fxpass.formats.to_ort(tmp_path / "m.onnx", tmp_path / "m.ort"),
            "pte": lambda: fxpass.formats.to_pte(torch.nn.Identity(), [torch.zeros(1)], tmp_path / "m.pte"),
            "mlpackage": lambda: fxpass.formats.to_mlpackage(torch.nn.Identity(), [torch.zeros(1)],
                                                             tmp_path / "m.mlpackage")}[fmt]
    with pytest.raises(FxpassError, match=r"needs .*pip install 'fxpass\[mobile\]'"):
        call()
    assert not list(tmp_path.iterdir())


def test_unknown_format_is_refused():
    assert FORMATS == ("ort", "pte", "mlpackage", "tflite")
    with pytest.raises(FxpassError, match="expected one of ort, pte, mlpackage, tflite"):
        format_unavailable_reason("tgz")


# --- ORT format -----------------------------------------------------------------------------------------

@_needs("ort")
def test_ort_format_equals_the_onnx(tiny_onnx, tmp_path):
    import onnxruntime as ort

    from fxpass.formats import to_ort

    out = tmp_path / "tiny.ort"
    report = to_ort(tiny_onnx, out)
    assert out.read_bytes()[4:8] == b"ORTM"  # the ORT format's flatbuffer identifier
    assert report["bytes"] == out.stat().st_size and report["check"]["passed"]
    assert report["check"]["t_index"] == T_INDEX
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.ort"]  # nothing left beside it
    onnx_sess = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    ort_sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in ort_sess.get_inputs()] == ["x", "t_index"]
    assert ort_sess.get_modelmeta().custom_metadata_map["fxpass.mode"] == "table"  # metadata carried over
    for t_index in T_INDEX:
        x = np.random.default_rng(100 + t_index).standard_normal((1, 3, 32, 32), dtype=np.float32)
        feeds = {"x": x, "t_index": np.array([t_index])}
        assert _rel(ort_sess.run(None, feeds)[0], onnx_sess.run(None, feeds)[0]) <= 1e-5


@_needs("ort")
def test_ort_format_from_a_proto_fixed_style(tiny_onnx, tmp_path):
    from fxpass.formats import to_ort

    report = to_ort(onnx.load(str(tiny_onnx)), tmp_path / "tiny.ort", optimization_style="Fixed")
    assert report["optimization_style"] == "Fixed" and report["check"]["max_rel_to_scale"] <= 1e-5
    # CPU fusions saved into the file: contrib ops the CoreML EP has no kernel for (hence Runtime by default)
    assert any(op.startswith("com.microsoft:") for op in report["ops"])
    with pytest.raises(FxpassError, match="optimization style"):
        to_ort(tiny_onnx, tmp_path / "x.ort", optimization_style="Eager")


@pytest.mark.slow
@_needs("ort")
def test_ort_format_of_an_fp16_model(tiny_model, tmp_path):
    from fxpass.formats import to_ort

    proto = fxpass.lower(tiny_model, config=TINY, precision="fp16")
    report = to_ort(proto, tmp_path / "tiny16.ort")
    assert report["check"]["tolerance"] == 1e-2 and report["check"]["passed"]
    # the Runtime style keeps the float16 weights (Fixed saved them as float32: 6.7 MB, Runtime 3.7 MB)
    assert report["bytes"] < 1.5 * report["onnx_bytes"] and report["optimization_style"] == "Runtime"


@_needs("ort")
def test_mobile_coverage_is_structured(tiny_onnx):
    from fxpass.formats import mobile_coverage

    cov = mobile_coverage(tiny_onnx)
    assert set(cov["eps"]) == {"NNAPI", "CoreML MLProgram", "CoreML NeuralNetwork"}
    assert cov["dynamic_inputs"] == []  # static batch 1
    for ep, info in cov["eps"].items():
        assert info["nodes"] == cov["nodes"] > 0
        assert 0 < info["nodes_supported"] <= info["nodes"]
        assert info["partitions"] == len(info["partition_sizes"]) >= 1
        assert sum(info["partition_sizes"]) == info["nodes_supported"]
        assert info["suitability"] in ("YES", "MAYBE", "NO")
        assert any(f"by the {ep} EP" in line for line in cov["log"])  # the tool's own lines, kept
    # the t_index table lookup: a Gather on a runtime index, which ML Program's op table lacks
    assert "ai.onnx:Gather" in cov["eps"]["CoreML MLProgram"]["unsupported_ops"]


# --- ExecuTorch .pte --------------------------------------------------------------------------------------

@pytest.mark.slow
@_needs("pte")
def test_pte_matches_eager_at_three_schedule_positions(tiny_model, tiny_graph, tmp_path):
    from fxpass.formats import run_pte, to_pte

    gm, inputs = tiny_graph
    out = tmp_path / "tiny.pte"
    report = to_pte(gm, inputs, out)
    assert report["bytes"] == out.stat().st_size and report["check"]["passed"]
    assert report["delegated_nodes"] > 0  # XNNPACK took part of the graph
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.pte"]
    for t_index in T_INDEX:
        x = torch.from_numpy(np.random.default_rng(200 + t_index).standard_normal((1, 3, 32, 32), dtype=np.float32))
        (got,) = run_pte(out, {"x": x, "t_index": torch.tensor([t_index])})
        assert _rel(got, _eager(tiny_model, x, t_index)) <= 1e-4


@_needs("pte")
def test_run_pte_refuses_a_missing_file(tmp_path):
    from fxpass.formats import run_pte

    with pytest.raises(FxpassError, match="no such .pte file"):
        run_pte(tmp_path / "absent.pte", [torch.zeros(1)])


# --- Core ML .mlpackage ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_mlpackage(tiny_graph, tmp_path_factory):
    if format_unavailable_reason("mlpackage"):
        pytest.skip(format_unavailable_reason("mlpackage"))
    from fxpass.formats import to_mlpackage

    gm, inputs = tiny_graph
    out = tmp_path_factory.mktemp("coreml") / "tiny.mlpackage"
    return out, to_mlpackage(gm, inputs, out)


def test_mlpackage_converts_and_validates_structurally(tiny_mlpackage, tiny_graph):
    from fxpass.formats import describe_mlpackage

    out, report = tiny_mlpackage
    spec = describe_mlpackage(out)
    assert spec["kind"] == "mlProgram" and out.is_dir()
    assert spec["inputs"] == [{"name": "x", "type": "multiArrayType", "shape": [1, 3, 32, 32], "dtype": "float32"},
                              {"name": "t_index", "type": "multiArrayType", "shape": [1], "dtype": "int32"}]
    assert spec["outputs"] == [{"name": "out", "type": "multiArrayType", "shape": [1, 6, 32, 32], "dtype": "float32"}]
    assert spec["ops"]["conv"] > 0 and spec["ops"]["gather"] > 0 and spec["ops"]["softmax"] > 0
    # float16 weights: 2 bytes per element of the rewritten graph's tensors (the time MLP folded into
    # 10-row tables), plus the blob's per-tensor headers and alignment
    elements = sum(t.numel() for t in tiny_graph[0].state_dict().values() if t.is_floating_point())
    assert 2 * elements <= spec["weights_bytes"] < 2.1 * elements
    assert report["bytes"] == spec["bytes"] and report["precision"] == "fp16"


def test_mlpackage_numerics_need_macos(tiny_mlpackage, tiny_model):
    from fxpass.formats.mlpackage import (
        predict_mlpackage,
        predictions_unavailable_reason,
    )

    out, report = tiny_mlpackage
    reason = predictions_unavailable_reason()
    if reason is not None:
        assert report["check"] == {"skipped": reason}  # said so, never counted as passed
        pytest.skip(reason)
    assert report["check"]["passed"]
    for t_index in T_INDEX:
        x = torch.from_numpy(np.random.default_rng(300 + t_index).standard_normal((1, 3, 32, 32), dtype=np.float32))
        (got,) = predict_mlpackage(out, {"x": x, "t_index": np.array([t_index], np.int32)})
        assert _rel(got, _eager(tiny_model, x, t_index)) <= 2e-2


@_needs("mlpackage")
def test_mlpackage_palettize_bits_are_checked(tiny_graph, tmp_path):
    """(A palettized package is made by the CLI test below: one k-means conversion for both.)"""
    from fxpass.formats import to_mlpackage

    gm, inputs = tiny_graph
    with pytest.raises(FxpassError, match="palettize bits"):
        to_mlpackage(gm, inputs, tmp_path / "x.mlpackage", palettize_bits=5)
    assert not (tmp_path / "x.mlpackage").exists()


# ---- fxpass lower --format --------------------------------------------------------------------------
@_needs("ort")
def test_cli_lower_format_ort_reports_mobile_coverage(tiny_ckpt, tiny_yaml, tmp_path, capsys):
    import json

    from fxpass.cli import main

    out, report = tmp_path / "m.ort", tmp_path / "r.json"
    assert main(["lower", str(tiny_ckpt), "--config", str(tiny_yaml), "-o", str(out), "--format", "ort",
                 "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "ort file" in printed and "CoreML MLProgram EP" in printed
    data = json.loads(report.read_text())["format"]
    assert data["name"] == "ort" and data["check"]["passed"] and data["check"]["max_rel_to_scale"] <= 1e-5
    assert out.stat().st_size == data["bytes"] > 0
    ml = data["coverage"]["eps"]["CoreML MLProgram"]
    # every GroupNorm expanded for mobile: all but the table lookup on CoreML, 2 partitions (measured 359/360)
    assert ml["nodes_supported"] >= 0.95 * ml["nodes"] and len(ml["partition_sizes"]) <= 3, ml["unsupported_ops"]
    # the file holds the graph the check counted: no CPU-only contrib op fused into it (Runtime style)
    assert data["optimization_style"] == "Runtime" and sum(data["ops"].values()) == data["coverage"]["nodes"]
    assert not any(op.startswith("com.microsoft:") for op in data["ops"])
    assert not (tmp_path / "m.onnx").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.ort", "r.json"]


def test_a_report_that_cannot_be_written_takes_the_format_file_back(tiny_ckpt, tiny_yaml, tmp_path, capsys,
                                                                     monkeypatch):
    import fxpass.fileio
    from fxpass.cli import main
    from fxpass.errors import FxpassError

    def refuse(path, write, **_):
        raise FxpassError(f"{path}: cannot write (disk full)")

    monkeypatch.setattr(fxpass.fileio, "atomic_write_bytes", refuse)
    out, report = tmp_path / "m.ort", tmp_path / "r.json"
    code = main(["lower", str(tiny_ckpt), "--config", str(tiny_yaml), "-o", str(out), "--format", "ort",
                 "--report", str(report)])
    assert code == 2 and "r.json: cannot write (disk full)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the .ort file nor the report


@pytest.mark.slow
@_needs("mlpackage")
def test_cli_lower_format_mlpackage_writes_a_package_and_refuses_to_replace_it(tiny_ckpt, tiny_yaml, tiny_mlpackage,
                                                                              tmp_path, capsys):
    """One palettized conversion through the CLI (the plain one is the API's ``tiny_mlpackage``)."""
    from fxpass.cli import main

    out, report = tmp_path / "p.mlpackage", tmp_path / "p.json"
    args = ["lower", str(tiny_ckpt), "--config", str(tiny_yaml), "-o", str(out), "--format", "mlpackage",
            "--palettize-bits", "6"]
    assert main([*args, "--report", str(report)]) == 0 and out.is_dir()
    assert "Core ML predictions need macOS" in capsys.readouterr().out
    written = json.loads(report.read_text())["format"]
    assert written["palettize_bits"] == 6 and written["spec"]["ops"]["constexpr_lut_to_dense"] > 0
    assert written["bytes"] < 0.5 * tiny_mlpackage[1]["bytes"]  # 6-bit palettes against float16 weights
    assert written["spec"]["weights_bytes"] < 0.5 * tiny_mlpackage[1]["spec"]["weights_bytes"]
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_cli_palettize_bits_needs_mlpackage(tiny_ckpt, tiny_yaml, tmp_path, capsys):
    from fxpass.cli import main

    code = main(["lower", str(tiny_ckpt), "--config", str(tiny_yaml), "-o", str(tmp_path / "m.onnx"),
                 "--palettize-bits", "6"])
    assert code == 2 and "--palettize-bits 6: applies to --format mlpackage only" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


# ---- the step graph on every format (x, t_index, noise -> x_prev, pred_xstart) --------------------------
def _step_reference(model, t_index: int, config=TINY):
    """Seeded step inputs and what the eager model + the NumPy sampler's posterior make of them."""
    from fxpass.diffusion import Diffusion
    from targets.step_ref import NumpyStepRunner

    rng = np.random.default_rng(300 + t_index)
    feed = {"x": rng.standard_normal((1, 3, 32, 32), dtype=np.float32), "t_index": np.array([t_index]),
            "noise": rng.standard_normal((1, 3, 32, 32), dtype=np.float32)}
    diffusion = Diffusion.from_config(config.to_dict())
    runner = NumpyStepRunner(model, diffusion, respaced(config.diffusion_steps, config.timestep_respacing))
    with runner:
        ref = runner.infer(feed)
    return feed, [ref["x_prev"], ref["pred_xstart"]], diffusion.sqrt_recipm1_alphas_cumprod[t_index]


def _step_error(got, ref, amplification: float) -> float:
    """x_prev's error; pred_xstart's divided by sqrt(1/alpha_bar - 1), which multiplies eps's (as the gate)."""
    return max(_rel(got[0], ref[0]), _rel(got[1], ref[1]) / max(amplification, 1.0))


@_needs("ort")
def test_step_graph_as_ort_equals_eager_and_is_covered_by_coreml(tiny_ckpt, tiny_yaml, tmp_path, capsys):
    import onnxruntime as ort
    import yaml

    from fxpass.checkpoint import load_model
    from fxpass.config import from_dict

    out = tmp_path / "step.ort"
    data = lower_format(tiny_ckpt, tiny_yaml, out, "--format", "ort", "--step-graph")
    assert data["check"]["passed"] and data["check"]["max_rel_to_scale"] <= 1e-5
    assert data["check"]["outputs"] == ["x_prev", "pred_xstart"] and data["check"]["t_index"] == [0, 4, 9]
    ml = data["coverage"]["eps"]["CoreML MLProgram"]  # measured 386/394 nodes in 2 partitions
    assert ml["nodes_supported"] >= 0.95 * ml["nodes"] and len(ml["partition_sizes"]) <= 3, ml["unsupported_ops"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "t_index", "noise"]
    config = from_dict(yaml.safe_load(tiny_yaml.read_text()))  # the CLI's checkpoint, not this module's TINY
    model = load_model(tiny_ckpt, config)
    for t_index in T_INDEX:
        feed, ref, amplification = _step_reference(model, t_index, config)
        assert _step_error(session.run(None, feed), ref, amplification) <= 1e-4


@pytest.mark.slow
@_needs("pte")
def test_step_graph_as_pte_matches_eager_and_keeps_the_update_in_float32(tiny_model, tiny_graph, tmp_path):
    from fxpass.formats import run_pte, to_pte
    from fxpass.formats.pte import half_compute
    from fxpass.step_graph import step_module

    gm, inputs = tiny_graph
    step, step_inputs = step_module(gm, TINY, inputs)
    assert list(step_inputs) == ["x", "t_index", "noise"] and step_inputs["noise"].abs().max() > 0
    out = tmp_path / "step.pte"
    report = to_pte(step, step_inputs, out, rows=len(SCHEDULE))
    assert report["check"]["passed"] and report["check"]["t_index"] == [0, 4, 9]
    for t_index in T_INDEX:
        feed, ref, amplification = _step_reference(tiny_model, t_index)
        got = run_pte(out, {k: torch.from_numpy(v) for k, v in feed.items()})
        assert _step_error(got, ref, amplification) <= 1e-4
    half = half_compute(step)  # float16 U-Net, float32 posterior tables and update
    assert half.step_coef1.dtype == torch.float32 and next(half.unet.parameters()).dtype == torch.float16
    assert step.step_coef1.data_ptr() == half.step_coef1.data_ptr()  # shared, not copied


@pytest.mark.slow
@_needs("mlpackage")
def test_step_graph_as_mlpackage_validates_structurally(tiny_ckpt, tiny_yaml, tmp_path, capsys):
    from fxpass.cli import main
    from fxpass.formats.mlpackage import predictions_unavailable_reason

    out, report = tmp_path / "step.mlpackage", tmp_path / "r.json"
    assert main(["lower", str(tiny_ckpt), "--config", str(tiny_yaml), "-o", str(out), "--format", "mlpackage",
                 "--step-graph", "--report", str(report)]) == 0
    written = json.loads(report.read_text())["format"]
    spec = written["spec"]
    assert [(i["name"], i["shape"], i["dtype"]) for i in spec["inputs"]] == [
        ("x", [1, 3, 32, 32], "float32"), ("t_index", [1], "int32"), ("noise", [1, 3, 32, 32], "float32")]
    assert [o["name"] for o in spec["outputs"]] == ["x_prev", "pred_xstart"]
    assert spec["ops"]["clip"] >= 1 and spec["ops"]["exp"] >= 1  # the clipped pred_xstart, the variance
    reason = predictions_unavailable_reason()
    if reason is None:  # macOS: the numeric check ran
        assert written["check"]["passed"], written["check"]
    else:  # elsewhere it says why it did not, and never counts as passed
        assert written["check"] == {"skipped": reason}
        assert "Core ML predictions need macOS" in capsys.readouterr().out


# ---- int8 as ORT format -------------------------------------------------------------------------------
@_needs("ort")
def test_int8_as_ort_equals_its_onnx(tiny_ckpt, tiny_yaml, tmp_path, capsys):
    from fxpass.cli import main

    out, report = tmp_path / "q.ort", tmp_path / "q.json"
    assert main(["lower", str(tiny_ckpt), "--config", str(tiny_yaml), "-o", str(out), "--format", "ort",
                 "--precision", "int8", "--calibrate-on-samples", "--calibration-steps", "3", "--calibration-samples", "2",
                 "--eval-samples", "1", "--report", str(report)]) == 0
    written = json.loads(report.read_text())
    data = written["format"]
    assert written["precision"] == "int8" and data["check"]["tolerance"] == 1e-2
    assert data["optimization_style"] == "Fixed"  # the CPU EP's fused int8 kernels, as the ONNX run has them
    assert data["check"]["passed"] and data["check"]["max_rel_to_scale"] <= 1e-2
    ml = data["coverage"]["eps"]["CoreML MLProgram"]  # CoreML has no QuantizeLinear/DequantizeLinear
    assert {"ai.onnx:QuantizeLinear", "ai.onnx:DequantizeLinear"} & set(ml["unsupported_ops"])
