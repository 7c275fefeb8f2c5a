"""fold_timesteps: fold the timestep cone to constants, or to tables gathered by ``t_index``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import FxpassError
from ._util import (
    UNKNOWN,
    batch_dependence,
    dynamic_batch_of,
    finish,
    is_assert,
    record,
    require_graph_module,
    source_of,
    static_values,
)

TIMESTEP_NAMES = ("timesteps", "timestep", "t", "time", "ts", "time_step", "sigma")
INDEX_INPUT = "t_index"

_STATIC_ATTRS = ("dtype", "device")

#: a table row must equal the cone evaluated for its entry alone within rtol and atol·max|table|
ROW_RTOL = 1e-5
ROW_ATOL = 1e-6


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


_SHAPE_ATTRS = ("shape", "ndim")
_SHAPE_METHODS = ("size", "dim", "ndimension", "numel", "nelement")


def _reads_t_shape(node: Node, t_node: Node) -> bool:
    """``timesteps.shape`` / ``.size()`` / ``.numel()``: the batch of timesteps, not their values
    (``t_index`` has the same shape, not the same dtype)."""
    if not node.args or node.args[0] is not t_node:
        return False
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _SHAPE_ATTRS
    return node.op == "call_method" and node.target in _SHAPE_METHODS


def timestep_cone(gm: GraphModule, t_node: Node) -> tuple[list[Node], set[Node]]:
    """(cone in graph order, nodes that need only constants) for the timestep input ``t_node``.

    Reads of the timestep input's shape are not in the cone (they are the batch size, which a table
    row cannot carry): what uses them stays in the graph, reading ``t_index``'s shape instead."""
    depends_t: set[Node] = set()
    depends_other: set[Node] = set()
    constant: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if node is t_node:
            depends_t.add(node)
            continue
        if node.op == "placeholder" or _reads_t_shape(node, t_node):
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


