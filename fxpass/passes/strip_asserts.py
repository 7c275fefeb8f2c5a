"""strip_asserts: remove asserts and guards whose facts hold at the specialised shapes."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from ..errors import FxpassError
from ._util import (
    UNKNOWN,
    batch_dependence,
    constant_value,
    dynamic_batch_of,
    finish,
    is_assert,
    record,
    remember_batch_dependence,
    require_graph_module,
    static_values,
)

#: why a guard stayed (``node.meta["fxpass_kept"]``), as ``describe_leftover_guards`` words it
KEPT_DATA = "data"
KEPT_BATCH = "batch"
KEPT_UNKNOWN = "unknown"

_GUARD_PREFIXES = ("fxpass guard: ", "fxpass assert: ")


def strip_asserts(gm: GraphModule, example_inputs=None, *, dynamic_batch: bool | None = None) -> PassResult:
    """Remove ``torch._assert`` nodes (asserts and capture's guards) that hold at the captured shapes.

    Precondition: example inputs are known (recorded by ``capture`` or given).  Each condition is
    evaluated with fake tensors of those shapes: true → the node goes, with the shape arithmetic
    only it used; false → an error (never a silent removal).  A condition that reads input data stays,
    whatever its polarity or spelling (``not``, ``.item()`` comparisons, ``bool()``, ``torch.any``):
    the value capture recorded for it is the example's, no fact.  With ``dynamic_batch`` (default:
    what ``fxpass.rewrite`` recorded) a condition that depends on the batch size stays too
    (``x.shape[0] == 1``, ``int(x.numel())``, a loop over ``range(x.shape[0])``, ``len(x)``), while
    facts true at every batch (``y.shape == (x.shape[0],)``) still go.  Each kept node says why in
    ``node.meta["fxpass_kept"]``; ``check_no_guards_left`` turns them into the user's error.

    Before::                                        After::

        s = qkv.shape; w = s[1]                         qkv ─ reshape ─ ...
        _assert(w % 12 == 0, "assert ...")
        qkv ─ reshape ─ ...
    """
    gm = require_graph_module(gm, "strip_asserts")
    asserts = [n for n in gm.graph.nodes if is_assert(n)]
    if not asserts:
        record(gm, "strip_asserts", 0)
        return PassResult(gm, False)
    values = static_values(gm, example_inputs)
    batch_dynamic = dynamic_batch_of(gm, dynamic_batch)
    batch = batch_dependence(gm, example_inputs) if batch_dynamic else {}
    removed = 0
    for node in asserts:
        kept = _why_kept(gm, node, values, batch, batch_dynamic, example_inputs)
        if kept is not None:
            node.meta["fxpass_kept"] = kept
            continue
        gm.graph.erase_node(node)
        removed += 1
    record(gm, "strip_asserts", removed)
    result = finish(gm, removed)
    if batch_dynamic:  # only nodes were erased: the analysis still holds for materialize_attention_scales
        remember_batch_dependence(gm, batch, example_inputs)
    return result


def _why_kept(gm, node: Node, values, batch: dict, batch_dynamic: bool, example_inputs) -> str | None:
    """None when ``node``'s condition is a fact (the node can go); else why it must stay.  Raises
    when the condition is false at the captured shapes."""
    condition = node.args[0]
    if not isinstance(condition, Node):
        value = condition
    elif condition in values.reads_data:
        return KEPT_DATA
    else:
        value = values.get(condition, UNKNOWN)
        if isinstance(value, torch.Tensor):  # built from constants and static shapes only: evaluate it
            if batch_dynamic and _reads_inputs(condition):
                return KEPT_BATCH  # a tensor made from shapes: cannot tell for which batch sizes it holds
            try:
                value = constant_value(gm, condition, example_inputs)
            except Exception:
                value = UNKNOWN
            if isinstance(value, torch.Tensor):
                value = bool(value) if value.numel() == 1 else UNKNOWN
    if value is UNKNOWN:
        return KEPT_UNKNOWN
    if not bool(value):
        raise FxpassError(f"strip_asserts: false at the captured shapes: {_message(node)}")
    if isinstance(condition, Node) and condition in batch:
        node.meta["fxpass_batch"] = batch[condition]
        return KEPT_BATCH
    return None


def _reads_inputs(node: Node) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n.op == "placeholder":
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


def _message(node: Node) -> str:
    return str(node.args[1]) if len(node.args) > 1 else node.format_node()


def _where(node: Node) -> str:
    guard = node.meta.get("fxpass_guard")
    if guard:
        return guard["where"]
    text = _message(node)
    for prefix in _GUARD_PREFIXES:
        if text.startswith(prefix):
            return text[len(prefix):]
    return f"graph node {node.name} ({text})"


def describe_guard(node: Node) -> str:
    """One line for a guard or assert left in the graph: the user's file:line and source, what capture
    decided there and why it cannot be kept as a fact."""
    where = _where(node)
    guard = node.meta.get("fxpass_guard")
    kept = node.meta.get("fxpass_kept")
    if guard:
        decided = guard["decision"]
        if kept == KEPT_BATCH:
            return (f"{where}: decided on the batch size ({decided}); with a dynamic batch the lowered model "
                    f"would decide the same way at every batch size")
        if kept == KEPT_DATA:
            return (f"{where}: decided on input data ({decided}); the lowered model would decide the same way "
                    f"for every input")
        return f"{where}: decided on the example ({decided}) and not provable for every input"
    if kept == KEPT_BATCH:
        return f"{where}: an assert on the batch size that a dynamic-batch model cannot check"
    if kept == KEPT_DATA:
        return f"{where}: an assert on input data that the lowered model cannot check"
    return f"{where}: an assert that cannot be proved at the captured shapes"


def describe_leftover_guards(gm: GraphModule) -> str | None:
    """``None`` when no assert or guard is left in ``gm``; else one line naming the first (the user's
    file:line, source, and the decision it would freeze) and how many more there are."""
    left = [n for n in gm.graph.nodes if is_assert(n)]
    if not left:
        return None
    text = describe_guard(left[0])
    others = sorted({_where(n).split(": `")[0] for n in left[1:]} - {_where(left[0]).split(": `")[0]})
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        text += f" (also {shown})"
    return text


def check_no_guards_left(gm: GraphModule) -> None:
    """Raise :class:`FxpassError` (one line, the user's source line first) when a guard or assert is
    still in ``gm`` after the passes: lowering it would freeze a decision made on the example."""
    text = describe_leftover_guards(gm)
    if text is not None:
        raise FxpassError(f"lower: refused: {text}")
