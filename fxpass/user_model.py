"""Users' own U-Net classes: ``--model-class pkg.mod:Class --model-kwargs JSON`` with a checkpoint."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from .errors import PARSE_ERRORS, FxpassError, parse_reason


class ConfigNamespace(SimpleNamespace):
    """A config object from ``--model-kwargs``: attribute access (``conf.diffusion_steps``), and the
    mapping reads config classes that are dicts with attributes also offer (``conf["k"]``,
    ``conf.get("k", default)``, ``"k" in conf``)."""

    def __getitem__(self, key):
        return getattr(self, key)

    def __contains__(self, key) -> bool:
        return hasattr(self, key)

    def get(self, key, default=None):
        return getattr(self, key, default)


def namespaces(value):
    """JSON objects inside ``--model-kwargs`` as attribute objects (``{"conf": {"diffusion_steps": 4000}}``
    gives ``conf.diffusion_steps``), recursively (:class:`ConfigNamespace`, a ``types.SimpleNamespace``);
    lists keep their items converted."""
    if isinstance(value, dict):
        return ConfigNamespace(**{str(k): namespaces(v) for k, v in value.items()})
    if isinstance(value, list):
        return [namespaces(v) for v in value]
    return value


def load_user_model(spec: str, kwargs_json: str | None, checkpoint: Path, trust_pickle: bool, *,
                    allow_nonfinite: bool = False, factory: bool = False):
    """Instantiate ``pkg.mod:Class(**kwargs)`` and load ``checkpoint`` into it (strict).  ``factory``:
    ``spec`` names a function (``--model-factory``) called with the kwargs that returns the nn.Module."""
    import torch

    from .checkpoint import _read_checkpoint, _refuse_nonfinite, extract_state_dict

    flag = "--model-factory" if factory else "--model-class"
    if ":" not in spec:
        raise FxpassError(f"{flag} {spec}: expected pkg.module:{'function' if factory else 'ClassName'}")
    module_name, _, class_name = spec.partition(":")
    if "" not in sys.path and "." not in sys.path:  # last: a file in the working directory named like a module
        sys.path.append("")                          # fxpass uses (onnxslim.py, polygraphy.py) never replaces it
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise FxpassError(f"{flag} {spec}: cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    cls = getattr(module, class_name, None)
    if factory:
        if not callable(cls) or isinstance(cls, type):
            raise FxpassError(f"{flag} {spec}: {class_name} is not a function in {module_name}")
    elif cls is None or not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise FxpassError(f"{flag} {spec}: {class_name} is not an nn.Module class in {module_name}")
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json else {}
    except PARSE_ERRORS as exc:
        raise FxpassError(f"--model-kwargs: not valid JSON ({parse_reason(exc)})") from None
    if not isinstance(kwargs, dict):
        raise FxpassError("--model-kwargs: expected a JSON object of keyword arguments")
    kwargs = {k: namespaces(v) for k, v in kwargs.items()}
    try:
        model = cls(**kwargs)
    except Exception as exc:
        raise FxpassError(f"{flag} {spec}: {'the factory' if factory else 'constructor'} failed "
                          f"({type(exc).__name__}: {exc}); check --model-kwargs against its parameters") from None
    if not isinstance(model, torch.nn.Module):
        raise FxpassError(f"{flag} {spec}: returned a {type(model).__name__}, not a torch.nn.Module")
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
    model = as_float32(model, f"{flag} {spec}")
    torch.nn.Module.train(model, False)  # torch's own: a model may override eval()/to() (PatchDDM's .to returns None)
    return model


def as_float32(model, spec: str = "model"):
    """The model in float32, consistently: a ``use_fp16`` model (guided-diffusion casts its input to
    ``self.dtype`` and converts its blocks with ``convert_to_fp16``) has its blocks converted back
    (``convert_to_fp32``) and its ``dtype`` attribute / ``use_fp16`` flag set to float32 as well, so the
    weights and the casts agree; never a half-converted mix."""
    import torch

    halves = (torch.float16, torch.bfloat16)
    for module in model.modules():
        if getattr(module, "use_fp16", False) is True:
            module.use_fp16 = False
        if getattr(module, "dtype", None) in halves and not isinstance(type(module).__dict__.get("dtype"), property):
            try:
                module.dtype = torch.float32
            except (AttributeError, TypeError):
                raise FxpassError(f"{spec}: {type(module).__name__}.dtype is float16 and cannot be "
                                  "set; construct it with use_fp16 false in --model-kwargs") from None
    if callable(getattr(model, "convert_to_fp32", None)):
        model.convert_to_fp32()
    torch.nn.Module.float(model)  # torch's own, its return value not relied on (a model may override it)
    return model
