"""Reduced precision judged on the trained reference (fxpass/reference): int8 with its measured plan,
and bf16 on OpenVINO, by the eps-MSE ratio to float32 along the whole schedule and by inpainting.

Measured on this machine (OpenVINO 2026.4.1, ONNX Runtime 1.32; held-out images 100..163, every one of
the 50 steps, seed 0), int8 planned with the default options on heldout/ (calibration images 0..3,
evaluation 4..7): the plan keeps 15 of 82 layers in float (the input and output convolutions and
convolutions at 32 and 16 px); eps-MSE ratio at most 1.0412 on ONNX Runtime (t_index 0; median over
the steps 1.0035) and 1.0392 on OpenVINO.  bf16 on OpenVINO: 1.129 at t_index 0 (the target, 1.01, is
not met there: near t = 0 the noise to be found is below bf16's 8-bit mantissa on x), 1.0015 at best.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from fxpass.denoisers import OnnxDenoiser, make_denoiser, runtime_unavailable_reason
from fxpass.fidelity import eps_mse_along_t
from fxpass.images import load_image_dir
from fxpass.precision import Int8Options, layers_of, quantize_int8
from fxpass.reference import HELDOUT_DIR

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread_module")]

IMAGES = slice(100, 116)  # held out from calibration (0..3) and the plan's evaluation (4..7)


@pytest.fixture(scope="module")
def planned(digits_onnx, tmp_path_factory):
    fp32 = digits_onnx("fp32")
    proto = onnx.load(str(fp32))
    quantized, info = quantize_int8(proto, options=Int8Options(calibration_data=HELDOUT_DIR, threads=1))
    path = tmp_path_factory.mktemp("int8") / "digits-int8.onnx"
    onnx.save(quantized, str(path))
    return fp32, path, info, layers_of(proto)


def _ratios(fp32, other, count=None):
    ref = OnnxDenoiser(fp32, threads=1)
    x0 = load_image_dir(HELDOUT_DIR, 32, None)[IMAGES]
    rows = eps_mse_along_t({"fp32": ref, "other": other}, x0, ref.diffusion, reference="fp32", seed=0)
    return np.array([r["ratio"]["other"] for r in rows])


def test_the_plan_keeps_the_sensitive_layers_in_float(planned):
    _, _, info, layers = planned
    plan = info["plan"]
    by_name = {layer.name: layer for layer in layers}
    roles = {by_name[n].role for n in plan["float_layers"]}
    # measured: 15 of 82 in float; the input and output convolutions always among them
    assert len(layers) == 82 and 8 <= len(plan["float_layers"]) <= 24, plan["float_layers"]
    assert {"input conv", "output conv"} <= roles
    assert plan["measured"]["damage"] <= 0.05 and plan["measured"]["t_index"] == 0


def test_int8_eps_mse_within_5_percent_at_every_step(planned):
    fp32, path, _, _ = planned
    ratios = _ratios(fp32, OnnxDenoiser(path, threads=1))
    # measured on these 16 images: worst at t_index 0; the target (1.05 at every step) is asserted as is
    assert ratios.max() <= 1.05 and int(ratios.argmax()) == 0, ratios.round(4)
    assert np.median(ratios) <= 1.01 and ratios.min() >= 0.99


def test_int8_on_openvino_keeps_the_budget_too(planned):
    reason = runtime_unavailable_reason("openvino")
    if reason:
        pytest.skip(f"OpenVINO unavailable: {reason}")
    fp32, path, _, _ = planned
    ratios = _ratios(fp32, make_denoiser(path, "openvino"))
    assert ratios.max() <= 1.05, ratios.round(4)


def test_bf16_on_openvino_along_t(digits_onnx):
    """bf16 is within 1% of float32 except near t = 0, where it is not (measured 1.129 at t_index 0
    over 64 images); asserted: the measured shape, so that a change in either direction shows."""
    reason = runtime_unavailable_reason("openvino-bf16")
    if reason:
        pytest.skip(f"OpenVINO bf16 unavailable: {reason}")
    fp32 = digits_onnx("fp32")
    ratios = _ratios(fp32, make_denoiser(fp32, "openvino-bf16"))
    assert 1.03 <= ratios[0] <= 1.3, ratios.round(4)
    assert np.all(ratios[10:] <= 1.01), ratios.round(4)


def test_int8_inpainting_psnr_within_0_3_db_of_fp32(planned):
    """4 held-out digits x 3 masks, t_T 50, jump_length 5, jump_n_sample 2, seed 0: measured fp32
    20.006 dB / SSIM 0.6312, int8 20.009 dB / 0.6311 (the same noise for both)."""
    from fxpass.inpainting import MASK_KINDS, evaluate, fixed_masks

    fp32, path, _, _ = planned
    images = load_image_dir(HELDOUT_DIR, 32, None)[100:104]
    masks = fixed_masks(32, MASK_KINDS, seed=0)
    scores = {name: evaluate(OnnxDenoiser(p, threads=1), images, masks, seed=0, jump_length=5, jump_n_sample=2,
                             t_T=None)["overall"]["repaint"] for name, p in (("fp32", fp32), ("int8", path))}
    assert abs(scores["int8"]["psnr"] - scores["fp32"]["psnr"]) <= 0.3, scores
    assert abs(scores["int8"]["ssim"] - scores["fp32"]["ssim"]) <= 0.01, scores
