"""``fxpass check FILE.ort`` / ``FILE.tflite`` (issue #26): a mobile file re-checked in its runtime against the eager
model, table and step mode, at the precision the user asks for, after its precision's structure rule
(``fxpass/formats/ort_file.py`` reads an .ort file's op types and weight types from the flatbuffer) and, at a
reduced precision, after re-deriving the float32 graph it records (``fxpass.float32_graph``)."""

from __future__ import annotations

import pytest
from check_helpers import lower_on_one_thread
from conftest import TINY

from fxpass.cli import main
from fxpass.errors import FxpassError
from fxpass.formats import format_unavailable_reason

pytestmark = [pytest.mark.slow, pytest.mark.skipif(format_unavailable_reason("ort") is not None,
                                                   reason=format_unavailable_reason("ort") or "")]


@pytest.fixture(scope="module")
def ort_files(tmp_path_factory, tiny_ckpt, tiny_yaml):
    """The tiny checkpoint as .ort at fp32 and fp16 (table mode) and as a step graph, and another seed's
    checkpoint (the wrong model) with its own .ort table and step ort_files."""
    from fxpass.checkpoint import init_model, save_checkpoint
    from fxpass.config import from_dict

    root = tmp_path_factory.mktemp("check-ort")
    other = root / "other.pt"
    save_checkpoint(init_model(from_dict(TINY), seed=1), other)
    out = {"ckpt": tiny_ckpt, "other": other}
    for name, ckpt, flags in (("m.ort", tiny_ckpt, ()), ("m16.ort", tiny_ckpt, ("--precision", "fp16")),
                              ("step.ort", tiny_ckpt, ("--step-graph",)), ("w.ort", other, ()),
                              ("wstep.ort", other, ("--step-graph",)),
                              ("m8.ort", tiny_ckpt, ("--precision", "int8", "--calibrate-on-samples")),
                              ("w8.ort", other, ("--precision", "int8", "--calibrate-on-samples"))):
        out[name] = root / name
        assert lower_on_one_thread(ckpt, "--config", tiny_yaml, "-o", out[name], "--format", "ort", *flags) == 0
    return out


