"""Which Python package each format needs, and the one error when it is missing."""

from __future__ import annotations

import importlib
import importlib.util

from ..errors import FxpassError

FORMATS = ("ort", "pte", "mlpackage")
#: format -> (module to import, what it is called in messages)
NEEDS = {
    "ort": ("onnxruntime", "onnxruntime"),
    "pte": ("executorch", "executorch"),
    "mlpackage": ("coremltools", "coremltools"),
}
INSTALL = "pip install 'fxpass[mobile]'"


def _check_format(fmt: str) -> None:
    if fmt not in NEEDS:
        raise FxpassError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")


def format_unavailable_reason(fmt: str) -> str | None:
    """Why ``fmt`` ("ort", "pte", "mlpackage") cannot be produced here, or None when it can.

    Imports the dependency (a broken install is a reason too, with its first line)."""
    _check_format(fmt)
    module, name = NEEDS[fmt]
    if importlib.util.find_spec(module) is None:
        return f"--format {fmt} needs {name} ({INSTALL})"
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken install is a reason too, not a crash
        from ..errors import first_line

        return f"--format {fmt} needs {name}, which does not import: {first_line(exc)} ({INSTALL})"
    return None


def require(fmt: str, submodule: str | None = None):
    """Import the dependency of ``fmt`` (or ``submodule`` of it) or raise the FxpassError naming the extra."""
    _check_format(fmt)
    reason = format_unavailable_reason(fmt)
    if reason is not None:
        raise FxpassError(reason)
    module = NEEDS[fmt][0]
    return importlib.import_module(submodule or module)
