"""``fxpass check``: Polygraphy comparisons of a lowered model with PyTorch, ONNX Runtime, TensorRT, golden sets."""

from __future__ import annotations

import sys

import onnx
import pytest

from fxpass.cli import main
from targets.trt import trt_unavailable_reason

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


def run(capsys, argv: list) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_passes_a_good_lowering(capsys, tiny_onnx, tiny_ckpt):
    code, out, err = run(capsys, ["check", tiny_onnx, "--model", tiny_ckpt])
    assert code == 0, out + err
    assert "torch-fp32" in out and "onnxrt-cpu" in out and "pass" in out
    assert "FAIL" not in out
    assert "check: pass" in out
    assert "5 against torch-fp32" in " ".join(out.split())  # t_index spread over the 10-step schedule


def test_fails_a_weight_scaled_by_1_001(capsys, tiny_onnx_perturbed, tiny_ckpt):
    code, out, err = run(capsys, ["check", tiny_onnx_perturbed, "--model", tiny_ckpt])
    assert code == 1, out + err
    assert "FAIL" in out
    # the line naming the worst input: about 1e-3 of the output's scale against a tolerance of 1e-4
    line = next(ln for ln in out.splitlines() if ln.startswith("onnxrt-cpu vs torch-fp32: FAIL"))
    assert "t_index" in line and "> 0.0001" in line
    assert "check: FAIL" in out


def test_a_looser_tolerance_passes_the_perturbed_model(capsys, tiny_onnx_perturbed, tiny_ckpt):
    code, out, _ = run(capsys, ["check", tiny_onnx_perturbed, "--model", tiny_ckpt, "--tolerance", "1e-2,0"])
    assert code == 0, out


def test_tensorrt_unavailable_is_exit_3_never_passed(capsys, tiny_onnx, tiny_ckpt):
    reason = trt_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a CUDA device are available here (test_check_with_tensorrt_passes runs the "
                    "comparison)")
    code, out, err = run(capsys, ["check", tiny_onnx, "--model", tiny_ckpt, "--targets", "torch,ort,trt"])
    assert code == 3, out + err
    assert f"tensorrt: unavailable: {reason}" in out
    assert "check: pass" not in out
    assert "onnxrt-cpu" in out  # the targets that can run still ran


def test_golden_only(capsys, tiny_onnx, tiny_onnx_perturbed, tiny_golden):
    code, out, err = run(capsys, ["check", tiny_onnx, "--golden", tiny_golden])
    assert code == 0, out + err
    assert "2 against golden" in " ".join(out.split()) and "against torch-fp32" not in out
    code, out, err = run(capsys, ["check", tiny_onnx_perturbed, "--golden", tiny_golden])
    assert code == 1, out + err
    assert "onnxrt-cpu vs golden: FAIL" in out


def test_golden_and_torch_together(capsys, tiny_onnx, tiny_ckpt, tiny_golden):
    code, out, err = run(capsys, ["check", tiny_onnx, "--model", tiny_ckpt, "--golden", tiny_golden, "--seed", "3"])
    assert code == 0, out + err
    assert "2 against golden" in " ".join(out.split()) and "5 against torch-fp32" in " ".join(out.split())


def test_plot_writes_a_png_over_every_t_index(capsys, tmp_path, tiny_onnx, tiny_ckpt):
    pytest.importorskip("matplotlib")
    png = tmp_path / "error.png"
    code, out, err = run(capsys, ["check", tiny_onnx, "--model", tiny_ckpt, "--plot", png])
    assert code == 0, out + err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    assert "10 against torch-fp32" in " ".join(out.split())  # the whole 10-step schedule
    assert [p.name for p in tmp_path.iterdir()] == ["error.png"]  # no temp file left


def test_plot_without_matplotlib_is_a_one_line_error(capsys, monkeypatch, tmp_path, tiny_onnx, tiny_ckpt):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it looks like
    code, out, err = run(capsys, ["check", tiny_onnx, "--model", tiny_ckpt, "--plot", tmp_path / "e.png"])
    assert code == 2
    assert err.strip() == "fxpass: error: --plot: matplotlib is not installed (pip install 'fxpass[plot]')"
    assert not (tmp_path / "e.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--targets", "torch,ort,cuda"], "--targets torch,ort,cuda: unknown target 'cuda' (choose from torch, ort, trt, openvino, openvino-bf16, litert)"),
        (["--tolerance", "tight"], "--tolerance: tolerance 'tight': expected fp32, fp16 or ATOL,RTOL"),
        (["--targets", "ort"], "--targets ort: nothing to compare against; add torch or give --golden DIR"),
    ],
)
def test_usage_errors(capsys, tiny_onnx, tiny_ckpt, argv, message):
    code, out, err = run(capsys, ["check", tiny_onnx, "--model", tiny_ckpt, *argv])
    assert code == 2
    assert err.strip() == f"fxpass: error: {message}"


def test_torch_target_needs_the_checkpoint(capsys, tiny_onnx):
    code, _, err = run(capsys, ["check", tiny_onnx])
    assert code == 2
    assert err.startswith("fxpass: error: --model MODEL.pt is needed for the torch reference")


def test_file_errors(capsys, tmp_path, tiny_ckpt):
    missing = tmp_path / "missing.onnx"
    code, _, err = run(capsys, ["check", missing, "--model", tiny_ckpt])
    assert (code, err.strip()) == (2, f"fxpass: error: {missing}: no such file")

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf" * 10)
    code, _, err = run(capsys, ["check", garbage, "--model", tiny_ckpt])
    assert code == 2 and err.startswith(f"fxpass: error: {garbage}: not a readable ONNX model")

    plain = tmp_path / "plain.onnx"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph), str(plain))
    code, _, err = run(capsys, ["check", plain, "--model", tiny_ckpt])
    assert code == 2 and err.startswith(f"fxpass: error: {plain}: not an fxpass model")

    code, _, err = run(capsys, ["check", plain, "--golden", tmp_path / "nope"])
    assert code == 2 and "not an fxpass model" in err


def test_golden_set_of_another_model_is_refused(capsys, tmp_path, tiny_golden):
    """A golden set whose inputs do not fit the model: one line naming the set, no comparison."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 64, 64])
    t = onnx.helper.make_tensor_value_info("t_index", onnx.TensorProto.INT64, [1])
    y = onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 3, 64, 64])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["out"])], "g", [x, t], [y])
    model = onnx.helper.make_model(graph)
    for key, value in {"fxpass.mode": "table", "fxpass.timesteps": "[0, 50, 99]"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path = tmp_path / "other.onnx"
    onnx.save(model, str(path))
    code, _, err = run(capsys, ["check", path, "--golden", tiny_golden])
    assert code == 2
    assert err.strip() == (f"fxpass: error: {tiny_golden}: input x has shape (1, 3, 32, 32), "
                           "other.onnx expects (1, 3, 64, 64)")


@pytest.mark.trt
@pytest.mark.skipif(trt_unavailable_reason() is not None, reason=f"TensorRT unavailable: {trt_unavailable_reason()}")
def test_check_with_tensorrt_passes(capsys, tiny_onnx, tiny_ckpt):
    assert main(["check", str(tiny_onnx), "--model", str(tiny_ckpt), "--targets", "torch,ort,trt"]) == 0
    assert "tensorrt" in capsys.readouterr().out
