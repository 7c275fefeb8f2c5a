"""FLOPs of one U-Net step, counted by ``torch.utils.flop_counter.FlopCounterMode`` (no GPU needed)."""

from __future__ import annotations

from typing import Any

import torch

#: nominal dense peaks (FLOP/s) for utilisation; matched by substring of the CUDA device name.
#: fp32 is the non-tensor-core figure; cuDNN may use TF32 for fp32 convolutions, so fp32 rows can
#: exceed 100 % of it.  Unknown devices get no percentage, only achieved FLOP/s.
GPU_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"fp16": 989.4e12, "fp32": 66.9e12},
    "H100 PCIe": {"fp16": 756.0e12, "fp32": 51.2e12},
    "H100 NVL": {"fp16": 835.5e12, "fp32": 60.0e12},
    "H100": {"fp16": 989.4e12, "fp32": 66.9e12},  # SXM
    "A100": {"fp16": 312.0e12, "fp32": 19.5e12},
    "L40S": {"fp16": 362.0e12, "fp32": 91.6e12},
    "L4": {"fp16": 121.0e12, "fp32": 30.3e12},
    "A10": {"fp16": 125.0e12, "fp32": 31.2e12},
}


def count_flops(model: torch.nn.Module, inputs: tuple) -> dict[str, Any]:
    """FLOPs of ``model(*inputs)`` (one forward): total and per aten op (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(*inputs)
    by_op = {str(op).replace("aten.", ""): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    total = int(counter.get_total_flops())
    return {"flops": total, "gflop": total / 1e9, "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "counter": "torch.utils.flop_counter.FlopCounterMode"}


def gpu_peak(device_name: str) -> tuple[str, dict[str, float]] | None:
    for key, peaks in GPU_PEAKS.items():
        if key.lower() in device_name.lower():
            return key, peaks
    return None


def utilisation(flops_per_step: float, batch: int, seconds: float, peak: float | None) -> dict[str, Any]:
    achieved = flops_per_step * batch / seconds if seconds > 0 else float("nan")
    out: dict[str, Any] = {"achieved_tflops": achieved / 1e12}
    if peak:
        out["peak_tflops"] = peak / 1e12
        out["percent_of_peak"] = 100.0 * achieved / peak
    return out
