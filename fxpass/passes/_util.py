"""Shared machinery of the fx passes: static values by fake propagation, finishing a pass."""

from __future__ import annotations

import contextlib
import operator
from typing import Any

import torch
import torch.fx
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate
from torch.fx.passes.infra.pass_base import PassResult

from ..errors import FxpassError


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()

#: call targets that only move data (no arithmetic): used to follow qkv channels and casts
MOVEMENT_METHODS = frozenset(
    {"reshape", "view", "split", "chunk", "contiguous", "permute", "transpose", "flatten", "unflatten",
     "squeeze", "unsqueeze", "narrow", "tensor_split", "unbind", "expand", "view_as", "reshape_as"}
)
MOVEMENT_FUNCTIONS = frozenset(
    {operator.getitem, torch.reshape, torch.split, torch.chunk, torch.narrow, torch.permute, torch.transpose,
     torch.flatten, torch.squeeze, torch.unsqueeze, torch.tensor_split, torch.unbind}
)


#: assertion targets: route 1's asserts and guards (``torch._assert``), torch.export's runtime asserts
ASSERT_TARGETS = (torch._assert, torch.ops.aten._assert_async.msg, torch.ops.aten._assert_scalar.default)


def is_assert(node: Node) -> bool:
    return node.op == "call_function" and node.target in ASSERT_TARGETS


#: reads of a tensor's metadata: their values depend on its shape, dtype and device, never on its data
METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout", "is_sparse", "is_quantized"})
METADATA_METHODS = frozenset(
    {"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_floating_point", "is_complex",
     "element_size", "stride", "is_contiguous"}
)
METADATA_FUNCTIONS = frozenset({torch.numel, torch.is_floating_point, torch.is_complex, torch.is_tensor})

#: elementwise operations: a Python number among their operands never changes the result's shape
_ELEMENTWISE_NAMES = frozenset(
    {"add", "sub", "mul", "truediv", "div", "true_divide", "floordiv", "floor_divide", "mod", "remainder",
     "fmod", "pow", "neg", "pos", "abs", "gt", "ge", "lt", "le", "eq", "ne", "and_", "or_", "xor", "invert",
     "clamp", "clip", "clamp_min", "clamp_max", "maximum", "minimum", "where", "lerp", "masked_fill", "rsub"}
)
_ELEMENTWISE_FUNCTIONS = frozenset(
    f for owner in (operator, torch) for name in _ELEMENTWISE_NAMES if callable(f := getattr(owner, name, None))
)


def reads_metadata(node: Node) -> bool:
    """``x.shape``, ``x.dtype``, ``x.size(0)``, ``x.numel()``, ...: a value known without ``x``'s data."""
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) == 2 and node.args[1] in METADATA_ATTRS
        return node.target in METADATA_FUNCTIONS
    return node.op == "call_method" and node.target in METADATA_METHODS


def _is_elementwise(node: Node) -> bool:
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_NAMES
    return node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS


def _tensorish(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_tensorish(v) for v in value)
    return False


def example_inputs_of(gm: GraphModule, example_inputs=None) -> dict[str, Any] | None:
    """Example inputs by placeholder name: given ones, else those ``capture`` recorded."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if example_inputs is None:
        recorded = getattr(gm, "meta", {}).get("fxpass_example_inputs")
        if recorded is None:
            return None
        return {k: v for k, v in recorded.items() if k in names}
    if isinstance(example_inputs, dict):
        return dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return dict(zip(names, example_inputs))


class StaticValues(dict):
    """``static_values``' result: node -> value, and which nodes depend on input data."""

    #: nodes whose value reads input data (tensors included: their shapes may still be known)
    reads_data: set
    #: nodes left ``UNKNOWN`` for it: Python values from data, tensors whose shape depends on data
    data_dependent: set