def _check(capsys, *argv):
    code = main(["check", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_an_ort_files_facts_come_from_its_flatbuffer(ort_files, tiny_onnx):
    from fxpass.formats.ort_file import read_ort

    fp32, fp16, step = read_ort(ort_files["m.ort"]), read_ort(ort_files["m16.ort"]), read_ort(ort_files["step.ort"])
    assert (fp32.mode, fp32.precision, fp32.float16) == ("table", "fp32", False)
    assert (fp16.precision, fp16.float16) == ("fp16", True)
    assert {"Conv", "Gather", "MatMul"} <= fp32.op_types and "QuantizeLinear" not in fp32.op_types
    assert step.mode == "step" and list(step.inputs) == ["x", "t_index", "noise"]
    assert fp32.inputs == {"x": ("float32", [1, 3, 32, 32]), "t_index": ("int64", [1])}
    with pytest.raises(FxpassError, match="not an ORT-format model"):
        read_ort(tiny_onnx)


def test_the_true_checkpoint_passes_in_every_mode(ort_files, capsys):
    for name, flags in (("m.ort", ()), ("m16.ort", ("--precision", "fp16")), ("step.ort", ())):
        code, out = _check(capsys, ort_files[name], "--model", ort_files["ckpt"], *flags)
        assert code == 0, out
    code, out = _check(capsys, ort_files["step.ort"], "--model", ort_files["ckpt"])
    assert "onnxrt-cpu vs eager model + NumPy posterior" in out and ": pass" in out


def test_another_checkpoints_files_fail(ort_files, capsys):
    for name in ("w.ort", "wstep.ort"):
        code, out = _check(capsys, ort_files[name], "--model", ort_files["ckpt"])
        assert code == 1 and "FAIL" in out, out


def test_the_precision_comes_from_the_user_not_the_file(ort_files, capsys):
    code, out = _check(capsys, ort_files["m16.ort"], "--model", ort_files["ckpt"])  # reduced precision, none asked
    assert code == 2 and "add --precision fp16" in out
    code, out = _check(capsys, ort_files["m.ort"], "--model", ort_files["ckpt"], "--precision", "int8")
    assert code != 0 and "metadata says fp32" in out


def test_an_ort_file_takes_only_its_own_runtime(ort_files, capsys):
    code, out = _check(capsys, ort_files["m.ort"], "--model", ort_files["ckpt"], "--targets", "torch,trt")
    assert code == 2 and "--targets torch,ort" in out and out.count("\n") == 1


def test_a_reduced_precision_file_must_be_made_from_the_models_float32_graph(ort_files, capsys):
    """int8's numeric bound (0.2·max|ref|) lets defects through; the float32 graph the file records is re-derived
    from the model it is checked against, before any number."""
    code, out = _check(capsys, ort_files["m8.ort"], "--model", ort_files["ckpt"], "--precision", "int8")
    assert code == 0 and "made from the float32 graph of" in out, out
    code, out = _check(capsys, ort_files["w8.ort"], "--model", ort_files["ckpt"], "--precision", "int8")
    assert code == 1 and "not made from the float32 graph of" in out, out


def test_the_recorded_digest_is_the_verified_onnx_graphs(ort_files, tiny_onnx):
    import onnx

    from fxpass.formats.ort_file import read_ort
    from fxpass.metadata import graph_digest, parse, read_props

    onnx_meta = parse(read_props(onnx.load(str(tiny_onnx), load_external_data=False)))
    assert onnx_meta.float32_graph == graph_digest(onnx.load(str(tiny_onnx)))
    assert read_ort(ort_files["m8.ort"]).meta.float32_graph.startswith("sha256:")
    assert read_ort(ort_files["m8.ort"]).meta.float32_graph != read_ort(ort_files["w8.ort"]).meta.float32_graph


@pytest.mark.skipif(format_unavailable_reason("tflite") is not None, reason=format_unavailable_reason("tflite") or "")
def test_an_int8_tflite_of_a_defective_model_fails_before_its_numbers(tmp_path, tiny_ckpt, tiny_yaml, capsys):
    """One attention block's output zeroed: LiteRT's dynamic-range int8 bound is loose; the recorded float32
    graph is not the true checkpoint's."""
    import torch

    state = torch.load(tiny_ckpt, weights_only=True)
    for key in [k for k in state if "proj_out" in k][:2]:
        state[key] = torch.zeros_like(state[key])
    torch.save(state, tmp_path / "defect.pt")
    for name, ckpt in (("true.tflite", tiny_ckpt), ("defect.tflite", tmp_path / "defect.pt")):
        assert lower_on_one_thread(ckpt, "--config", tiny_yaml, "-o", tmp_path / name, "--format", "tflite",
                                   "--precision", "int8") == 0
    code, out = _check(capsys, tmp_path / "true.tflite", "--model", tiny_ckpt, "--precision", "int8")
    assert code == 0, out
    code, out = _check(capsys, tmp_path / "defect.tflite", "--model", tiny_ckpt, "--precision", "int8")
    assert code == 1 and "not made from the float32 graph of" in out, out
    assert _litert_error(tmp_path / "defect.tflite", tiny_ckpt, tiny_yaml) < 0.2  # its numbers alone would pass


def _litert_error(path, ckpt, config) -> float:
    """max|LiteRT - true eager| / max|eager| at the first, middle and last t_index on a seeded x."""
    import numpy as np
    import torch

    from fxpass.checkpoint import load_model
    from fxpass.config import load_config
    from fxpass.formats.tflite import run_tflite
    from fxpass.formats.tflite_file import read_tflite

    model, steps = load_model(ckpt, load_config(config)).eval(), read_tflite(path).model_timesteps
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    worst = 0.0
    for i in (0, len(steps) // 2, len(steps) - 1):
        got = run_tflite(path, {"x": x, "t_index": np.array([i])})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(x), torch.tensor([steps[i]])).numpy()
        worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
    return worst
