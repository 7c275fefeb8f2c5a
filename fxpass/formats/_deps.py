"""Which Python packages each format needs, and the one error when one is missing."""

from __future__ import annotations

import importlib
import importlib.util

from ..errors import FxpassError

FORMATS = ("ort", "pte", "mlpackage", "tflite")
#: format -> ((module to import, what it is called in messages), ...); the first is what :func:`require` returns
NEEDS = {
    "ort": (("onnxruntime", "onnxruntime"),),
    "pte": (("executorch", "executorch"),),
    "mlpackage": (("coremltools", "coremltools"),),
    "tflite": (("litert_torch", "litert-torch"), ("ai_edge_litert", "ai-edge-litert"),
               ("ai_edge_quantizer", "ai-edge-quantizer")),
}
#: the extra that brings each format's packages
INSTALL = {"ort": "pip install 'fxpass[mobile]'", "pte": "pip install 'fxpass[mobile]'",
           "mlpackage": "pip install 'fxpass[mobile]'", "tflite": "pip install 'fxpass[tflite]'"}


def _check_format(fmt: str) -> None:
    if fmt not in NEEDS:
        raise FxpassError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")


def format_unavailable_reason(fmt: str) -> str | None:
    """Why ``fmt`` ("ort", "pte", "mlpackage", "tflite") cannot be produced here, or None when it can.

    Imports each dependency (a broken install is a reason too, with its first line)."""
    _check_format(fmt)
    for module, name in NEEDS[fmt]:
        if importlib.util.find_spec(module) is None:
            return f"--format {fmt} needs {name} ({INSTALL[fmt]})"
    for module, name in NEEDS[fmt]:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a broken install is a reason too, not a crash
            from ..errors import first_line

            return f"--format {fmt} needs {name}, which does not import: {first_line(exc)} ({INSTALL[fmt]})"
    return None


def require(fmt: str, submodule: str | None = None):
    """Import the first dependency of ``fmt`` (or ``submodule``) or raise the FxpassError naming the extra."""
    _check_format(fmt)
    reason = format_unavailable_reason(fmt)
    if reason is not None:
        raise FxpassError(reason)
    return importlib.import_module(submodule or NEEDS[fmt][0][0])


def require_module(fmt: str, module: str):
    """Import one of ``fmt``'s dependencies (e.g. LiteRT's interpreter alone, to read or run a file) or raise
    the FxpassError naming the extra."""
    _check_format(fmt)
    name = dict(NEEDS[fmt])[module]
    if importlib.util.find_spec(module) is None:
        raise FxpassError(f"--format {fmt} needs {name} ({INSTALL[fmt]})")
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken install is a reason too, not a crash
        from ..errors import first_line

        raise FxpassError(f"--format {fmt} needs {name}, which does not import: {first_line(exc)} "
                          f"({INSTALL[fmt]})") from None
