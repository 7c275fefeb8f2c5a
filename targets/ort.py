"""ONNX Runtime behind Polygraphy: CPU execution provider, CUDA's where present."""

from __future__ import annotations

import os

import onnx
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

from surgery.modelio import serialized, staged_path


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
    staging = None
    if isinstance(model, onnx.ModelProto):
        data = serialized(model)
        if data is not None:
            model = data
        else:  # protobuf cannot serialize 2 GiB: hand ORT a file with external data
            path, staging = staged_path(model, prefix="fxpass-ort-")
            model = str(path)
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    loader = SessionFromOnnx(model, providers=providers)
    runner = OnnxrtRunner(loader, name=name or ("onnxrt-cuda" if providers[0].startswith("CUDA") else "onnxrt-cpu"))
    runner._fxpass_staging = staging  # the files live as long as the runner
    return runner
