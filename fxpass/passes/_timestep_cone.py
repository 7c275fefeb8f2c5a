"""The timestep cone of a graph (what fold_timesteps folds): finding it and evaluating it.

The cone of the timestep input is every node computed from it and constants alone; reads of its shape
(the batch size) and of other inputs are outside.  :class:`ConeEvaluator` runs cone nodes for a given
timestep tensor, computing what they read from outside the cone (constants, ``x.dtype``) once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate

from ..errors import FxpassError
from ._util import UNKNOWN, is_assert

_STATIC_ATTRS = ("dtype", "device")


def is_static_attr(node: Node) -> bool:
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) == 2
        and node.args[1] in _STATIC_ATTRS
    )


def _input_nodes(node: Node) -> list[Node]:
    return list(node.all_input_nodes)


_SHAPE_ATTRS = ("shape", "ndim")
_SHAPE_METHODS = ("size", "dim", "ndimension", "numel", "nelement")


def reads_t_shape(node: Node, t_node: Node) -> bool:
    """``timesteps.shape`` / ``.size()`` / ``.numel()``: the batch of timesteps, not their values
    (``t_index`` has the same shape, not the same dtype)."""
    if not node.args or node.args[0] is not t_node:
        return False
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _SHAPE_ATTRS
    return node.op == "call_method" and node.target in _SHAPE_METHODS


def reads_input_shape(node: Node) -> bool:
    """``x.shape`` / ``x.size(0)`` / ``x.dim()`` of a graph input."""
    if not node.args or not isinstance(node.args[0], Node) or node.args[0].op != "placeholder":
        return False
    return reads_t_shape(node, node.args[0])


def timestep_cone(gm: GraphModule, t_node: Node, *, static_shapes: bool = False) -> tuple[list[Node], set[Node]]:
    """(cone in graph order, nodes that need only constants) for the timestep input ``t_node``.

    Reads of the timestep input's shape are not in the cone (they are the batch size, which a table
    row cannot carry): what uses them stays in the graph, reading ``t_index``'s shape instead.
    ``static_shapes`` (a static-batch model): the other inputs' shapes are constants, so the
    timesteps broadcast to the batch (diffusers' ``timesteps * torch.ones(sample.shape[0])``) stay in
    the cone."""
    depends_t: set[Node] = set()
    depends_other: set[Node] = set()
    constant: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if node is t_node:
            depends_t.add(node)
            continue
        if node.op == "placeholder" or reads_t_shape(node, t_node):
            depends_other.add(node)
            continue
        if is_static_attr(node) or (static_shapes and reads_input_shape(node)):  # x.dtype, x.shape (static)
            constant.add(node)
            continue
        inputs = _input_nodes(node)
        if any(i in depends_other for i in inputs):
            depends_other.add(node)
        elif any(i in depends_t for i in inputs):
            depends_t.add(node)
        else:
            constant.add(node)
    cone = [n for n in gm.graph.nodes if n in depends_t and n is not t_node]
    return cone, constant


class ConeEvaluator:
    """Evaluates cone nodes for a given timestep tensor with torch.fx's Interpreter."""

    def __init__(self, gm: GraphModule, t_node: Node, cone: list[Node], constant: set[Node], static: dict):
        self.gm = gm
        self.t_node = t_node
        self.cone = cone
        self.constant = constant
        self.static = static
        self.interp = torch.fx.Interpreter(gm)
        self._constants: dict[Node, Any] = {}

    def _constant(self, node: Node):
        if node not in self._constants:
            if is_static_attr(node) or reads_input_shape(node):
                value = self.static.get(node, UNKNOWN)
                if value is UNKNOWN:
                    raise FxpassError(f"fold_timesteps: cannot tell {node.format_node()} without example inputs")
                self._constants[node] = value
            else:
                args = map_aggregate(node.args, lambda a: self._constant(a) if isinstance(a, Node) else a)
                kwargs = map_aggregate(node.kwargs, lambda a: self._constant(a) if isinstance(a, Node) else a)
                self._constants[node] = getattr(self.interp, node.op)(node.target, args, kwargs)
        return self._constants[node]

    def run(self, t_value: torch.Tensor, nodes: list[Node]) -> dict[Node, Any]:
        env: dict[Node, Any] = {self.t_node: t_value}

        def fetch(a):
            if not isinstance(a, Node):
                return a
            if a in env:
                return env[a]
            return self._constant(a)

        with torch.no_grad():
            for node in nodes:
                args = map_aggregate(node.args, fetch)
                kwargs = map_aggregate(node.kwargs, fetch)
                if is_assert(node):
                    env[node] = bool(args[0])
                    continue
                env[node] = getattr(self.interp, node.op)(node.target, args, kwargs)
        return env


def cone_closure(nodes: list[Node], cone_set: set[Node]) -> list[Node]:
    """The cone nodes that ``nodes`` depend on, in graph order."""
    needed: set[Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in needed or n not in cone_set:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in cone_set_order(cone_set) if n in needed]


def cone_set_order(cone_set: set[Node]) -> list[Node]:
    if not cone_set:
        return []
    graph = next(iter(cone_set)).graph
    return [n for n in graph.nodes if n in cone_set]
