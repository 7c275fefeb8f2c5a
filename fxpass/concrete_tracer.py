"""The tracer behind :func:`fxpass.capture.capture`: proxies that carry their example values.

:class:`ConcreteTracer` is a ``torch.fx.Tracer`` whose proxies (:class:`ConcreteProxy`) know their
value on the example inputs (fake tensors for shapes and dtypes, real data computed on demand where
a decision reads it), so that Python which needs a concrete value is decided on the example.  It
owns the guards those decisions leave in the graph (``torch._assert`` nodes, ``GUARD_PREFIX`` /
``ASSERT_PREFIX`` in their messages) and where in the user's code each node and decision came from.
"""

from __future__ import annotations

import dis
import inspect
import linecache
import math
import operator
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch.fx import Proxy, Tracer
from torch.fx.proxy import Attribute
from torch.fx._symbolic_trace import _maybe_revert_all_patches
from torch.fx.node import Node, map_aggregate

from .errors import FxpassError, first_line

__all__ = ["ConcreteTracer", "GUARD_PREFIX", "ASSERT_PREFIX"]

GUARD_PREFIX = "fxpass guard"
ASSERT_PREFIX = "fxpass assert"

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)
#: fxpass's own files are never the user's code, except the U-Nets it ships (models/, reference/)
_FXPASS_DIR = os.path.dirname(_THIS_FILE) + os.sep
_MODEL_DIRS = tuple(os.path.join(_FXPASS_DIR, d) + os.sep for d in ("models", "reference"))

_IS_USER_FILE: dict[str, bool] = {}
#: the frame that calls the model's forward: frames outside it are the caller's, never the model's
_TRACE_CODE = Tracer.trace.__code__


def _is_user_file(co_filename: str) -> bool:
    known = _IS_USER_FILE.get(co_filename)
    if known is None:
        filename = os.path.abspath(co_filename)
        ours = filename.startswith(_FXPASS_DIR) and not filename.startswith(_MODEL_DIRS)
        known = _IS_USER_FILE[co_filename] = not filename.startswith(_TORCH_DIR) and not ours
    return known


def _user_frame(frame):
    """The nearest frame outside torch and capture's own files (the user's model code)."""
    while frame is not None and frame.f_code is not _TRACE_CODE:  # the model's code runs inside Tracer.trace
        if _is_user_file(frame.f_code.co_filename):
            return frame
        frame = frame.f_back
    return None


def _where(frame) -> str:
    if frame is None:
        return "<unknown>"
    filename, lineno = frame.f_code.co_filename, frame.f_lineno
    source = linecache.getline(filename, lineno).strip()
    return f"{filename}:{lineno}: `{source}`" if source else f"{filename}:{lineno}"


def _describe(node: Node) -> str:
    """A node made where no user frame is on the stack (an attribute of a traced value, read lazily)."""
    if node.target is getattr and len(node.args) == 2:
        return f"`{node.args[0]}.{node.args[1]}`"
    return f"`{getattr(node.target, '__name__', node.target)}` on {', '.join(map(str, node.args))[:80]}"


def _is_assert_jump(frame) -> bool:
    """True when ``frame`` is at the conditional jump of an ``assert`` statement."""
    instructions = list(dis.get_instructions(frame.f_code))
    offsets = [ins.offset for ins in instructions]
    from bisect import bisect_left

    cur = bisect_left(offsets, frame.f_lasti)
    if cur >= len(instructions):
        return False
    ins = instructions[cur]
    if "JUMP" not in ins.opname or "IF_TRUE" not in ins.opname:
        return False
    following = instructions[cur + 1] if cur + 1 < len(instructions) else None
    return following is not None and (
        following.opname == "LOAD_ASSERTION_ERROR"
        or (following.opname == "LOAD_GLOBAL" and following.argval == "AssertionError")
    )


class _NeedsReal:
    def __repr__(self) -> str:
        return "<needs real data>"


_NEEDS_REAL = _NeedsReal()


