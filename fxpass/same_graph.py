"""``fxpass check`` on a reduced-precision file: the float32 graph the model it is given lowers to, re-derived
with the file's recorded settings, and the comparison (:mod:`fxpass.equivalence`) before any number."""

from __future__ import annotations

import onnx

from .equivalence import ADDED, compare

#: the recorded rewrite settings that decide the float32 graph's structure (the rest are precision's own)
_STRUCTURE = ("timesteps", "step_graph", "dynamic_batch", "opset", "simplifier", "group_norm", "surgery_options")


def float32_graph(info, model, config, example_inputs=None) -> onnx.ModelProto:
    """The float32 graph that ``model`` (the eager model a file is checked against) lowers to with the
    settings recorded in ``info``'s file (its timesteps, mode, opset, surgery, capture route): the graph a
    reduced-precision file of the same model must be.  ``example_inputs``: a user's model (wrapped as it was
    lowered) called on inputs of the file's shapes.  Unverified: it is only compared with."""
    from .pipeline import lower
    from .request import FORMATS

    request = info.meta.request or {}
    rewrite = dict(request.get("rewrite") or {})
    options = {k: rewrite[k] for k in _STRUCTURE if rewrite.get(k) is not None}
    if info.mode != "plain":
        options.setdefault("timesteps", info.timesteps if info.mode == "table" else info.timesteps[0])
    options["step_graph"] = info.mode == "step"
    capture = (request.get("source") or {}).get("capture")
    if capture in ("trace", "export", "auto"):
        options["capture"] = capture  # route 2's graph is not route 1's
    fmt = (request.get("output") or {}).get("format")
    if fmt in FORMATS:
        options["format"] = fmt  # the format picks the GroupNorm form (ORT's mobile format expands every one)
    return lower(model, example_inputs, config=config, precision="fp32", verify=False, **options)


def check_recorded_graph(info, model, config, label: str, example_inputs=None) -> str:
    """A mobile file (``.tflite``, ``.ort``) records the digest of the verified float32 graph it was made from
    (``fxpass.float32_graph``); FxpassError (exit 1) unless the float32 graph ``model`` lowers to with the file's
    recorded settings has that digest; the line to print where it does."""
    from .errors import FxpassError
    from .metadata import FLOAT32_GRAPH, graph_digest

    recorded = info.meta.float32_graph
    if not recorded:
        raise FxpassError(f"{info.path}: records no {FLOAT32_GRAPH} (written before fxpass recorded it): lower it "
                          "again to check its structure", exit_code=1)
    if graph_digest(float32_graph(info, model, config, example_inputs)) != recorded:
        raise FxpassError(f"{info.path}: not made from the float32 graph of {label}: the graph it records "
                          f"({recorded[:19]}…) is not the one {label} lowers to", exit_code=1)
    return f"structure: made from the float32 graph of {label} (its recorded {FLOAT32_GRAPH} re-derived)"


def graph_example(info, model_timestep=None) -> dict:
    """Seeded example inputs of ``info``'s graph inputs for a user's wrapped model (x, timesteps, the extras):
    float inputs standard normal, integer ones zero, the timestep the last of the schedule (as lower's)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    example = {}
    for name, (dtype, shape) in info.inputs.items():
        shape = tuple(d if d > 0 else 1 for d in shape)
        if name == "t_index":
            value = info.model_timesteps[-1] if model_timestep is None else model_timestep
            is_int = float(value).is_integer() and not isinstance(value, float)
            example["timesteps"] = torch.full(shape, value, dtype=torch.int64 if is_int else torch.float32)
        elif dtype.startswith("float"):
            example[name] = torch.randn(shape, generator=gen)
        else:
            example[name] = torch.zeros(shape, dtype=torch.int64)
    return example


def check_same_graph(info, model, config, precision: str, label: str, example_inputs=None) -> str:
    """Structure before numbers: FxpassError (exit 1) unless ``info``'s file is the float32 graph of
    ``model`` plus ``precision``'s quantization and casts; the line to print where it is."""
    from .errors import FxpassError

    problem = compare(onnx.load(str(info.path)), float32_graph(info, model, config, example_inputs))
    if problem:
        raise FxpassError(f"{info.path}: not the float32 graph of {label} with {precision}'s quantization or "
                          f"casts: {problem}", exit_code=1)
    return f"structure: the float32 graph of {label} with {precision}'s {ADDED[precision]}, constants within their rounding"
