"""The rule driver the surgery passes share: candidate nodes → match or ``Skip(reason)`` → rewrite.

In the spirit of onnxscript's rewriter, a pass is a rule: the op types it starts from, a matcher
that returns either what it found (any object) or ``Skip("short reason")``, and a rewrite of a
match.  ``apply_rule`` walks the candidates, counts the rewrites and tallies the skip reasons;
``collect_skips()`` (what ``surgery.simplify`` wraps each pass in) receives the tallies, so the
pass signature stays ``name(graph, **options) -> (graph, count)`` and nothing is stored on the
pass function or the graph.  The collector is a ``contextvars.ContextVar``: each thread (and
asyncio task) collects its own.  Outside ``collect_skips`` the reasons are dropped.

Reasons are counted, so keep them short, human and few: name what tells cases apart (a size
against its threshold, an opset, an equation), never a node or tensor name.

    count = apply_rule(graph, "GroupNormalization", match=lambda n: _match(graph, n), rewrite=_rewrite,
                       min_opset=21).count
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx_graphsurgeon as gs

from ._graph import is_default_domain, opset_of


@dataclass(frozen=True)
class Skip:
    """Why a candidate was not rewritten (a short human reason, counted in the report)."""

    reason: str


@dataclass
class RuleResult:
    """What one ``apply_rule`` call did: the rewrites made and the reasons candidates were skipped."""

    count: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)


_SINK: contextvars.ContextVar[collections.Counter | None] = contextvars.ContextVar("surgery_skips", default=None)


@contextlib.contextmanager
def collect_skips() -> Iterator[collections.Counter]:
    """Collect the skip reasons the rules record inside the block: ``{reason: count}``."""
    skips: collections.Counter = collections.Counter()
    token = _SINK.set(skips)
    try:
        yield skips
    finally:
        _SINK.reset(token)


def record_skips(skips: Mapping[str, int]) -> None:
    """Add ``skips`` to the enclosing ``collect_skips`` (no-op outside one)."""
    sink = _SINK.get()
    if sink is not None:
        sink.update(skips)


def candidates(graph: gs.Graph, ops: str | Iterable[str]) -> list[gs.Node]:
    """Default-domain nodes of the given op types, in graph order (a snapshot: rewrites may add nodes)."""
    wanted = {ops} if isinstance(ops, str) else set(ops)
    return [node for node in graph.nodes if node.op in wanted and is_default_domain(node)]


def apply_rule(
    graph: gs.Graph,
    ops: str | Iterable[str],
    match: Callable[[gs.Node], Any],
    rewrite: Callable[[Any], Skip | None],
    *,
    min_opset: int = 0,
    record: bool = True,
) -> RuleResult:
    """Match every candidate of ``ops`` and rewrite the matches; count rewrites, tally skip reasons.

    ``match(node)`` returns a match or a ``Skip``; ``rewrite(match)`` changes the graph and
    returns None, or a ``Skip`` when it finds it cannot (then it must leave the graph as it was).
    Below ``min_opset`` every candidate is skipped with the opset as the reason.  Nodes a rewrite
    detached earlier in the same walk (no inputs and no outputs left) are passed over silently.
    ``record=False`` keeps the reasons out of ``collect_skips`` (for a pass that sweeps several
    times and records only its last sweep's reasons with ``record_skips``).
    """
    result = RuleResult()
    nodes = candidates(graph, ops)
    opset = opset_of(graph)
    if opset < min_opset:
        if nodes:
            result.skipped[f"opset {opset} < {min_opset}"] = len(nodes)
    else:
        for node in nodes:
            if not node.inputs and not node.outputs:
                continue
            found = match(node)
            if not isinstance(found, Skip):
                found = rewrite(found)
            if isinstance(found, Skip):
                result.skipped[found.reason] += 1
            else:
                result.count += 1
    if record:
        record_skips(result.skipped)
    return result