def static_values(gm: GraphModule, example_inputs=None) -> StaticValues:
    """Each node's value under fake tensors of the example inputs' shapes and dtypes.

    Values ``capture`` recorded on the nodes are reused (no recomputation); other nodes are run.
    Shape arithmetic, dtypes and devices come out as concrete Python values; tensors as fake tensors
    (shape/dtype only).  Anything that depends on the inputs' *data* is ``UNKNOWN``, however it was
    computed (``.item()``, ``bool(tensor)``, ``not tensor``: capture recorded the example's value for
    those, and that value is no fact about other inputs), as is a tensor whose shape depends on data
    (a boolean mask, ``nonzero``, a size read from ``.item()``).  ``result.data_dependent`` holds those
    nodes, ``result.reads_data`` every node whose value reads input data.  Without example inputs
    every placeholder is ``UNKNOWN``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs = example_inputs_of(gm, example_inputs) or {}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    interp = torch.fx.Interpreter(gm)
    env = StaticValues()
    # value_dep: the value reads input data; meta_dep: so does its shape/dtype (a Python value: = value_dep)
    value_dep: set[Node] = set()
    meta_dep: set[Node] = set()
    tensors: set[Node] = set()
    env.reads_data = value_dep
    env.data_dependent = meta_dep

    def has_unknown(value) -> bool:
        found = []
        map_aggregate(value, lambda v: found.append(v) if v is UNKNOWN else None)
        return bool(found)

    with mode:
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                value = inputs.get(node.target, UNKNOWN)
                value_dep.add(node)
                if isinstance(value, torch.Tensor):
                    env[node] = mode.from_tensor(value)
                    tensors.add(node)
                else:  # a Python input (or none given): a decision on it is a decision on data
                    meta_dep.add(node)
                    env[node] = UNKNOWN
                continue
            if node.op == "output":
                continue
            if is_assert(node):
                env[node] = None
                continue
            value = _from_capture(node)
            if value is UNKNOWN:
                args = map_aggregate(node.args, lambda a: env[a] if isinstance(a, Node) else a)
                kwargs = map_aggregate(node.kwargs, lambda a: env[a] if isinstance(a, Node) else a)
                if not has_unknown((args, kwargs)):
                    try:
                        value = getattr(interp, node.op)(node.target, args, kwargs)
                    except Exception:
                        value = UNKNOWN
            inputs_of = node.all_input_nodes
            if _tensorish(value):
                tensors.add(node)
            if reads_metadata(node):
                dep = bool(node.args) and isinstance(node.args[0], Node) and node.args[0] in meta_dep
                if dep:
                    value_dep.add(node)
                    meta_dep.add(node)
            elif any(i in value_dep for i in inputs_of):
                value_dep.add(node)
                if node not in tensors:
                    meta_dep.add(node)  # a Python value computed from data
                elif any(i in meta_dep and (i in tensors or not _is_elementwise(node)) for i in inputs_of) or (
                    node.meta.get("fxpass_real")  # capture could not fake it: its shape may read the data
                ):
                    meta_dep.add(node)
            env[node] = UNKNOWN if node in meta_dep else value
    return env


def _ancestors(nodes) -> set[Node]:
    """``nodes`` and every node they are computed from."""
    needed: set[Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    return needed


def constant_value(gm: GraphModule, node: Node, example_inputs=None):
    """``node`` computed for real from the example inputs (call it only for a node that static_values
    does not count as data-dependent: its value is then the same for every input of those shapes)."""
    inputs = example_inputs_of(gm, example_inputs)
    needed = _ancestors([node])
    interp = torch.fx.Interpreter(gm)
    env: dict[Node, Any] = {}
    with torch.no_grad():
        for n in gm.graph.nodes:
            if n not in needed:
                continue
            if n.op == "placeholder":
                if inputs is None or n.target not in inputs:
                    return UNKNOWN
                env[n] = inputs[n.target]
                continue
            args = map_aggregate(n.args, lambda a: env[a] if isinstance(a, Node) else a)
            kwargs = map_aggregate(n.kwargs, lambda a: env[a] if isinstance(a, Node) else a)
            env[n] = getattr(interp, n.op)(n.target, args, kwargs)
    return env[node]


#: the largest batch a dynamic-batch export accepts (``fxpass.export``'s ``Dim("batch", max=1024)``)
MAX_BATCH = 1024


def dynamic_batch_of(gm: GraphModule, dynamic_batch: bool | None) -> bool:
    """An explicit ``dynamic_batch`` argument, else what ``fxpass.rewrite`` recorded in ``gm.meta``."""
    if dynamic_batch is None:
        return bool(getattr(gm, "meta", {}).get("fxpass_dynamic_batch", False))
    return bool(dynamic_batch)


_BATCH_CACHE = "_fxpass_batch_dependence"


def _graph_key(gm: GraphModule, inputs: dict, max_batch: int):
    shapes = tuple((k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, repr(v))
                   for k, v in sorted(inputs.items()))
    return gm.graph.python_code(root_module="self").src, shapes, max_batch


def remember_batch_dependence(gm: GraphModule, found: dict[Node, str], example_inputs=None, *,
                              max_batch: int = MAX_BATCH) -> None:
    """Keep a whole-graph ``batch_dependence`` result for the graph as it is now, for the next pass.

    Sound after a pass that only erased nodes (``strip_asserts``): erasing never changes the value of
    a node that is left.  Any other change to the graph changes the key, and the next call recomputes."""
    inputs = example_inputs_of(gm, example_inputs) or {}
    names = {n.name for n in gm.graph.nodes}
    kept = {n.name: reason for n, reason in found.items() if n.name in names}
    gm.meta[_BATCH_CACHE] = (_graph_key(gm, inputs, max_batch), kept)


def batch_dependence(gm: GraphModule, example_inputs=None, *, nodes=None,
                     max_batch: int = MAX_BATCH) -> dict[Node, str]:
    """Nodes whose Python value (not a tensor) changes with the batch size, each with the reason.

    The graph is run once on fake tensors whose first dimension is one symbol ``B`` in
    ``1..max_batch`` (as a dynamic-batch export sees it), shared by every input.  A Python value is
    batch-dependent when it still holds ``B`` (``x.shape[0]``, ``x.numel()``, ``x.shape[0] == 1``
    unless provable for every ``B``), when computing it made a decision on ``B`` (``not``, ``int()``,
    comparing shapes), when it is computed from such a value, or when the graph cannot be run at a free
    ``B`` up to it.  Tensors are never listed (their symbolic shapes are what the export keeps);
    values that need input data are left to ``static_values``.  ``nodes``: only these (and what they
    are computed from) are run; default, the whole graph.  A result ``remember_batch_dependence``
    kept for this very graph is reused.
    """
    inputs = example_inputs_of(gm, example_inputs) or {}
    cached = getattr(gm, "meta", {}).get(_BATCH_CACHE)
    if cached is not None and cached[0] == _graph_key(gm, inputs, max_batch):
        return {n: cached[1][n.name] for n in gm.graph.nodes if n.name in cached[1]}
    return _FreeBatchRun(gm, inputs, max_batch).run(None if nodes is None else _ancestors(nodes))


class _FreeBatchRun:
    """``batch_dependence``'s run of a graph on fake tensors whose first dimension is one symbol ``B`` in
    ``1..max_batch``: each node's value, and the Python values found to depend on ``B`` with the reason."""

    def __init__(self, gm: GraphModule, inputs: dict, max_batch: int):
        from torch._dynamo.source import ConstantSource
        from torch._subclasses.fake_tensor import (
            DataDependentOutputException,
            DynamicOutputShapeException,
            FakeTensorMode,
        )
        from torch.fx.experimental.symbolic_shapes import DimDynamic, GuardOnDataDependentSymNode, ShapeEnv

        self.data_errors = (DataDependentOutputException, DynamicOutputShapeException, GuardOnDataDependentSymNode)
        self.gm = gm
        self.inputs = inputs
        self.max_batch = max_batch
        captured = [v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.ndim]
        hint = max([2, *captured])
        self.shape_env = ShapeEnv(specialize_zero_one=False, duck_shape=False)
        source = ConstantSource("batch")
        self.symbol = self.shape_env.create_symbol(hint, source=source, dynamic_dim=DimDynamic.DYNAMIC)
        self.shape_env.constrain_symbol_range(self.symbol, compiler_min=1, compiler_max=max_batch)
        self.batch = self.shape_env.create_symintnode(self.symbol, hint=hint, source=source)
        self.mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self.interp = torch.fx.Interpreter(gm)
        self.env: dict[Node, Any] = {}
        self.failed: set[Node] = set()  # could not run at a free batch size (a batch-1 specialisation in the graph)
        self.found: dict[Node, str] = {}

    def run(self, needed: set[Node] | None) -> dict[Node, str]:
        """Run the nodes in ``needed`` (all of them: ``None``); the batch-dependent ones, with the reason."""
        with self.mode, torch.no_grad():
            for node in self.gm.graph.nodes:
                if node.op == "output" or (needed is not None and node not in needed):
                    continue
                if node.op == "placeholder":
                    self.env[node] = self._placeholder(node)
                elif is_assert(node):
                    self.env[node] = None
                else:
                    self._step(node)
        return self.found

    def _placeholder(self, node: Node):
        value = self.inputs.get(node.target, UNKNOWN)
        if isinstance(value, torch.Tensor):
            shape = (self.batch, *value.shape[1:]) if value.ndim else ()
            return torch.empty(shape, dtype=value.dtype)
        return UNKNOWN

    def _step(self, node: Node) -> None:
        env = self.env
        args = map_aggregate(node.args, lambda a: env[a] if isinstance(a, Node) else a)
        kwargs = map_aggregate(node.kwargs, lambda a: env[a] if isinstance(a, Node) else a)
        sources = node.all_input_nodes
        unknown = []
        map_aggregate((args, kwargs), lambda v: unknown.append(v) if v is UNKNOWN else None)
        guards_before = len(self.shape_env.guards)
        if unknown:
            value = UNKNOWN
            if any(i in self.failed for i in sources):
                self.failed.add(node)
        else:
            value = self._evaluate(node, args, kwargs)
        env[node] = value
        if _tensorish(value):
            return
        reason = self._reason(node, value, guards_before)
        if reason is not None:
            self.found[node] = reason

    def _evaluate(self, node: Node, args, kwargs):
        # A tensor operation may assume things about B for its own bookkeeping (contiguity:
        # B != 1): keep those out of the shape env, so that the only guards it records are the
        # decisions that Python-level nodes (not, int(), shape comparisons) make on B.
        tensor_op = not reads_metadata(node) and any(_tensorish(self.env[i]) for i in node.all_input_nodes)
        try:
            with self.shape_env.suppress_guards() if tensor_op else contextlib.nullcontext():
                if _keeps_shape(self.gm, node) and isinstance(args[0], torch.Tensor):
                    return torch.empty_like(args[0])  # GroupNorm under symbolic shapes is slow
                return getattr(self.interp, node.op)(node.target, args, kwargs)
        except self.data_errors:
            return UNKNOWN
        except Exception:
            self.failed.add(node)
            return UNKNOWN

    def _reason(self, node: Node, value, guards_before: int) -> str | None:
        """Why ``node``'s Python value depends on the batch size, or None."""
        if node in self.failed:
            return "cannot be computed at another batch size"
        if len(self.shape_env.guards) > guards_before:
            return "is decided on the batch size"
        if self._holds_batch(value):
            return _READS
        # a plain value: batch-dependent only if computed from a decision (symbols were tracked)
        return next((self.found[i] for i in node.all_input_nodes if self.found.get(i, _READS) != _READS), None)

    def _holds_batch(self, value) -> bool:
        """``value`` still holds ``B`` (not provable from the range ``1..max_batch`` alone)."""
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy

            expr = value.node.expr
            if not expr.free_symbols:
                return False
            try:  # provable from the range 1..max_batch alone (not from what earlier ops assumed)?
                bounds = bound_sympy(expr, {self.symbol: ValueRanges(1, self.max_batch)})
                return bounds.lower != bounds.upper
            except Exception:
                return True
        if isinstance(value, (list, tuple)):
            return any(self._holds_batch(v) for v in value)
        if isinstance(value, dict):
            return any(self._holds_batch(v) for v in value.values())
        return False


