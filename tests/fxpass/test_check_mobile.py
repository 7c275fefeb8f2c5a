"""``fxpass check FILE.ort`` (issue #26): an ORT-format file re-checked in ONNX Runtime against the eager model,
table and step mode, at the precision the user asks for, after its precision's structure rule
(``fxpass/formats/ort_file.py`` reads its op types and weight types from the flatbuffer)."""

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
                              ("wstep.ort", other, ("--step-graph",))):
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
