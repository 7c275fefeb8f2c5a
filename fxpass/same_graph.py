"""``fxpass check`` on a reduced-precision file: the float32 graph the model it is given lowers to, re-derived
with the file's recorded settings, and the comparison (:mod:`fxpass.equivalence`) before any number."""

from __future__ import annotations

import onnx

from .equivalence import ADDED, compare

#: the recorded rewrite settings that decide the float32 graph's structure (the rest are precision's own)
_STRUCTURE = ("timesteps", "step_graph", "dynamic_batch", "opset", "simplifier", "group_norm", "surgery_options")


def float32_graph(info, model, config) -> onnx.ModelProto:
    """The float32 graph that ``model`` (the eager model a file is checked against) lowers to with the
    settings recorded in ``info``'s file (its timesteps, mode, opset, surgery): the graph a reduced-precision
    file of the same model must be.  Unverified: it is only compared with."""
    from .pipeline import lower

    rewrite = dict((info.meta.request or {}).get("rewrite") or {})
    options = {k: rewrite[k] for k in _STRUCTURE if rewrite.get(k) is not None}
    options.setdefault("timesteps", info.timesteps if info.mode == "table" else info.timesteps[0])
    options["step_graph"] = info.mode == "step"
    return lower(model, config=config, precision="fp32", verify=False, **options)


def check_same_graph(info, model, config, precision: str, label: str) -> str:
    """Structure before numbers: FxpassError (exit 1) unless ``info``'s file is the float32 graph of
    ``model`` plus ``precision``'s quantization and casts; the line to print where it is."""
    from .errors import FxpassError

    problem = compare(onnx.load(str(info.path)), float32_graph(info, model, config))
    if problem:
        raise FxpassError(f"{info.path}: not the float32 graph of {label} with {precision}'s quantization or "
                          f"casts: {problem}", exit_code=1)
    return f"structure: the float32 graph of {label} with {precision}'s {ADDED[precision]}, constants within their rounding"
