"""fold_timesteps: fold the timestep cone to constants, or to tables gathered by ``t_index``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import FxpassError
from ._timestep_cone import ConeEvaluator, cone_closure, is_static_attr, reads_t_shape, timestep_cone
from ._timestep_tables import tabulate
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


def _find_timestep_input(gm: GraphModule, name: str | None) -> Node | None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if name is not None:
        return next((n for n in placeholders if n.target == name), None)
    for candidate in TIMESTEP_NAMES:
        for n in placeholders:
            if n.target == candidate:
                return n
    return None


def _guard_message(node: Node) -> str:
    return str(node.args[1]) if len(node.args) > 1 else node.format_node()


def _guard_where(node: Node) -> str:
    guard = node.meta.get("fxpass_guard")
    return guard["where"] if guard else _guard_message(node)


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
    static batch of one and is refused otherwise (see ``_timestep_tables.tabulate``).  ``dynamic_batch``
    (default: what ``fxpass.rewrite`` recorded): the batch is free, so a guard on it is refused rather
    than folded.

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
    dynamic = dynamic_batch_of(gm, dynamic_batch)
    cone, constant = timestep_cone(gm, t_node, static_shapes=not dynamic)
    cone_set = set(cone)
    guards = [n for n in cone if is_assert(n)]
    frontier = [
        n for n in cone if not is_assert(n) and any(u not in cone_set for u in n.users)
    ]
    t_example = static.get(t_node, UNKNOWN)
    t_dtype = _timestep_dtype(t_example, entries)

    evaluator = ConeEvaluator(gm, t_node, cone, constant, static)
    batch = t_example.shape[0] if isinstance(t_example, torch.Tensor) and t_example.ndim else 1
    if dynamic and guards:
        _refuse_batch_guards(gm, example_inputs, guards)
    if guards:
        _check_guards(evaluator, guards, cone_set, entries, t_dtype, table_mode)

    values = tabulate(evaluator, cone_set, frontier, entries, t_dtype, table_mode,
                      exact_batch=batch == 1 and not dynamic)
    if table_mode and _read_as_values(t_node, cone_set):
        # the timesteps themselves meet another input outside the cone (diffusers' ``timesteps *
        # torch.ones(sample.shape[0])`` at a dynamic batch): they become a table of their own, gathered by t_index
        frontier.append(t_node)
        values.append(torch.tensor(entries, dtype=t_dtype))

    index_node = None
    if table_mode:
        with gm.graph.inserting_before(t_node):
            index_node = gm.graph.placeholder(INDEX_INPUT, type_expr=torch.Tensor)
    _replace_frontier(gm, frontier, values, cone_set, index_node)
    _erase_cone(gm.graph, cone)
    _remove_timestep_input(gm.graph, t_node, index_node, static, dynamic)
    _record_folded(gm, t_node, entries, batch, table_mode)
    count = len(frontier)
    record(gm, "fold_timesteps", count)
    return finish(gm, count or 1)


def _read_as_values(t_node: Node, cone_set: set[Node]) -> bool:
    """Whether a node outside the cone reads the timesteps' values (not their shape, dtype or device)."""
    return any(u not in cone_set and not reads_t_shape(u, t_node) and not is_static_attr(u) and not is_assert(u)
               for u in t_node.users)


def _timestep_dtype(t_example, entries) -> torch.dtype:
    """The dtype the cone is evaluated at: the example timesteps' (int64 without one), float32 where an
    integer input is folded at fractional entries."""
    t_dtype = t_example.dtype if isinstance(t_example, torch.Tensor) else torch.int64
    if any(isinstance(e, float) and not float(e).is_integer() for e in entries) and not t_dtype.is_floating_point:
        t_dtype = torch.float32
    return t_dtype


def _refuse_batch_guards(gm: GraphModule, example_inputs, guards: list[Node]) -> None:
    """A guard on the timesteps' batch size (``timesteps.shape[0] == 1``) would be folded away here:
    refused, for a dynamic-batch model."""
    conditions = [g.args[0] for g in guards if isinstance(g.args[0], Node)]
    decided = batch_dependence(gm, example_inputs, nodes=conditions)
    for g in guards:
        if g.args[0] in decided:
            raise FxpassError(f"fold_timesteps: {_guard_where(g)}: a decision on the batch size "
                              f"({decided[g.args[0]]}); a dynamic-batch model cannot fold it")


