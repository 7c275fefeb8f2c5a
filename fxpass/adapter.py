"""The adapter :func:`wrap` puts in front of a model whose ``forward`` is not ``(x, timesteps, ...)``:
it takes fxpass's names and calls the model by its own (see :mod:`fxpass.signature`, whose :class:`Plan`
it reads), and takes the one output ``--model-output`` names where forward returns several."""

from __future__ import annotations

import inspect

import torch

from .outputs import pick_output


class Adapter(torch.nn.Module):
    """``forward(x, timesteps, <extras>)`` in front of a model whose parameters are named otherwise (or
    whose timestep is a float noise level: the schedule's values are cast to it)."""

    def __init__(self, model: torch.nn.Module, p):
        super().__init__()
        self.model = model
        self.x_name, self.t_name, self.t_dtype = p.x_name, p.t_name, p.t_dtype
        self.num_classes = p.num_classes
        self.cast = p.continuous  # the schedule's values as the float noise level the model takes
        self.output = p.output

    def forward(self, x, timesteps=None, **extras):
        if self.t_name is None:  # a model with no timestep
            out = self.model(**{self.x_name: x}, **extras)
        else:
            if self.cast:
                timesteps = timesteps.to(self.t_dtype)
            out = self.model(**{self.x_name: x, self.t_name: timesteps}, **extras)
        if self.output is None:
            return out  # capture and the reference reduce it by fxpass.outputs' rule
        return pick_output(out, self.output, is_leaf=_is_tensor_like, where=type(self.model).__name__)[0]


def wrap(model: torch.nn.Module, p) -> torch.nn.Module:
    """``model`` itself when it already takes ``(x, timesteps, ...)``; else an :class:`Adapter` whose
    ``forward`` signature names x, timesteps and the plan's extras (what capture binds to)."""
    same_classes = p.num_classes is None or getattr(model, "num_classes", None) == p.num_classes
    if p.standard and p.output is None and same_classes:
        return model  # else the adapter carries the class count the label draws and the reference read
    names = ["x", *(["timesteps"] if p.t_name is not None else []), *p.extras]
    sig = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
                            + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 default=None if k >= 2 or (k == 1 and p.t_name is None)
                                                 else inspect.Parameter.empty)
                               for k, n in enumerate(names)]
                            + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])

    def forward(self, x, timesteps=None, **extras):
        return Adapter.forward(self, x, timesteps, **extras)

    forward.__signature__ = sig
    cls = type(f"{type(model).__name__}Inputs", (Adapter,), {"forward": forward})
    return cls(model, p).eval()


def _is_tensor_like(value) -> bool:
    return isinstance(value, (torch.Tensor, torch.fx.Proxy))
