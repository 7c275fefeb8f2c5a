"""The precision section's baselines: int8 as a user would make it without fxpass's own.

- ONNX Runtime's ``quantize_static`` on the fxpass fp32 ONNX: QDQ, per-channel, Conv+MatMul, MinMax;
  activations QUInt8, because the default QInt8 makes ONNX Runtime 1.32 refuse the file at load (the
  Softmax output's QuantizeLinear gets a uint8 zero point with an int8 output type);
- NNCF's ``nncf.quantize`` at default parameters on the same file, for OpenVINO.

Both calibrate on :data:`BASELINE_FEEDS` random inputs (:func:`baseline_feeds`); what they build is
turned into a row by :mod:`bench.precision_builds`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

#: random calibration inputs of the two baselines (ORT quantize_static, NNCF): x ~ N(0, 1), t_index spread
BASELINE_FEEDS = 8
NNCF_HINT = "pip install 'fxpass[bench]'"
CALIBRATION = "random inputs (x ~ N(0, 1), t_index spread)"


def baseline_feeds(image_size: int, steps: int, *, count: int = BASELINE_FEEDS, seed: int = 0) -> list[dict]:
    """The baselines' calibration inputs: x ~ N(0, 1) (seeded), t_index evenly spaced over the schedule."""
    rng = np.random.default_rng(seed)
    indices = np.linspace(0, steps - 1, count).round().astype(np.int64)
    return [{"x": rng.standard_normal((1, 3, image_size, image_size), dtype=np.float32),
             "t_index": np.array([i], dtype=np.int64)} for i in indices]


def ort_quantize_static(fp32: Path, out: Path, feeds: list[dict]) -> dict[str, Any]:
    """The naive ONNX Runtime baseline: ``quantize_static`` of ``fp32`` into ``out`` (QDQ, per-channel, U8S8,
    Conv+MatMul), calibrated on ``feeds``; returns how it was built."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" warnings
    try:
        start = time.perf_counter()
        quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul"])
        seconds = time.perf_counter() - start
    finally:
        root.setLevel(level)
    return {"quantize_s": seconds, "calibration": f"{len(feeds)} {CALIBRATION}",
            "settings": "QDQ, per_channel=True, activation QUInt8, weight QInt8, Conv+MatMul, MinMax",
            "note": "activation QUInt8: with the default QInt8 ONNX Runtime 1.32 refuses the file at load "
                    "(the Softmax output's QuantizeLinear gets a uint8 zero point with an int8 output type)"}


def nncf_quantize(fp32: Path, feeds: list[dict]) -> tuple[Any, dict[str, Any]]:
    """The OpenVINO baseline: ``nncf.quantize`` at its defaults of the ``fp32`` ONNX file, calibrated on
    ``feeds``; (the quantized ``openvino.Model``, how it was built)."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32))
    start = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(feeds))
    seconds = time.perf_counter() - start
    return quantized, {"quantize_s": seconds, "nncf": nncf.__version__,
                       "calibration": f"{len(feeds)} {CALIBRATION}", "settings": "nncf.quantize defaults"}
