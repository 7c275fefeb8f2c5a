"""A precision plan: which layers stay in float so that int8 keeps the task metric within a budget.

The plan is found by measurement, not by rules.  ``damage`` of a set of layers is how much worse the
predicted noise gets when only those layers are quantized: the largest (eps-MSE ratio to float32 - 1
+ the standard error of the per-sample ratios) over the probe or evaluation steps.  The search:

1. the fully quantized model is evaluated; within the budget, nothing stays in float;
2. group testing: layers grouped by role and size (:func:`fxpass.precision.layers.groups_of`) are
   probed; a group whose damage is at most ``tau`` (a quarter of the budget at first) is quantized
   whole, a larger one is halved until single layers remain, which are recorded as sensitive;
3. the sensitive layers are kept in float, in two orders: most damaging first, and most damage per
   unit of measured cost first (``cost``: each layer's float32 time per call, from ONNX Runtime's
   profiler, :mod:`fxpass.precision.cost`); for each order a binary search finds the shortest prefix
   whose fully quantized rest meets the budget on the evaluation set, and the second is the plan only
   where it is cheaper and no worse on the evaluation set than the first (a set nearer the budget's edge
   held less well on further held-out images of the reference), so the int8 graph stays fast;
4. if even all of them do not suffice, ``tau`` drops fourfold and the quantized groups whose damage
   exceeds it are split again (at most four rounds); then the plan is refused, never returned unmet.

Group testing costs about (sensitive layers) x log2(layers per group) probes instead of one per layer:
on CAMUS (201 layers) a probe is several seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PARSE_ERRORS, FxpassError, parse_reason
from .layers import Layer, groups_of

PLAN_VERSION = 1
ROUNDS = 4


@dataclass
class Measured:
    """A variant scored on the evaluation set: worst (ratio - 1) over the steps, and each step's ratio."""

    damage: float
    t_index: int
    ratios: list[dict]  # {"t_index": i, "ratio": r}


