"""A model's output as libraries return it, reduced to the one tensor fxpass lowers and checks.

guided-diffusion returns a tensor; diffusers a ``UNet2DOutput`` dataclass (a ``ModelOutput``, which is
also a mapping) or ``(sample,)`` with ``return_dict=False``; other code a dict or a tuple.
:func:`pick_output` takes the tensor named ``name`` (a field or key; an index for a tuple), else the
one named ``sample`` (diffusers' convention), else the only tensor, else the first item of a
tuple or list, and refuses in one line naming the choices where none of those decides.  The same rule
runs on the captured graph's output (its leaves fx nodes) and on the eager model's (tensors), so the
reference and the lowered graph pick the same thing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import FxpassError

#: the key taken by default from a mapping or dataclass output
DEFAULT_KEY = "sample"


def _items(value) -> list[tuple[str, Any]] | None:
    """(key, item) pairs of a mapping, dataclass, named tuple, tuple or list; None for anything else."""
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return list(zip(value._fields, value))
    if isinstance(value, (tuple, list)):
        return [(str(k), v) for k, v in enumerate(value)]
    return None


def pick_output(value, name: str | None = None, *, is_leaf=None, where: str = "the model") -> tuple[Any, str | None]:
    """(the chosen leaf, the key it was found under: None where ``value`` was a leaf already).

    ``is_leaf(v)`` says what counts as a tensor (default: ``torch.Tensor``)."""
    if is_leaf is None:
        import torch

        def is_leaf(v):
            return isinstance(v, torch.Tensor)

    if is_leaf(value):
        if name not in (None, "0", DEFAULT_KEY):
            raise FxpassError(f"--model-output {name}: {where} returns a single tensor, not named outputs")
        return value, None
    items = _items(value)
    if items is None:
        raise FxpassError(f"{where} returns a {type(value).__name__}, not a tensor or named tensors")
    tensors = [(k, v) for k, v in items if is_leaf(v)]
    kind = "dict" if isinstance(value, Mapping) and not dataclasses.is_dataclass(value) else type(value).__name__
    keys = ", ".join(k for k, _ in items) or "nothing"
    if name is not None:
        found = next((v for k, v in items if k == name), None)
        if found is None or not is_leaf(found):
            raise FxpassError(f"--model-output {name}: {where} returns {kind} with {keys}; "
                              f"{name} is not one of its tensors")
        return found, name
    for key, chosen in tensors:
        if key == DEFAULT_KEY:
            return chosen, key
    if len(tensors) == 1:
        return tensors[0][1], tensors[0][0]
    if isinstance(value, (tuple, list)) and tensors and tensors[0][0] == "0":
        return tensors[0][1], "0"
    raise FxpassError(f"{where} returns {kind} with {keys}: name the tensor to lower with "
                      "--model-output NAME")