class ConcreteProxy(Proxy):
    """A proxy that knows its value on the example inputs."""

    @property
    def value(self):
        """The example value at shape level (tensors may be fake: shape and dtype only)."""
        return self.tracer.value_of(self.node)

    @property
    def data_value(self):
        """The example value with real data (computed on demand for data-dependent decisions)."""
        return self.tracer.python_value(self.node)

    def __bool__(self) -> bool:
        frame = _user_frame(inspect.currentframe().f_back)
        value = bool(self.data_value)
        if frame is not None and _is_assert_jump(frame):
            where = _where(frame)
            if not value:
                raise FxpassError(f"{where}: assert fails on the example inputs")
            self.tracer.create_proxy("call_function", torch._assert, (self, f"{ASSERT_PREFIX}: {where}"), {})
            return True
        self.tracer.add_guard(self, value, frame, f"the condition was {value} on the example")
        return value

    def __len__(self) -> int:
        value = self.value
        if isinstance(value, torch.Tensor):  # len(tensor) reads its first dimension: a decision, guarded
            return self.tracer.guard_length(self, _user_frame(inspect.currentframe().f_back))
        return len(self.data_value if value is _NEEDS_REAL else value)

    def __iter__(self):
        # by the example value (torch.fx's own __iter__ trusts the unpacking count without checking it)
        return self.tracer.iter(self)

    def __index__(self) -> int:
        return self._specialise(operator.index, inspect.currentframe().f_back)

    def __int__(self) -> int:
        return self._specialise(int, inspect.currentframe().f_back)

    def __float__(self) -> float:
        return self._specialise(float, inspect.currentframe().f_back)

    def __format__(self, spec: str) -> str:
        """A traced Python number formatted (``f"{t.item()}"``): the example's text, guarded on the value."""
        if isinstance(self.value, torch.Tensor):
            return super().__format__(spec)
        value = self._specialise(lambda v: v, inspect.currentframe().f_back, "formatted into text")
        return format(value, spec)

    def __hash__(self) -> int:
        """A traced Python number as a dict or set key: hashed as the example's value, guarded on it (a
        tensor-valued proxy keeps identity hashing, as torch.fx uses it)."""
        value = self.value
        if isinstance(value, (int, float, bool)) and not isinstance(value, torch.Tensor):
            return hash(self._specialise(lambda v: v, inspect.currentframe().f_back, "used as a dict or set key"))
        return id(self)

    def _specialise(self, convert, caller, how: str | None = None):
        """A Python number from a traced value (``int(n)``, ``range(n)``): the example's, guarded."""
        value = convert(self.data_value)
        if how is None:
            how = "used as an integer (range(), an index)" if convert is operator.index else f"{convert.__name__}()"
        self.tracer.add_guard(self == value, True, _user_frame(caller), f"{how} gave {value!r} on the example")
        return value


class ConcreteAttribute(Attribute, ConcreteProxy):
    """``proxy.attr`` (e.g. ``x.shape``) that also knows its example value."""


def _attribute(self, k):
    return ConcreteAttribute(self, k)


ConcreteProxy.__getattr__ = _attribute


class _RealNeeded(Exception):
    """An argument has no fake value: evaluate the node on real data."""


