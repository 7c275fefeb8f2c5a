"""Capture an unmodified guided-diffusion model into a torch.fx graph.

``capture(model, example_inputs)`` traces with a :class:`~fxpass.concrete_tracer.ConcreteTracer`:
every proxy carries the value it has on the example inputs (computed as the trace runs: fake tensors
for shapes and dtypes, real data only where a decision reads it), so Python that needs a concrete
value (rank loops, ``len``, ``.item()`` branches, star-unpacking of shapes) is decided on the
example, while tensor operations, shape arithmetic, ``math.*`` calls and ``assert`` statements stay
in the graph as nodes.  A branch decided on a traced value becomes a guard: a ``torch._assert`` node
on the condition that held, with the user's source line in its message and, in ``node.meta["fxpass_guard"]``,
where it was and what capture decided there.  That includes decisions Python makes without an ``if``:
``int()`` / ``range()`` / ``float()`` of a traced value, and ``len(tensor)`` or iterating over a tensor
(both read its first dimension, often the batch).  Every node records the user's line in
``node.meta["fxpass_source"]``; a node whose value capture could only compute on real data carries
``node.meta["fxpass_real"]``.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import math
import sys
from collections.abc import Mapping, Sequence
from types import FunctionType
from typing import Any

import torch
from torch.fx import GraphModule, Proxy
from torch.fx.node import map_aggregate

from .concrete_tracer import ConcreteTracer, _user_frame
from .errors import FxpassError, first_line

__all__ = ["capture"]

# math functions that become graph nodes when called on a traced value
_MATH_FUNCTIONS = (
    "sqrt", "log", "log2", "log10", "exp", "pow", "floor", "ceil", "sin", "cos", "tan", "atan", "fabs",
    "isqrt", "prod", "trunc",
)


@contextlib.contextmanager
def _traceable_python(tracer: ConcreteTracer):
    """Patch ``math.*`` and ``autograd.Function.apply`` so traced values flow through them."""
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner, name, new):
        saved.append((owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)))
        setattr(owner, name, new)

    def has_proxy(*values) -> bool:
        found = []
        map_aggregate(values, lambda v: found.append(v) if isinstance(v, Proxy) else None)
        return bool(found)

    for fname in _MATH_FUNCTIONS:
        original = getattr(math, fname, None)
        if original is None:
            continue

        def wrapped(*args, __original=original, **kwargs):
            if has_proxy(args, kwargs):
                return tracer.create_proxy("call_function", __original, args, kwargs)
            return __original(*args, **kwargs)

        patch(math, fname, wrapped)

    original_apply = torch.autograd.Function.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        if has_proxy(args, kwargs):
            # inference capture: run the function's forward inline (gradient checkpointing off)
            return cls.forward(torch.autograd.function.FunctionCtx(), *args, **kwargs)
        return original_apply.__func__(cls, *args, **kwargs)

    patch(torch.autograd.Function, "apply", classmethod(apply))

    original_is_tensor = torch.is_tensor

    def is_tensor(obj):  # diffusers: ``if not torch.is_tensor(timesteps): timesteps = torch.tensor([...])``
        if isinstance(obj, Proxy):
            return isinstance(tracer.value_of(obj.node), torch.Tensor)
        return original_is_tensor(obj)

    patch(torch, "is_tensor", is_tensor)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """torch's loggers ``names`` at CRITICAL for the duration: a failure is said in one line of ours, not logged
    with its traceback (FakeTensor logs one for every operation the example inputs do not fit)."""
    import logging

    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _bind_inputs(model: torch.nn.Module, example_inputs) -> dict[str, Any]:
    signature = inspect.signature(model.forward)
    if isinstance(example_inputs, Mapping):
        bound = signature.bind_partial(**example_inputs)
    else:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        bound = signature.bind_partial(*example_inputs)
    out = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise FxpassError(f"capture: example inputs must bind to named parameters of forward, not *{name}")
        if value is None:
            continue
        out[name] = value
    return out


def capture(model: torch.nn.Module, example_inputs: Sequence[Any] | Mapping[str, Any], *,
            output: str | None = None) -> GraphModule:
    """Trace ``model`` on ``example_inputs`` into a :class:`torch.fx.GraphModule`.

    ``example_inputs`` is a tuple of positional arguments of ``model.forward`` (e.g. ``(x, t)``) or a
    mapping by parameter name (``{"x": x, "timesteps": t, "y": y}``).  Parameters not given (``y=None``,
    ``gt=None``, ``**kwargs``) keep their defaults: the graph's inputs are exactly the given ones.
    The result keeps its example inputs in ``gm.meta["fxpass_example_inputs"]``.  A model that returns
    a dataclass, dict or tuple (diffusers' ``UNet2DOutput``) is reduced to one tensor output by
    :func:`fxpass.outputs.pick_output` (``output`` names it); the key taken is in
    ``gm.meta["fxpass_output"]``.
    """
    if not isinstance(model, torch.nn.Module):
        raise FxpassError(f"capture: expected a torch.nn.Module, got {type(model).__name__}")
    inputs = _bind_inputs(model, example_inputs)
    if not isinstance(type(model).forward, FunctionType):
        raise FxpassError(f"capture: {type(model).__name__}.forward is not a Python function")
    tracer = ConcreteTracer(inputs)
    was_training = model.training
    model.eval()
    try:
        with _traceable_python(tracer), torch.no_grad(), quiet_loggers("torch._subclasses.fake_tensor"):
            graph = tracer.trace(model)
    except FxpassError:
        raise
    except Exception as exc:
        frame = None
        tb = exc.__traceback__
        while tb is not None:
            if _user_frame(tb.tb_frame) is tb.tb_frame:
                frame = tb.tb_frame
                frame_line = tb.tb_lineno
            tb = tb.tb_next
        where = "<unknown>"
        if frame is not None:
            src = linecache.getline(frame.f_code.co_filename, frame_line).strip()
            where = f"{frame.f_code.co_filename}:{frame_line}: `{src}`"
        if isinstance(exc, NameError) and "not a member of this module" in str(exc):
            refused = FxpassError(f"{where}: a parameter that is not part of the model (a module built inside "
                                  "forward gets fresh random weights on every call, so its output does not come "
                                  "from the checkpoint); build it in __init__")
            refused.model_refused = True  # torch.export would take it, with one call's random weights
            raise refused from exc
        raise FxpassError(f"{where}: capture cannot handle this ({type(exc).__name__}: {first_line(exc)})") from exc
    finally:
        model.train(was_training)

    output_key = _reduce_output(graph, output, type(model).__name__)
    gm = GraphModule(model, graph, class_name=f"{type(model).__name__}Captured")
    if output_key is not None:
        gm.graph.eliminate_dead_code()  # what only the other outputs read
        gm.recompile()
    for node in gm.graph.nodes:
        value = tracer._values.get(node)
        if isinstance(value, torch.Tensor):
            node.meta["fxpass_shape"] = tuple(value.shape)
            node.meta["fxpass_dtype"] = value.dtype
        elif value is not None and not isinstance(value, (torch.nn.Module,)):
            node.meta["fxpass_value"] = value
    gm.meta["fxpass_example_inputs"] = dict(inputs)
    gm.meta["fxpass_guards"] = len(tracer.guards)
    gm.meta["fxpass_output"] = output_key
    return gm


def _reduce_output(graph: torch.fx.Graph, output: str | None, cls: str) -> str | None:
    """The graph returns the one tensor :func:`~fxpass.outputs.pick_output` chooses from what forward
    returned; the key it was found under (None: forward returned a tensor)."""
    from .outputs import pick_output

    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    chosen, key = pick_output(out.args[0], output, is_leaf=lambda v: isinstance(v, torch.fx.Node),
                              where=f"{cls}.forward")
    if key is not None:
        out.args = (chosen,)
    return key


class _CallableModule(type(sys)):
    """``fxpass.capture`` is both this module and the function: importing the submodule (which
    Python then binds as the package attribute) must not shadow ``fxpass.capture(model, inputs)``."""

    def __call__(self, *args, **kwargs):
        return capture(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
