"""``fxpass check --targets ...,openvino[,openvino-bf16]``: OpenVINO rows against the eager model and golden
sets; an OpenVINO that cannot run here (not installed, no bf16 on this CPU) is exit 3, never "pass"."""

from __future__ import annotations

import sys

import pytest

import targets.openvino as ov_target
from fxpass.cli import main
from fxpass.verify import parse_targets
from targets.openvino import TOLERANCES, openvino_unavailable_reason

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")

NOT_INSTALLED = "OpenVINO is not installed (pip install 'fxpass[openvino]')"


def run(capsys, argv: list) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_target_names_and_aliases():
    assert parse_targets("torch,openvino,openvino-bf16") == ["torch", "openvino", "openvino-bf16"]
    assert parse_targets("torch, OV ,openvino-f32,ov-bf16") == ["torch", "openvino", "openvino-bf16"]


def _need(precision: str) -> None:
    """Skip, with the reason, where OpenVINO cannot run at ``precision`` (exit 3 there is tested below with
    OpenVINO made unavailable on purpose)."""
    reason = openvino_unavailable_reason(precision)
    if reason is not None:
        pytest.skip(f"OpenVINO {precision} unavailable: {reason}")


def test_openvino_f32_passes_the_tiny_lowering(capsys, tiny_onnx, tiny_ckpt):
    _need("f32")
    code, out, err = run(capsys, ["check", tiny_onnx, "--model", tiny_ckpt, "--targets", "torch,ort,openvino"])
    assert code == 0, out + err
    row = next(ln for ln in out.splitlines() if "openvino-cpu-f32" in ln)
    assert "torch-fp32" in row and row.split()[-1] == "pass"
    assert "onnxrt-cpu" in out and "check: pass" in out


def test_openvino_bf16_passes_at_its_tolerance(capsys, tiny_onnx, tiny_ckpt):
    _need("bf16")
    atol = TOLERANCES["bf16"][0]
    code, out, err = run(capsys, ["check", tiny_onnx, "--model", tiny_ckpt, "--targets", "torch,openvino-bf16",
                                  "--tolerance", f"{atol},0"])
    assert code == 0, out + err
    row = next(ln for ln in out.splitlines() if "openvino-cpu-bf16" in ln)
    assert row.split()[-1] == "pass"
    # bf16 really computed in bfloat16: the float32 tolerance would not hold
    code, out, err = run(capsys, ["check", tiny_onnx, "--model", tiny_ckpt, "--targets", "torch,openvino-bf16",
                                  "--tolerance", "fp32"])
    assert code == 1, out + err
    assert "openvino-cpu-bf16 vs torch-fp32: FAIL" in out


def test_a_cpu_without_bf16_is_exit_3_never_passed(capsys, monkeypatch, tiny_onnx, tiny_ckpt):
    _need("f32")
    monkeypatch.setattr(ov_target, "_cpu_capabilities", lambda core: ["FP32", "INT8"])
    code, out, err = run(capsys, ["check", tiny_onnx, "--model", tiny_ckpt,
                                  "--targets", "torch,openvino,openvino-bf16"])
    assert code == 3, out + err
    assert ("openvino-cpu-bf16: unavailable: this CPU has no bf16 support "
            "(OpenVINO's CPU plugin reports FP32, INT8)") in out
    assert "check: pass" not in out and "check: incomplete (unavailable targets)" in out
    row = next(ln for ln in out.splitlines() if "openvino-cpu-f32" in ln)
    assert row.split()[-1] == "pass"  # the target that can run still ran


@pytest.mark.parametrize("targets", ["torch,ort,openvino", "torch,openvino-bf16"])
def test_openvino_not_importable_is_exit_3_never_passed(capsys, monkeypatch, tiny_onnx, tiny_ckpt, targets):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an environment without it looks like
    code, out, err = run(capsys, ["check", tiny_onnx, "--model", tiny_ckpt, "--targets", targets])
    assert code == 3, out + err
    name = "openvino-cpu-bf16" if targets.endswith("bf16") else "openvino-cpu-f32"
    assert f"{name}: unavailable: {NOT_INSTALLED}" in " ".join(out.split())
    assert "check: pass" not in out


def test_openvino_against_a_golden_set(capsys, tiny_onnx, tiny_onnx_perturbed, tiny_golden):
    _need("f32")
    code, out, err = run(capsys, ["check", tiny_onnx, "--golden", tiny_golden, "--targets", "ort,openvino"])
    assert code == 0, out + err
    assert "2 against golden" in " ".join(out.split())
    code, out, err = run(capsys, ["check", tiny_onnx_perturbed, "--golden", tiny_golden, "--targets", "openvino"])
    assert code == 1, out + err
    assert "openvino-cpu-f32 vs golden: FAIL" in out


def test_bf16_rows_default_to_the_bf16_tolerance(capsys, tiny_onnx, tiny_ckpt, tiny_golden):
    """Without --tolerance each runner is checked at its own: ONNX Runtime at fp32's, OpenVINO bf16 at bf16's."""
    _need("bf16")
    code, out, err = run(capsys, ["check", tiny_onnx, "--model", tiny_ckpt, "--golden", tiny_golden,
                                  "--targets", "torch,ort,openvino-bf16"])
    assert code == 0, out + err
    rows = [ln.split() for ln in out.splitlines() if ln.split()[:1] in (["torch-fp32"], ["golden"])]
    tolerances = {(r[0], r[1]): r[4] for r in rows}
    assert tolerances == {("torch-fp32", "onnxrt-cpu"): "0.0001", ("torch-fp32", "openvino-cpu-bf16"): "0.07",
                          ("golden", "onnxrt-cpu"): "0.0001", ("golden", "openvino-cpu-bf16"): "0.07"}
    assert all(r[-1] == "pass" for r in rows)