class ConcreteTracer(Tracer):
    """A ``torch.fx.Tracer`` whose proxies carry example values (see module docstring)."""

    def __init__(self, example_inputs: Mapping[str, Any]):
        from torch._subclasses.fake_tensor import FakeTensorMode

        super().__init__(autowrap_modules=(math,), param_shapes_constant=False)
        self.example_inputs = dict(example_inputs)
        # Values are propagated with fake tensors (shapes and dtypes, no arithmetic): control flow on
        # shapes is decided for free.  Real data is computed only where a decision reads it
        # (``.item()``, ``if tensor:``), for that node's ancestors alone.
        self._fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._fake_inputs = {
            k: self._fake_mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in self.example_inputs.items()
        }
        self._values: dict[Node, Any] = {}
        self._real: dict[Node, Any] = {}
        self._order: dict[Node, int] = {}
        self.guards: list[Node] = []

    # ---- values ------------------------------------------------------------------------
    def value_of(self, node: Node):
        if node not in self._values:
            raise FxpassError(f"capture: no example value for node {node.name}")
        return self._values[node]

    def python_value(self, node: Node):
        """``node``'s value with real data where it is a tensor or could not be faked."""
        value = self.value_of(node)
        if value is _NEEDS_REAL or isinstance(value, torch.Tensor):
            return self.real_value(node)
        return value

    def _run(self, node: Node, fetch):
        args = map_aggregate(node.args, fetch)
        kwargs = map_aggregate(node.kwargs, fetch)
        if node.op == "placeholder":
            return self.example_inputs[node.target]
        if node.op == "get_attr":
            obj = self.root
            for atom in node.target.split("."):
                obj = getattr(obj, atom)
            return obj
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)
        if node.op == "call_module":
            return self.root.get_submodule(node.target)(*args, **kwargs)
        if node.op == "output":
            return args[0]
        raise FxpassError(f"capture: cannot evaluate node kind {node.op}")

    def real_value(self, node: Node):
        """Compute ``node`` on the real example inputs (its ancestors first, memoised)."""
        if node in self._real:
            return self._real[node]
        needed: list[Node] = []
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n in seen or n in self._real:
                continue
            seen.add(n)
            needed.append(n)
            stack.extend(n.all_input_nodes)
        needed.sort(key=lambda n: self._order.get(n, -1))
        with _maybe_revert_all_patches(), torch.no_grad():
            for n in needed:
                if n.op == "placeholder":
                    self._real[n] = self.example_inputs[n.target]
                else:
                    self._real[n] = self._run(n, lambda a: self._real[a] if isinstance(a, Node) else a)
        return self._real[node]

    def _fake_arg(self, a):
        if not isinstance(a, Node):
            return a
        if a not in self._values:  # nodes fx made without create_proxy (e.g. get_attr of a tensor)
            self._order.setdefault(a, len(self._order))
            self._values[a] = self._evaluate(a)
        value = self._values[a]
        if value is _NEEDS_REAL:
            raise _RealNeeded
        return value

    def _evaluate(self, node: Node):
        if node.op == "placeholder":
            return self._fake_inputs[node.target]
        if node.op == "get_attr":
            with _maybe_revert_all_patches():
                return self._run(node, None)
        try:
            with _maybe_revert_all_patches(), torch.no_grad(), self._fake_mode:
                return self._run(node, self._fake_arg)
        except Exception:
            # data-dependent (``.item()``, a boolean mask) or not fake-able: compute it for real; its
            # recorded value (a shape included) may then depend on the data
            node.meta["fxpass_real"] = True
            return self.real_value(node)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        self._order.setdefault(node, len(self._order))
        if "fxpass_source" not in node.meta:
            frame = _user_frame(inspect.currentframe().f_back)
            if frame is not None:
                node.meta["fxpass_source"] = (frame.f_code.co_filename, frame.f_lineno)
        if node not in self._values:
            try:
                value = self._evaluate(node)
            except FxpassError:
                raise
            except Exception as exc:
                frame = _user_frame(inspect.currentframe().f_back)
                where = _where(frame) if frame is not None else f"the model's forward: {_describe(node)}"
                raise FxpassError(f"{where}: fails on the example inputs ({type(exc).__name__}: {first_line(exc)})"
                                  ) from exc
            self._values[node] = value
        return proxy

    def proxy(self, node: Node) -> Proxy:
        return ConcreteProxy(node, self)

    # ---- control flow ------------------------------------------------------------------
    def add_guard(self, proxy: Proxy, value: bool, frame, decision: str = "") -> None:
        """A ``torch._assert`` node on ``proxy`` (or ``not proxy`` when ``value`` is false).

        ``node.meta["fxpass_guard"]`` keeps the user's line and what capture decided there, so that
        a guard that cannot be removed is reported as the decision it would freeze.
        """
        where = _where(frame)
        condition = proxy if value else self.create_proxy("call_function", operator.not_, (proxy,), {})
        guard = self.create_proxy("call_function", torch._assert, (condition, f"{GUARD_PREFIX}: {where}"), {})
        guard.node.meta["fxpass_guard"] = {"where": where, "decision": decision or f"decided {value} on the example"}
        self.guards.append(guard.node)

    def guard_length(self, obj: Proxy, frame) -> int:
        """``len`` of a traced tensor (its first dimension), guarded: the batch size, often."""
        length = len(self.value_of(obj.node))
        size = self.create_proxy("call_method", "size", (obj, 0), {})
        self.add_guard(size == length, True, frame, f"len() of a tensor gave {length} on the example")
        return length

    def to_bool(self, obj: Proxy) -> bool:  # only reached for plain Proxy objects
        return bool(self.python_value(obj.node))

    def iter(self, obj: Proxy):
        value = self.value_of(obj.node)
        if isinstance(value, torch.Tensor):  # iterating over a tensor unrolls its first dimension
            length = self.guard_length(obj, _user_frame(inspect.currentframe().f_back))
        else:
            length = len(value)
        return iter([obj[i] for i in range(length)])

    def keys(self, obj: Proxy):
        return list(self.value_of(obj.node).keys())

    # ---- modules -----------------------------------------------------------------------
    def call_module(self, m, forward, args, kwargs):
        try:
            self.path_of_module(m)
        except NameError:
            # a module built on the fly (e.g. a slice of an nn.Sequential): trace through it
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        names = list(self.example_inputs)

        def specialised(root_self, *placeholders):
            return root_fn(root_self, **dict(zip(names, placeholders)))

        placeholders = [self.create_proxy("placeholder", name, (), {}) for name in names]
        return specialised, [self.root, *placeholders]
