"""fold_timesteps: fold the timestep cone to constants, or to tables gathered by ``t_index``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import FxpassError
from ._util import UNKNOWN, finish, is_assert, record, require_graph_module, static_values

TIMESTEP_NAMES = ("timesteps", "timestep", "t", "time", "ts", "time_step", "sigma")
INDEX_INPUT = "t_index"

_STATIC_ATTRS = ("dtype", "device")


def _find_timestep_input(gm: GraphModule, name: str | None) -> Node | None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if name is not None:
        return next((n for n in placeholders if n.target == name), None)
    for candidate in TIMESTEP_NAMES:
        for n in placeholders:
            if n.target == candidate:
                return n
    return None


def _is_static_attr(node: Node) -> bool:
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) == 2
        and node.args[1] in _STATIC_ATTRS
    )


def _input_nodes(node: Node) -> list[Node]:
    return list(node.all_input_nodes)


def timestep_cone(gm: GraphModule, t_node: Node) -> tuple[list[Node], set[Node]]:
    """(cone in graph order, nodes that need only constants) for the timestep input ``t_node``."""
    depends_t: set[Node] = set()
    depends_other: set[Node] = set()
    constant: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if node is t_node:
            depends_t.add(node)
            continue
        if node.op == "placeholder":
            depends_other.add(node)
            continue
        if _is_static_attr(node):  # x.dtype / x.device: known without reading x
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


class _ConeEvaluator:
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
            if _is_static_attr(node):
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


def _guard_message(node: Node) -> str:
    return str(node.args[1]) if len(node.args) > 1 else node.format_node()


def _closure(nodes: list[Node], cone_set: set[Node]) -> list[Node]:
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


def fold_timesteps(
    gm: GraphModule,
    timesteps: int | float | Sequence[int | float],
    *,
    timestep_input: str | None = None,
    example_inputs=None,
) -> PassResult:
    """Fold every node computed only from the timestep input and constants.

    Precondition: ``gm`` has a timestep placeholder (named ``timesteps``/``t``/..., or given by
    ``timestep_input``), and its cone is evaluable row-wise (the family's sinusoidal embedding, time
    MLP, ResBlock projections, ``1 + scale``).  ``timesteps`` an int folds to constants (broadcast over
    the batch); a sequence builds a table per cone output and gathers its rows with a new int64 input
    ``t_index`` (index into ``timesteps``).  Guards on the timestep are checked for every entry.

    Before::                                    After (table mode)::

        timesteps ─ embed ─ time_mlp ─ proj ─┐      t_index ─ index_select(table_k) ─┐
        x ─ conv ─ norm ───────────────── mul ─      x ─ conv ─ norm ────────────── mul ─
    """
    gm = require_graph_module(gm, "fold_timesteps")
    t_node = _find_timestep_input(gm, timestep_input)
    if t_node is None:
        record(gm, "fold_timesteps", 0)
        return PassResult(gm, False)

    table_mode = not isinstance(timesteps, (int, float))
    entries = list(timesteps) if table_mode else [timesteps]
    if not entries:
        raise FxpassError("fold_timesteps: the timestep schedule is empty")

    static = static_values(gm, example_inputs)
    cone, constant = timestep_cone(gm, t_node)
    cone_set = set(cone)
    guards = [n for n in cone if is_assert(n)]
    frontier = [
        n for n in cone if not is_assert(n) and any(u not in cone_set for u in n.users)
    ]
    t_example = static.get(t_node, UNKNOWN)
    t_dtype = t_example.dtype if isinstance(t_example, torch.Tensor) else torch.int64
    if any(isinstance(e, float) and not float(e).is_integer() for e in entries) and not t_dtype.is_floating_point:
        t_dtype = torch.float32

    evaluator = _ConeEvaluator(gm, t_node, cone, constant, static)

    # guards: entry by entry (a guard may read only the first element, as the .item() check does)
    if guards:
        guard_nodes = _closure(guards, cone_set)
        for index, entry in enumerate(entries):
            env = evaluator.run(torch.tensor([entry], dtype=t_dtype), guard_nodes)
            for g in guards:
                if not env[g]:
                    where = f"t_index {index}, timestep {entry}" if table_mode else f"timestep {entry}"
                    raise FxpassError(f"fold_timesteps: {where} breaks {_guard_message(g)}")

    values = _tabulate(evaluator, cone, frontier, entries, t_dtype, table_mode)

    graph = gm.graph
    if table_mode:
        with graph.inserting_before(t_node):
            index_node = graph.placeholder(INDEX_INPUT, type_expr=torch.Tensor)
    prefix = "_fxpass_ttable" if table_mode else "_fxpass_tconst"
    existing = sum(1 for name, _ in gm.named_buffers() if name.startswith(prefix))
    for k, (node, value) in enumerate(zip(frontier, values)):
        name = f"{prefix}_{existing + k}"
        gm.register_buffer(name, value.detach().clone().contiguous())
        first_user = min((u for u in node.users if u not in cone_set), key=_position)
        with graph.inserting_before(first_user):
            const = graph.get_attr(name)
            replacement = graph.call_function(torch.index_select, (const, 0, index_node)) if table_mode else const
        node.replace_all_uses_with(replacement, delete_user_cb=lambda user: user not in cone_set)

    for node in reversed(cone):
        if not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()  # e.g. timesteps.device, read by the folded arange
    if not t_node.users:
        graph.erase_node(t_node)
    else:
        raise FxpassError(f"fold_timesteps: input '{t_node.target}' is still used outside its cone")

    inputs = dict(gm.meta.get("fxpass_example_inputs") or {})
    batch = t_example.shape[0] if isinstance(t_example, torch.Tensor) and t_example.ndim else 1
    inputs.pop(t_node.target, None)
    if table_mode:
        ordered = {}
        for n in graph.nodes:
            if n.op == "placeholder":
                ordered[n.target] = torch.zeros(batch, dtype=torch.int64) if n.target == INDEX_INPUT else inputs.get(n.target)
        inputs = {k: v for k, v in ordered.items() if v is not None}
    gm.meta["fxpass_example_inputs"] = inputs
    gm.meta["fxpass_timesteps"] = entries if table_mode else entries[0]
    gm.meta["fxpass_mode"] = "table" if table_mode else "fixed"
    count = len(frontier)
    record(gm, "fold_timesteps", count)
    return finish(gm, count or 1)


def _position(node: Node) -> int:
    for i, n in enumerate(node.graph.nodes):
        if n is node:
            return i
    return -1


def _tabulate(evaluator: _ConeEvaluator, cone, frontier, entries, t_dtype, table_mode):
    value_nodes = [n for n in cone if not is_assert(n)]
    if not table_mode:
        env = evaluator.run(torch.tensor(entries, dtype=t_dtype), value_nodes)
        return [_as_tensor(env[n], n) for n in frontier]
    batched = evaluator.run(torch.tensor(entries, dtype=t_dtype), value_nodes)
    tables = [_as_tensor(batched[n], n) for n in frontier]
    rowwise = all(t.ndim >= 1 and t.shape[0] == len(entries) for t in tables)
    if rowwise:
        # the batched evaluation must equal the entry-by-entry one (checked on the ends of the schedule)
        for i in {0, len(entries) - 1}:
            single = evaluator.run(torch.tensor([entries[i]], dtype=t_dtype), value_nodes)
            for table, n in zip(tables, frontier):
                row = _as_tensor(single[n], n)
                if row.shape[0] != 1 or not torch.allclose(table[i : i + 1], row, rtol=1e-6, atol=1e-7):
                    rowwise = False
                    break
            if not rowwise:
                break
    if rowwise:
        return tables
    rows: list[list[torch.Tensor]] = [[] for _ in frontier]
    for entry in entries:
        single = evaluator.run(torch.tensor([entry], dtype=t_dtype), value_nodes)
        for k, n in enumerate(frontier):
            row = _as_tensor(single[n], n)
            if row.ndim == 0 or row.shape[0] != 1:
                raise FxpassError(
                    f"fold_timesteps: {n.format_node()} does not keep the timestep batch dimension; cannot tabulate"
                )
            rows[k].append(row)
    return [torch.cat(r, dim=0) for r in rows]


def _as_tensor(value, node: Node) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    raise FxpassError(f"fold_timesteps: cone output {node.name} is a {type(value).__name__}, not a tensor")


class FoldTimesteps(PassBase):
    """``fold_timesteps`` with its settings, for torch.fx's ``PassManager``."""

    def __init__(self, timesteps, *, timestep_input: str | None = None):
        super().__init__()
        self.timesteps = timesteps
        self.timestep_input = timestep_input

    def call(self, graph_module: GraphModule) -> PassResult:
        return fold_timesteps(graph_module, self.timesteps, timestep_input=self.timestep_input)
