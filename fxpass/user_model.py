"""Users' own U-Net classes: ``--model-class pkg.mod:Class --model-kwargs JSON`` with a checkpoint."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from .errors import FxpassError


def load_user_model(spec: str, kwargs_json: str | None, checkpoint: Path, trust_pickle: bool, *,
                    allow_nonfinite: bool = False):
    """Instantiate ``pkg.mod:Class(**kwargs)`` and load ``checkpoint`` into it (strict)."""
    import torch

    from .checkpoint import _read_checkpoint, _refuse_nonfinite, extract_state_dict

    if ":" not in spec:
        raise FxpassError(f"--model-class {spec}: expected pkg.module:ClassName")
    module_name, _, class_name = spec.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise FxpassError(f"--model-class {spec}: cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    cls = getattr(module, class_name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise FxpassError(f"--model-class {spec}: {class_name} is not an nn.Module class in {module_name}")
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json else {}
    except json.JSONDecodeError as exc:
        raise FxpassError(f"--model-kwargs: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(kwargs, dict):
        raise FxpassError("--model-kwargs: expected a JSON object of keyword arguments")
    try:
        model = cls(**kwargs)
    except Exception as exc:
        raise FxpassError(f"--model-class {spec}: constructor failed ({type(exc).__name__}: {exc})") from None
    obj = _read_checkpoint(checkpoint, trust_pickle)
    state = extract_state_dict(obj, checkpoint)
    if not allow_nonfinite:
        _refuse_nonfinite(state.items(), checkpoint)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append("missing " + ", ".join(result.missing_keys[:3]))
        if result.unexpected_keys:
            parts.append("unexpected " + ", ".join(result.unexpected_keys[:3]))
        raise FxpassError(f"{checkpoint}: does not match {class_name}({kwargs_json or ''}): " + "; ".join(parts))
    return model.float().eval()
