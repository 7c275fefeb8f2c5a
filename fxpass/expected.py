"""What ``fxpass check`` holds a file to: the precision the user asks for, never the file's own label.

A file's ``fxpass.precision`` metadata is a claim anyone can edit: a float32 file 15% off, relabelled
``int8``, would otherwise be checked at int8's loose bound.  So:

- :func:`asked_precision`: the precision comes from ``--precision`` (or the lowering report the user
  gives); a file whose metadata says something else fails, and a reduced-precision file checked
  without ``--precision`` is refused with the flag to pass;
- :func:`structure_problem`: before any number, the graph must be what that precision makes: int8 has
  ``QuantizeLinear``/``DequantizeLinear``, fp16 float16 weights, fp32 and bf16 (a float32 graph that
  OpenVINO runs at bf16) neither;
- :func:`row_tolerance`: a bf16 file is a float32 graph, so every runtime that runs it in float32
  (ONNX Runtime, OpenVINO f32) is held to fp32's bound; only OpenVINO's bf16 rows get bf16's;
- :func:`golden_tolerance`: a golden manifest's tolerance must be finite and positive, and may not be
  looser than the precision's own unless the user says so (``--trust-golden-tolerance``, named in the
  output).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import PARSE_ERRORS, FxpassError
from .metadata import PRECISIONS

QDQ = frozenset(("QuantizeLinear", "DequantizeLinear"))


def asked_precision(info, asked: str | None, report: str | Path | None = None) -> str:
    """The precision to check ``info``'s file at: ``asked`` (``--precision``), else the lowering report's,
    else fp32; FxpassError (exit 2) for a reduced-precision file checked with no precision asked,
    (exit 1) where the file's metadata says another precision than the one asked."""
    source = "--precision"
    if asked is None and report is not None:
        asked, source = _report_precision(report), f"the lowering report {report}"
    if asked is None:
        if info.precision != "fp32":
            raise FxpassError(f"{info.path}: its metadata says {info.precision}; check holds a file to the "
                              f"precision you ask for, not its own label: add --precision {info.precision} (or "
                              "--lowering-report REPORT.json)")
        return "fp32"
    if asked not in PRECISIONS:
        raise FxpassError(f"{source}: {asked!r} is not one of {', '.join(PRECISIONS)}")
    if info.precision != asked:
        raise FxpassError(f"{info.path}: metadata says {info.precision}, {source} says {asked}: not the file "
                          "that was asked for", exit_code=1)
    return asked


def _report_precision(report: str | Path) -> str:
    from .fileio import check_input_file

    path = check_input_file(report, "a lowering report")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8")) if path.stat().st_size < 50_000_000 else None
    except (OSError, *PARSE_ERRORS):
        data = None
    precision = data.get("precision") if isinstance(data, dict) else None
    if precision not in PRECISIONS:
        raise FxpassError(f"{report}: not a lowering report of fxpass lower (no precision of "
                          f"{', '.join(PRECISIONS)})")
    return precision


def structure_problem(op_types: frozenset, float16: bool, precision: str) -> str | None:
    """Why a graph of ``op_types`` (with float16 weights or casts where ``float16``;
    :func:`fxpass.metadata.graph_facts`) is not a ``precision`` graph, or None."""
    if precision == "int8" and not op_types >= QDQ:
        return "its graph has no QuantizeLinear/DequantizeLinear pairs: it is not an int8 lowering"
    if precision == "fp16" and not float16:
        return "its graph has no float16 weights or casts: it is not an fp16 lowering"
    if precision in ("fp32", "bf16") and (op_types & QDQ or float16):
        what = "QuantizeLinear/DequantizeLinear" if op_types & QDQ else "float16 weights or casts"
        return f"its graph has {what}: it is not a float32 graph"
    return None


def check_structure(info, precision: str) -> None:
    """FxpassError (exit 1) where the file ``info`` describes (:func:`fxpass.metadata.read_file`) is not a
    ``precision`` graph."""
    problem = structure_problem(info.op_types, info.float16, precision)
    if problem:
        raise FxpassError(f"{info.path}: checked as {precision}, but {problem}", exit_code=1)


def row_tolerance(precision: str, runner_name: str) -> str:
    """The precision whose bound a runner's rows get: fp32 for a bf16 file run in float32."""
    if precision == "bf16" and "bf16" not in runner_name:
        return "fp32"
    return precision


def golden_tolerance(manifest: dict, precision: str, default: tuple[float, float], *, trust: bool,
                     source: str) -> tuple[tuple[float, float], str | None]:
    """(the bound, a note for the output or None) for ``precision`` from a golden manifest: its entry must
    be a finite, positive ``atol_scale`` and a finite, non-negative ``rtol``; one looser than ``default``
    is used only with ``trust`` (and the note says so), else ``default`` is (and the note says that)."""
    tolerances = manifest.get("tolerances") or {}
    if not isinstance(tolerances, dict):
        raise FxpassError(f"{source}: manifest tolerances must be an object")
    entry = tolerances.get(precision)
    if entry is None:
        return default, None
    if not isinstance(entry, dict) or set(entry) - {"atol_scale", "rtol", "atol"}:  # atol: the record in units
        raise FxpassError(f"{source}: manifest tolerances.{precision} must hold atol_scale, rtol (and the atol "
                          "it records) only")
    atol, rtol = entry.get("atol_scale", default[0]), entry.get("rtol", default[1])
    for key, value, lowest in (("atol_scale", atol, "> 0"), ("rtol", rtol, ">= 0")):
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < 0 or (value == 0 and key == "atol_scale"):
            raise FxpassError(f"{source}: manifest tolerances.{precision}.{key} is {value!r}; expected a finite "
                              f"number {lowest}")
    bound = (float(atol), float(rtol))
    if bound[0] <= default[0] and bound[1] <= default[1]:
        return bound, None
    if trust:
        return bound, (f"the golden manifest loosens {precision}'s bound to atol_scale {bound[0]:g}, rtol "
                       f"{bound[1]:g} (default {default[0]:g}, {default[1]:g}): used because of "
                       "--trust-golden-tolerance")
    return default, (f"the golden manifest asks for a looser {precision} bound (atol_scale {bound[0]:g}, rtol "
                     f"{bound[1]:g}) than {precision}'s own ({default[0]:g}, {default[1]:g}); checked at "
                     "the precision's own (--trust-golden-tolerance uses the manifest's)")
