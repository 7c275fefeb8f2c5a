"""ONNX Runtime behind Polygraphy: CPU execution provider, CUDA's where present."""

from __future__ import annotations

import copy
import os
import tempfile

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
    staging = None
    if isinstance(model, onnx.ModelProto):
        if byte_size(model) < SERIALIZE_LIMIT:
            model = model.SerializeToString()
        else:  # protobuf cannot serialize 2 GiB: hand ORT a file with external data
            staging = tempfile.TemporaryDirectory(prefix="fxpass-ort-")
            path = os.path.join(staging.name, "model.onnx")
            onnx.save_model(copy.deepcopy(model), path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)
            model = path
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    loader = SessionFromOnnx(model, providers=providers)
    runner = OnnxrtRunner(loader, name=name or ("onnxrt-cuda" if providers[0].startswith("CUDA") else "onnxrt-cpu"))
    runner._fxpass_staging = staging  # the files live as long as the runner
    return runner


#: protobuf's limit on one serialized message (2 GiB); larger models go through a file with external data
SERIALIZE_LIMIT = 2**31 - 1


def byte_size(model: onnx.ModelProto) -> int:
    try:
        return model.ByteSize()
    except Exception:  # some protobuf builds refuse to size a message over the limit
        return SERIALIZE_LIMIT
