"""Mobile formats beside ONNX (issue #16): ONNX Runtime's ORT format, ExecuTorch ``.pte`` and Core ML
``.mlpackage``; LiteRT ``.tflite`` (issue #28).  Each module imports its heavy dependency only when called
and, when it is missing, raises :class:`fxpass.errors.FxpassError` naming the package and the extra
(``fxpass[mobile]``; ``fxpass[tflite]``).

    to_ort(onnx_path_or_proto, out_path)                        -> dict   (fxpass.formats.ort)
    mobile_coverage(onnx_path_or_proto)                         -> dict   (fxpass.formats.ort)
    to_pte(graph_module, example_inputs, out_path, fp16=False)  -> dict   (fxpass.formats.pte)
    run_pte(path, inputs)                                       -> list[np.ndarray]
    to_mlpackage(module, example_inputs, out_path, palettize_bits=None) -> dict (fxpass.formats.mlpackage)
    describe_mlpackage(path)                                    -> dict
    to_tflite(graph_module, example_inputs, out_path, precision="fp32") -> dict  (fxpass.formats.tflite)
    run_tflite(path, inputs)                                    -> list[np.ndarray]

``format_unavailable_reason(fmt)`` says why a format cannot be produced here (None when it can).
"""

from __future__ import annotations

from ._deps import FORMATS, format_unavailable_reason

__all__ = [
    "FORMATS",
    "describe_mlpackage",
    "format_unavailable_reason",
    "mobile_coverage",
    "run_pte",
    "run_tflite",
    "to_mlpackage",
    "to_ort",
    "to_pte",
    "to_tflite",
]


def __getattr__(name: str):  # lazy: importing fxpass.formats imports no heavy dependency
    if name in ("to_ort", "mobile_coverage"):
        from . import ort as module
    elif name in ("to_pte", "run_pte"):
        from . import pte as module
    elif name in ("to_tflite", "run_tflite"):
        from . import tflite as module
    elif name in ("to_mlpackage", "describe_mlpackage"):
        from . import mlpackage as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)