def _check_guards(evaluator: ConeEvaluator, guards: list[Node], cone_set: set[Node], entries, t_dtype,
                  table_mode: bool) -> None:
    """Every guard in the cone holds for every entry, checked entry by entry (a guard may read only the
    first element, as the .item() check does)."""
    guard_nodes = cone_closure(guards, cone_set)
    for index, entry in enumerate(entries):
        env = evaluator.run(torch.tensor([entry], dtype=t_dtype), guard_nodes)
        for g in guards:
            if not env[g]:
                where = f"t_index {index}, timestep {entry}" if table_mode else f"timestep {entry}"
                raise FxpassError(f"fold_timesteps: {where} breaks {_guard_message(g)}")


def _replace_frontier(gm: GraphModule, frontier: list[Node], values, cone_set: set[Node],
                      index_node: Node | None) -> None:
    """Uses of each cone output outside the cone read its folded value, a new buffer, instead (in table
    mode its rows gathered by ``index_node``, the ``t_index`` input)."""
    graph = gm.graph
    table_mode = index_node is not None
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


def _erase_cone(graph: torch.fx.Graph, cone: list[Node]) -> None:
    """The cone nodes nothing uses any more, and what only they read."""
    for node in reversed(cone):
        if not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()  # e.g. timesteps.device, read by the folded arange


def _remove_timestep_input(graph: torch.fx.Graph, t_node: Node, index_node: Node | None, static,
                           dynamic: bool) -> None:
    """The timestep input goes, once what still reads it reads something else: its shape ``t_index``'s
    (``index_node``, table mode) or the static one, its dtype and device their static values."""
    for reader in [u for u in t_node.users if reads_t_shape(u, t_node)]:
        if index_node is not None:  # t_index has the timesteps' shape
            reader.replace_input_with(t_node, index_node)
            continue
        if dynamic:
            where = source_of(reader) or reader.format_node()
            raise FxpassError(f"fold_timesteps: {where}: reads the timesteps' shape (the batch size), which a "
                              "fixed-timestep model with a dynamic batch no longer has; use table mode")
        shape = static.get(reader, UNKNOWN)
        if shape is UNKNOWN:
            raise FxpassError(f"fold_timesteps: cannot tell {reader.format_node()} without example inputs")
        _inline_value(graph, reader, shape)
    for reader in [u for u in t_node.users if is_static_attr(u) and u.args[0] is t_node]:
        # timesteps.dtype / .device in an assert or a guard: the folded input's, known statically
        value = static.get(reader, UNKNOWN)
        if value is UNKNOWN or not isinstance(value, (torch.dtype, torch.device)):
            continue
        _inline_value(graph, reader, value)
    if not t_node.users:
        graph.erase_node(t_node)
    else:
        users = ", ".join(source_of(u) or u.format_node() for u in list(t_node.users)[:2])
        raise FxpassError(f"fold_timesteps: input '{t_node.target}' is still used outside its cone ({users})")


def _inline_value(graph: torch.fx.Graph, reader: Node, value) -> None:
    """``reader``'s users take ``value`` itself in its place; ``reader`` goes."""
    for user in list(reader.users):
        user.args = torch.fx.node.map_arg(user.args, lambda a: value if a is reader else a)
        user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: value if a is reader else a)
    graph.erase_node(reader)


def _record_folded(gm: GraphModule, t_node: Node, entries: list, batch: int, table_mode: bool) -> None:
    """``gm.meta``: the example inputs without the timesteps (with ``t_index`` in table mode), and the
    timesteps folded and how."""
    inputs = dict(gm.meta.get("fxpass_example_inputs") or {})
    inputs.pop(t_node.target, None)
    if table_mode:
        ordered = {}
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                ordered[n.target] = torch.zeros(batch, dtype=torch.int64) if n.target == INDEX_INPUT else inputs.get(n.target)
        inputs = {k: v for k, v in ordered.items() if v is not None}
    gm.meta["fxpass_example_inputs"] = inputs
    gm.meta["fxpass_timesteps"] = entries if table_mode else entries[0]
    gm.meta["fxpass_mode"] = "table" if table_mode else "fixed"


def _position(node: Node) -> int:
    for i, n in enumerate(node.graph.nodes):
        if n is node:
            return i
    return -1


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
