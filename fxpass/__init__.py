"""fxpass: lower guided-diffusion / RePaint U-Nets to ONNX through torch.fx rewrites.

Attributes are imported lazily so that torch-free paths (``fxpass sample``) never import torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "init_model": "checkpoint",
    "load_model": "checkpoint",
    "save_checkpoint": "checkpoint",
    "CAMUS": "config",
    "ModelConfig": "config",
    "build_model": "config",
    "load_config": "config",
    "FxpassError": "errors",
    "capture": "capture",
    "rewrite": "passes",
    "lower": "pipeline",
    "LowerRequest": "request",
    "schedule": None,
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fxpass' has no attribute {name!r}")
    where = _EXPORTS[name]
    if where is None:
        return import_module(f".{name}", __name__)
    return getattr(import_module(f".{where}", __name__), name)
