"""Shared machinery of the fx passes: static values by fake propagation, finishing a pass."""

from __future__ import annotations

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


def is_assert(node: Node) -> bool:
    return node.op == "call_function" and node.target in (torch._assert, torch.ops.aten._assert_async.msg)


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


def static_values(gm: GraphModule, example_inputs=None) -> dict[Node, Any]:
    """Each node's value under fake tensors of the example inputs' shapes and dtypes.

    Values ``capture`` recorded on the nodes are reused (no recomputation); other nodes are run.
    Shape arithmetic, dtypes and devices come out as concrete Python values; tensors as fake tensors
    (shape/dtype only); anything that needs real data (``.item()``) is ``UNKNOWN``, as is everything
    computed from it.  Without example inputs every placeholder is ``UNKNOWN``.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs = example_inputs_of(gm, example_inputs) or {}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    interp = torch.fx.Interpreter(gm)
    env: dict[Node, Any] = {}

    def has_unknown(value) -> bool:
        found = []
        map_aggregate(value, lambda v: found.append(v) if v is UNKNOWN else None)
        return bool(found)

    with mode:
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                value = inputs.get(node.target, UNKNOWN)
                env[node] = mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
                continue
            if node.op == "output":
                continue
            args = map_aggregate(node.args, lambda a: env[a] if isinstance(a, Node) else a)
            kwargs = map_aggregate(node.kwargs, lambda a: env[a] if isinstance(a, Node) else a)
            if has_unknown((args, kwargs)):
                env[node] = UNKNOWN
                continue
            if is_assert(node):
                env[node] = None
                continue
            known = _from_capture(node)
            if known is not UNKNOWN:
                env[node] = known
                continue
            try:
                env[node] = getattr(interp, node.op)(node.target, args, kwargs)
            except Exception:
                env[node] = UNKNOWN
    return env


def _from_capture(node: Node):
    """The value ``capture`` recorded for ``node`` (tensors as empty fakes of that shape), if any."""
    meta = node.meta
    if "fxpass_shape" in meta:
        return torch.empty(meta["fxpass_shape"], dtype=meta["fxpass_dtype"])
    if "fxpass_value" in meta:
        return meta["fxpass_value"]
    return UNKNOWN


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
