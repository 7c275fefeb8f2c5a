"""The surgery pass table: what ``simplify`` runs, in which order, with which options, and the rules.

``PASSES`` is data: one ``Pass`` per run (fold_constants runs first and again last), each with its
function, its default options (the function's keyword-only parameters) and, where it applies, the
settings it needs (``when``: expand_group_norm only with ``group_norm="auto"``).  ``CONSTRAINTS``
are the ordering rules as code, in the spirit of torch.fx's ``this_before_that_pass_constraint``:
``Constraint("fuse_group_norm", before="fold_norm_scale_shift")`` means every run of
fold_norm_scale_shift comes after a run of fuse_group_norm (a rule whose passes are not both in
the list does not apply).  ``plan`` validates options, picks the enabled passes and checks their
order; ``check_order`` raises a ``ValueError`` naming the rule a list breaks.  ``print(describe())``
shows the table.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import onnx_graphsurgeon as gs

from ._rules import collect_skips
from .expand_group_norm import expand_group_norm
from .fold_constants import fold_constants
from .fold_norm_scale_shift import fold_norm_scale_shift
from .fuse_group_norm import fuse_group_norm
from .merge_table_gathers import merge_table_gathers
from .remove_cast_pairs import remove_cast_pairs
from .remove_identity import remove_identity
from .rewrite_einsum_attention import rewrite_einsum_attention
from .rewrite_upsample_conv import rewrite_upsample_conv

GraphPass = Callable[..., tuple[gs.Graph, int]]


@dataclass(frozen=True)
class PassRun:
    """One pass run: the graph after it, its rewrite count and ``{skip reason: candidates}``."""

    graph: gs.Graph
    count: int
    skipped: dict[str, int]


@dataclass(frozen=True, eq=False)
class Pass:
    """A table entry: ``fn(graph, **options) -> (graph, count)`` with its default ``options``.

    ``when`` maps a ``simplify`` setting to the value the pass needs (empty: always enabled).
    """

    name: str
    fn: GraphPass
    options: Mapping[str, Any] = field(default_factory=dict)
    when: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, fn: GraphPass, *, when: Mapping[str, Any] | None = None) -> Pass:
        """The entry for ``fn``: named after it, its keyword-only parameters as the default options."""
        params = inspect.signature(fn).parameters.values()
        options = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        return cls(fn.__name__, fn, MappingProxyType(options), MappingProxyType(dict(when or {})))

    def enabled(self, settings: Mapping[str, Any]) -> bool:
        return all(settings.get(key) == value for key, value in self.when.items())

    def run(self, graph: gs.Graph, **options: Any) -> PassRun:
        """Run the pass with its defaults updated by ``options``; collect its skip reasons."""
        with collect_skips() as skipped:
            graph, count = self.fn(graph, **{**self.options, **options})
        return PassRun(graph, int(count), dict(skipped.most_common()))

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        when = " and ".join(f"{k}={v!r}" for k, v in self.when.items())
        return f"{self.name}({args})" + (f"  when {when}" if when else "")


@dataclass(frozen=True)
class Constraint:
    """``this`` must run before ``before``: every run of ``before`` comes after some run of ``this``."""

    this: str
    before: str
    why: str = ""

    def broken_by(self, names: list[str]) -> str | None:
        """Why ``names`` (a pass order) breaks this rule, or None when it keeps it (or it does not apply)."""
        if self.this not in names or self.before not in names:
            return None
        first_this, first_that = names.index(self.this), names.index(self.before)
        if first_this < first_that:
            return None
        return (f"pass order breaks rule '{self}' ({self.why}): {self.before} runs at position {first_that + 1}, "
                f"before the first {self.this} at position {first_this + 1}")

    def __str__(self) -> str:
        return f"{self.this} before {self.before}"


# the order simplify runs the graph passes in
PASSES: tuple[Pass, ...] = (
    Pass.of(fold_constants),
    Pass.of(remove_identity),
    Pass.of(remove_cast_pairs),
    Pass.of(rewrite_einsum_attention),
    Pass.of(fuse_group_norm),
    Pass.of(fold_norm_scale_shift),
    Pass.of(expand_group_norm, when={"group_norm": "auto"}),
    Pass.of(rewrite_upsample_conv),
    Pass.of(merge_table_gathers),
    Pass.of(fold_constants),
)

CONSTRAINTS: tuple[Constraint, ...] = (
    Constraint("fold_constants", before="fuse_group_norm",
               why="the GroupNorm pattern's Reshape targets must be constants; shapes computed from "
                   "static Shape nodes become constants there"),
    Constraint("fold_constants", before="rewrite_upsample_conv",
               why="the Resize scales/sizes and Conv weights must be constants"),
    Constraint("fuse_group_norm", before="fold_norm_scale_shift",
               why="fold_norm_scale_shift folds into the GroupNormalization nodes fuse_group_norm makes"),
    Constraint("fuse_group_norm", before="expand_group_norm",
               why="expand_group_norm rewrites the GroupNormalization nodes fuse_group_norm makes"),
    Constraint("fold_norm_scale_shift", before="expand_group_norm",
               why="expand_group_norm replaces the norms the scale-shift is folded into and carries "
                   "their gathered scale/bias rows over"),
    Constraint("fold_norm_scale_shift", before="merge_table_gathers",
               why="fold_norm_scale_shift reads Gather(table, t) operands, which merge_table_gathers "
                   "turns into Split outputs"),
    Constraint("expand_group_norm", before="merge_table_gathers",
               why="expand_group_norm reads Gather(table, t) scale/bias rows and makes the [T, C, 1, ..] "
                   "table gathers merge_table_gathers merges"),
)


def _names(passes: Iterable[str | Pass]) -> list[str]:
    return [p.name if isinstance(p, Pass) else str(p) for p in passes]


def check_order(passes: Iterable[str | Pass], constraints: Iterable[Constraint] = CONSTRAINTS) -> None:
    """Raise ``ValueError`` naming the first rule of ``constraints`` the pass order ``passes`` breaks."""
    names = _names(passes)
    for rule in constraints:
        broken = rule.broken_by(names)
        if broken is not None:
            raise ValueError(broken)


def check_options(options: Mapping[str, Mapping[str, Any]] | None,
                  table: Iterable[Pass] = PASSES) -> dict[str, dict[str, Any]]:
    """``options`` ({pass name: {option: value}}) checked against ``table``; unknown names raise ValueError."""
    if not options:
        return {}
    known = {}
    for entry in table:
        known.setdefault(entry.name, entry)
    unknown = [name for name in options if name not in known]
    if unknown:
        raise ValueError(f"unknown pass name(s) in options: {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(known)})")
    checked = {}
    for name, given in options.items():
        if not isinstance(given, Mapping):
            raise ValueError(f"options[{name!r}] must be a dict of option names to values, got {type(given).__name__}")
        bad = [key for key in given if key not in known[name].options]
        if bad:
            takes = ", ".join(known[name].options) or "none"
            raise ValueError(f"unknown option(s) for {name}: {', '.join(map(repr, bad))} (it takes: {takes})")
        checked[name] = dict(given)
    return checked


def plan(settings: Mapping[str, Any], options: Mapping[str, Mapping[str, Any]] | None = None,
         table: Iterable[Pass] | None = None,
         constraints: Iterable[Constraint] | None = None) -> list[tuple[Pass, dict[str, Any]]]:
    """The enabled entries of ``table`` (default ``PASSES``) with their option overrides, order checked.

    Options given for a pass that ``settings`` disable (expand_group_norm with ``group_norm="keep"``)
    are accepted and unused.
    """
    table = tuple(PASSES if table is None else table)
    checked = check_options(options, table)
    chosen = [(entry, checked.get(entry.name, {})) for entry in table if entry.enabled(settings)]
    check_order([entry for entry, _ in chosen], CONSTRAINTS if constraints is None else constraints)
    return chosen


def describe(table: Iterable[Pass] = PASSES, constraints: Iterable[Constraint] = CONSTRAINTS) -> str:
    """The table and its rules as text, one line each."""
    lines = [f"{i:2d}. {entry}" for i, entry in enumerate(table, 1)]
    lines.append("rules:")
    lines += [f"    {rule}: {rule.why}" for rule in constraints]
    return "\n".join(lines)