def _guard_where(node: Node) -> str:
    guard = node.meta.get("fxpass_guard")
    return guard["where"] if guard else _guard_message(node)


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
    dynamic_batch: bool | None = None,
) -> PassResult:
    """Fold every node computed only from the timestep input and constants.

    Precondition: ``gm`` has a timestep placeholder (named ``timesteps``/``t``/..., or given by
    ``timestep_input``), and its cone is evaluable row-wise (the family's sinusoidal embedding, time
    MLP, ResBlock projections, ``1 + scale``).  ``timesteps`` an int folds to constants (broadcast over
    the batch); a sequence builds a table per cone output and gathers its rows with a new int64 input
    ``t_index`` (index into ``timesteps``).  Guards on the timestep are checked for every entry.
    Every table row is checked against the cone evaluated for its entry alone (rtol ``ROW_RTOL``,
    atol ``ROW_ATOL``·max|row|): a cone that mixes the entries of its batch gets the per-entry rows at a
    static batch of one and is refused otherwise (see ``_tabulate``).  ``dynamic_batch`` (default: what
    ``fxpass.rewrite`` recorded): the batch is free, so a guard on it is refused rather than folded.

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
    batch = t_example.shape[0] if isinstance(t_example, torch.Tensor) and t_example.ndim else 1
    dynamic = dynamic_batch_of(gm, dynamic_batch)
    if dynamic and guards:
        # a guard on the timesteps' batch size (``timesteps.shape[0] == 1``) would be folded away here
        conditions = [g.args[0] for g in guards if isinstance(g.args[0], Node)]
        decided = batch_dependence(gm, example_inputs, nodes=conditions)
        for g in guards:
            if g.args[0] in decided:
                raise FxpassError(f"fold_timesteps: {_guard_where(g)}: a decision on the batch size "
                                  f"({decided[g.args[0]]}); a dynamic-batch model cannot fold it")

    # guards: entry by entry (a guard may read only the first element, as the .item() check does)
    if guards:
        guard_nodes = _closure(guards, cone_set)
        for index, entry in enumerate(entries):
            env = evaluator.run(torch.tensor([entry], dtype=t_dtype), guard_nodes)
            for g in guards:
                if not env[g]:
                    where = f"t_index {index}, timestep {entry}" if table_mode else f"timestep {entry}"
                    raise FxpassError(f"fold_timesteps: {where} breaks {_guard_message(g)}")

    values = _tabulate(evaluator, cone_set, frontier, entries, t_dtype, table_mode,
                       exact_batch=batch == 1 and not dynamic)

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
    for reader in [u for u in t_node.users if _reads_t_shape(u, t_node)]:
        if table_mode:  # t_index has the timesteps' shape
            reader.replace_input_with(t_node, index_node)
            continue
        if dynamic:
            where = source_of(reader) or reader.format_node()
            raise FxpassError(f"fold_timesteps: {where}: reads the timesteps' shape (the batch size), which a "
                              "fixed-timestep model with a dynamic batch no longer has; use table mode")
        shape = static.get(reader, UNKNOWN)
        if shape is UNKNOWN:
            raise FxpassError(f"fold_timesteps: cannot tell {reader.format_node()} without example inputs")
        for user in list(reader.users):
            user.args = torch.fx.node.map_arg(user.args, lambda a: shape if a is reader else a)
            user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: shape if a is reader else a)
        graph.erase_node(reader)
    for reader in [u for u in t_node.users if _is_static_attr(u) and u.args[0] is t_node]:
        # timesteps.dtype / .device in an assert or a guard: the folded input's, known statically
        value = static.get(reader, UNKNOWN)
        if value is UNKNOWN or not isinstance(value, (torch.dtype, torch.device)):
            continue
        for user in list(reader.users):
            user.args = torch.fx.node.map_arg(user.args, lambda a: value if a is reader else a)
            user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: value if a is reader else a)
        graph.erase_node(reader)
    if not t_node.users:
        graph.erase_node(t_node)
    else:
        users = ", ".join(source_of(u) or u.format_node() for u in list(t_node.users)[:2])
        raise FxpassError(f"fold_timesteps: input '{t_node.target}' is still used outside its cone ({users})")

    inputs = dict(gm.meta.get("fxpass_example_inputs") or {})
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


def _tabulate(evaluator: _ConeEvaluator, cone_set: set[Node], frontier, entries, t_dtype, table_mode, *,
              exact_batch: bool):
    """The value of each cone output, one row per entry (table mode) or for the one timestep.

    A row must be what the cone gives for its entry alone (how the eager model sees a sample).  The
    whole schedule is evaluated at once, and every row is checked against a per-entry evaluation
    (``torch.func.vmap`` over single-entry batches; a plain loop where vmap cannot run the cone).
    A cone that mixes entries along the batch (``emb - emb.mean(0)``, ``emb.flip(0)``) fails that
    check: at a static batch of one the per-entry rows are the right table and are used; at a larger
    or dynamic batch the eager model mixes its samples, which no table reproduces: an error.
    """
    value_nodes = _closure(frontier, cone_set)
    if not table_mode:  # one entry: the rows of a batch of it are the same timestep
        env = evaluator.run(torch.tensor(entries, dtype=t_dtype), value_nodes)
        single = [_as_tensor(env[n], n) for n in frontier]
        if not exact_batch:  # the constants are broadcast over the batch: they must not depend on it
            pair_env = evaluator.run(torch.tensor(entries * 2, dtype=t_dtype), value_nodes)
            pair = [_as_tensor(pair_env[n], n) for n in frontier]
            expanded = [row.expand(2, *row.shape[1:]) if row.ndim and row.shape[0] == 1 else row for row in single]
            mismatch = _first_mismatch(frontier, pair, expanded, entries * 2, "batch row")
            if mismatch is not None:
                raise FxpassError(f"fold_timesteps: {mismatch}; the timestep path mixes the entries of its batch, "
                                  "so a constant folded at one timestep is wrong at a batch larger than one")
        return single
    batched_env = evaluator.run(torch.tensor(entries, dtype=t_dtype), value_nodes)
    tables = [_as_tensor(batched_env[n], n) for n in frontier]
    rows = _per_entry(evaluator, value_nodes, frontier, entries, t_dtype, vectorised=True)
    mismatch = _first_mismatch(frontier, tables, rows, entries)
    if mismatch is None:
        return tables
    # the ground truth, entry by entry, every cone node (to name the first one that mixes entries)
    all_rows = _per_entry(evaluator, value_nodes, value_nodes, entries, t_dtype, vectorised=False, strict=False)
    by_node = dict(zip(value_nodes, all_rows))
    rows = [by_node[n] for n in frontier]
    for n, row in zip(frontier, rows):
        if row is None:
            raise FxpassError(
                f"fold_timesteps: {n.format_node()} does not keep the timestep batch dimension; cannot tabulate"
            )
    if _first_mismatch(frontier, tables, rows, entries) is None or exact_batch:
        return rows
    comparable = [(n, batched_env[n], r) for n, r in zip(value_nodes, all_rows)
                  if r is not None and isinstance(batched_env[n], torch.Tensor)]
    mismatch = _first_mismatch([c[0] for c in comparable], [c[1] for c in comparable], [c[2] for c in comparable],
                               entries)
    raise FxpassError(f"fold_timesteps: {mismatch}; the timestep path mixes the entries of its batch, so at a "
                      "batch larger than one (or a dynamic batch) no table of rows reproduces the model")


def _per_entry(evaluator: _ConeEvaluator, value_nodes, frontier, entries, t_dtype, *, vectorised: bool,
               strict: bool = True):
    """Each cone output for each entry alone, stacked: ``vmap`` of the single-entry evaluation, or a loop.
    ``strict=False`` (loop only): ``None`` for an output that is no tensor with a batch dimension of one."""

    def one(t: torch.Tensor):
        env = evaluator.run(t.reshape(1), value_nodes)
        if not strict:
            return tuple(env[n] if isinstance(env[n], torch.Tensor) else None for n in frontier)
        return tuple(_as_tensor(env[n], n) for n in frontier)

    timesteps = torch.tensor(entries, dtype=t_dtype)
    if vectorised:
        try:
            with warnings.catch_warnings():  # vmap's "no batching rule, falling back to a loop" notes
                warnings.simplefilter("ignore")
                outputs = torch.func.vmap(one)(timesteps)
        except Exception:  # an operation vmap cannot batch: the plain loop below
            return _per_entry(evaluator, value_nodes, frontier, entries, t_dtype, vectorised=False)
        stacked = []
        for n, out in zip(frontier, outputs):
            if out.ndim < 2 or out.shape[1] != 1:
                raise FxpassError(
                    f"fold_timesteps: {n.format_node()} does not keep the timestep batch dimension; cannot tabulate"
                )
            stacked.append(out.squeeze(1))
        return stacked
    rows: list[list[torch.Tensor] | None] = [[] for _ in frontier]
    for t in timesteps:
        for k, (n, row) in enumerate(zip(frontier, one(t))):
            if rows[k] is None:
                continue
            if row is None or row.ndim == 0 or row.shape[0] != 1:
                if not strict:
                    rows[k] = None
                    continue
                raise FxpassError(
                    f"fold_timesteps: {n.format_node()} does not keep the timestep batch dimension; cannot tabulate"
                )
            rows[k].append(row)
    return [torch.cat(r, dim=0) if r is not None else None for r in rows]


def _first_mismatch(frontier, tables, rows, entries, label: str = "t_index") -> str | None:
    """None when every table row equals its per-entry row (within ROW_RTOL, ROW_ATOL·scale); else where not."""
    for n, table, row in zip(frontier, tables, rows):
        try:
            _check_rows(n, table, row, entries, "its timestep", label)
        except FxpassError as exc:
            return str(exc).removeprefix("fold_timesteps: ")
    return None


def _check_rows(node: Node, table: torch.Tensor, rows: torch.Tensor, entries, what: str, label: str = "row") -> None:
    where = source_of(node) or node.format_node()
    if table.shape != rows.shape:
        raise FxpassError(f"fold_timesteps: {where}: for a batch of {len(entries)} timesteps it has shape "
                          f"{tuple(table.shape)}, not one row per timestep {tuple(rows.shape)}")
    if not table.is_floating_point():
        bad = (table != rows).reshape(len(table), -1).any(dim=1) if table.ndim else (table != rows).reshape(1)
    else:
        scale = float(rows.abs().max()) if rows.numel() else 0.0
        diff = (table.double() - rows.double()).abs()
        bound = ROW_ATOL * (scale or 1.0) + ROW_RTOL * rows.double().abs()
        bad = ~(diff <= bound)
        bad = bad.reshape(len(table), -1).any(dim=1) if table.ndim else bad.reshape(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        if table.is_floating_point():
            worst = float((table[i].double() - rows[i].double()).abs().max())
            size = float(rows[i].abs().max()) or 1.0
            off = f" (off by {worst / size:.3g} of the row's max)"
        else:
            off = ""
        raise FxpassError(f"fold_timesteps: {where}: {label} {i} (timestep {entries[i]}) of the batched timestep "
                          f"path differs from {what} evaluated alone{off}")


def _as_tensor(value, node: Node) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    raise FxpassError(f"fold_timesteps: cone output {node.name} is a {type(value).__name__}, not a tensor")


class FoldTimesteps(PassBase):
    """``fold_timesteps`` with its settings, for torch.fx's ``PassManager``."""

    def __init__(self, timesteps, *, timestep_input: str | None = None, dynamic_batch: bool | None = None):
        super().__init__()
        self.timesteps = timesteps
        self.timestep_input = timestep_input
        self.dynamic_batch = dynamic_batch

    def call(self, graph_module: GraphModule) -> PassResult:
        return fold_timesteps(graph_module, self.timesteps, timestep_input=self.timestep_input,
                              dynamic_batch=self.dynamic_batch)