@dataclass
class PrecisionPlan:
    float_layers: list[str]
    budget: float
    fingerprint: str
    layers: int  # quantizable layers in the graph
    measured: dict[str, Any] = field(default_factory=dict)  # the chosen variant on the evaluation set
    sensitivity: list[dict] = field(default_factory=list)  # {"layers", "group", "damage"} per probe
    calibration: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "PrecisionPlan":
        if isinstance(data, dict) and "precision_plan" in data:  # a report of fxpass lower --precision int8
            data = data["precision_plan"]
        if not isinstance(data, dict):
            raise FxpassError(f"{source}: not a precision plan (expected a JSON object)")
        if data.get("version") != PLAN_VERSION:
            raise FxpassError(f"{source}: precision plan version {data.get('version')!r}, expected {PLAN_VERSION}")
        names = data.get("float_layers")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise FxpassError(f"{source}: precision plan float_layers must be a list of layer names")
        try:
            return cls(float_layers=names, budget=float(data["budget"]), fingerprint=str(data["fingerprint"]),
                       layers=int(data["layers"]), measured=dict(data.get("measured") or {}),
                       sensitivity=list(data.get("sensitivity") or []),
                       calibration=dict(data.get("calibration") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise FxpassError(f"{source}: precision plan lacks or garbles {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "PrecisionPlan":
        from ..fileio import check_input_file

        path = check_input_file(path, "a precision plan (JSON)")
        try:
            data = json.loads(Path(path).read_text())
        except PARSE_ERRORS as exc:
            raise FxpassError(f"{path}: not a precision plan (not JSON: {parse_reason(exc)})") from None
        return cls.from_dict(data, str(path))

    def check_applies(self, layers: Sequence[Layer], fingerprint: str, source: str) -> None:
        if fingerprint != self.fingerprint:
            names = {layer.name for layer in layers}
            missing = [n for n in self.float_layers if n not in names]
            why = f"its layers {', '.join(missing[:3])} are not in this graph" if missing else \
                "it was made for a graph with other layers"
            raise FxpassError(f"{source}: precision plan does not fit this model ({why}); make a new one "
                              "by lowering without --precision-plan")

    def describe(self, layers: Sequence[Layer]) -> list[str]:
        """Lines for people: what stays in float (by role) and what the plan measured."""
        by_name = {layer.name: layer for layer in layers}
        kept = [by_name[n].group if n in by_name else n for n in self.float_layers]
        counts: dict[str, int] = {}
        for group in kept:
            counts[group] = counts.get(group, 0) + 1
        head = (f"{self.layers - len(self.float_layers)} of {self.layers} layers int8, "
                f"{len(self.float_layers)} float")
        if counts:
            head += ": " + ", ".join(f"{g} x{c}" if c > 1 else g for g, c in counts.items())
        lines = [head]
        share = self.measured.get("float_cost_share") if self.measured else None
        if share is not None and self.float_layers:
            lines.append(f"float layers: {100 * share:.1f}% of the quantizable layers' measured float32 time")
        if self.measured:
            lines.append(f"eps-MSE ratio to float32 (+ its standard error) at most {1 + self.measured['damage']:.4f} "
                         f"(t_index {self.measured['t_index']}; budget {1 + self.budget:g})")
        return lines


Probe = Callable[[list[str]], float]
Evaluate = Callable[[list[str]], Measured]


def search(layers: Sequence[Layer], probe: Probe, evaluate: Evaluate, budget: float,
           *, progress: Callable[[str], None] | None = None,
           cost: Mapping[str, float] | None = None) -> tuple[list[str], list[dict], Measured]:
    """(float layers, sensitivity records, measured) of the cheapest float set found within ``budget``
    (cheapest by ``cost``, layer name -> seconds per call; by count without it)."""
    say = progress or (lambda _msg: None)
    measured = evaluate([])
    say(f"all {len(layers)} layers int8: worst eps-MSE ratio {1 + measured.damage:.4f}")
    if measured.damage <= budget:
        return [], [], measured
    group_of = {layer.name: layer.group for layer in layers}
    records: list[dict] = []
    sensitive: dict[str, float] = {}
    safe: list[tuple[list[str], float]] = []
    pending = groups_of(list(layers))
    tau = budget / 4
    for _ in range(ROUNDS):
        while pending:
            names = pending.pop(0)
            damage = probe(names)
            records.append({"layers": names, "group": group_of[names[0]], "damage": damage})
            say(f"probe {group_of[names[0]]} ({len(names)} layer{'s' if len(names) > 1 else ''}): "
                f"damage {damage:.4g}")
            if damage <= tau:
                safe.append((names, damage))
            elif len(names) == 1:
                sensitive[names[0]] = damage
            else:
                half = len(names) // 2
                pending[:0] = [names[:half], names[half:]]
        found = _cheapest(sensitive, evaluate, budget, say, cost)
        if found is not None:
            return found[0], records, found[1]
        tau /= 4
        pending = [names for names, damage in safe if damage > tau]
        safe = [(names, damage) for names, damage in safe if damage <= tau]
        if not pending:
            break
    raise FxpassError(f"int8: no precision plan keeps the eps-MSE ratio within {1 + budget:g} (kept "
                      f"{len(sensitive)} of {len(layers)} layers in float); raise --error-budget or use "
                      "--precision fp16 or bf16", exit_code=1)


def _cheapest(sensitive: dict[str, float], evaluate: Evaluate, budget: float, say: Callable[[str], None],
              cost: Mapping[str, float] | None) -> tuple[list[str], Measured] | None:
    """The cheaper of the shortest prefixes of the damage order and (with ``cost``) the damage-per-cost order."""
    by_damage = sorted(sensitive, key=lambda n: -sensitive[n])
    found = _shortest_prefix(by_damage, evaluate, budget, say)
    if found is None or not cost:
        return found
    price = lambda names: sum(cost.get(n, 0.0) for n in names)  # noqa: E731
    by_value = sorted(sensitive, key=lambda n: -sensitive[n] / max(cost.get(n, 0.0), 1e-9))
    if by_value[:len(found[0])] == found[0]:
        return found
    other = _shortest_prefix(by_value, evaluate, budget, say)
    # cheaper, and no worse on the evaluation set: a set nearer the budget's edge holds less well on new images
    if other is not None and price(other[0]) < price(found[0]) and other[1].damage <= found[1].damage + 1e-9:
        say(f"by damage per measured cost: {len(other[0])} layers in float, {price(other[0]) * 1e3:.2f} ms "
            f"instead of {price(found[0]) * 1e3:.2f} ms")
        return other
    return found


def _shortest_prefix(ranked: list[str], evaluate: Evaluate, budget: float,
                     say: Callable[[str], None]) -> tuple[list[str], Measured] | None:
    if not ranked:
        return None
    best = evaluate(ranked)
    say(f"{len(ranked)} sensitive layers in float: worst eps-MSE ratio {1 + best.damage:.4f}")
    if best.damage > budget:
        return None
    found = (ranked, best)
    lo, hi = 1, len(ranked)
    while lo < hi:
        mid = (lo + hi) // 2
        measured = evaluate(ranked[:mid])
        say(f"{mid} in float: worst eps-MSE ratio {1 + measured.damage:.4f}")
        if measured.damage <= budget:
            hi, found = mid, (ranked[:mid], measured)
        else:
            lo = mid + 1
    return found
