"""ONNX Runtime behind Polygraphy: CPU execution provider, CUDA's where present."""

from __future__ import annotations

import os

import onnx
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def ort_runner(model: onnx.ModelProto | str | os.PathLike | bytes, *, cuda: bool | None = None,
               name: str | None = None) -> OnnxrtRunner:
    """A Polygraphy ``OnnxrtRunner`` for ``model`` (a ModelProto, bytes or a path).

    ``cuda=None`` uses the CUDA execution provider when this ONNX Runtime build has it; ``True``
    requires it; ``False`` stays on the CPU.
    """
    providers = ["CPUExecutionProvider"]
    has_cuda = "CUDAExecutionProvider" in available_providers()
    if cuda is True and not has_cuda:
        raise RuntimeError("this ONNX Runtime build has no CUDAExecutionProvider")
    if (cuda is None and has_cuda) or cuda:
        providers.insert(0, "CUDAExecutionProvider")
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    loader = SessionFromOnnx(model, providers=providers)
    return OnnxrtRunner(loader, name=name or ("onnxrt-cuda" if providers[0].startswith("CUDA") else "onnxrt-cpu"))