_READS = "reads the batch size"

_SHAPE_KEEPING_FUNCTIONS = frozenset(
    {torch.nn.functional.group_norm, torch.group_norm, torch.nn.functional.silu, torch.nn.functional.dropout}
)
_SHAPE_KEEPING_MODULES = (torch.nn.GroupNorm, torch.nn.SiLU, torch.nn.Dropout, torch.nn.Identity)


def _keeps_shape(gm: GraphModule, node: Node) -> bool:
    """Output has its first argument's shape and dtype (a norm, an activation): no need to run it."""
    if node.op == "call_function":
        return node.target in _SHAPE_KEEPING_FUNCTIONS and bool(node.args)
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) in _SHAPE_KEEPING_MODULES and len(node.args) == 1
    return False


def _from_capture(node: Node):
    """The value ``capture`` recorded for ``node`` (tensors as empty fakes of that shape), if any."""
    meta = node.meta
    if "fxpass_shape" in meta:
        return torch.empty(meta["fxpass_shape"], dtype=meta["fxpass_dtype"])
    if "fxpass_value" in meta:
        return meta["fxpass_value"]
    return UNKNOWN


def source_of(node: Node) -> str | None:
    """``file:line: `source``` of the user's code that made ``node`` (recorded by ``capture``), if known."""
    recorded = node.meta.get("fxpass_source")
    if not recorded:
        return None
    import linecache

    filename, lineno = recorded
    text = linecache.getline(filename, lineno).strip()
    return f"{filename}:{lineno}: `{text}`" if text else f"{filename}:{lineno}"


def finish(gm: GraphModule, count: int) -> PassResult:
    """Dead-code elimination, lint and recompile; report whether anything changed."""
    if count:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    gm.meta.setdefault("fxpass_rewrites", {})
    return PassResult(gm, bool(count))


def record(gm: GraphModule, name: str, count: int) -> None:
    gm.meta.setdefault("fxpass_rewrites", {})[name] = count


def require_graph_module(gm, name: str) -> GraphModule:
    if not isinstance(gm, GraphModule):
        raise FxpassError(f"{name}: expected a torch.fx.GraphModule, got {type(gm).__name__}")
    return gm
