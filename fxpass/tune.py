"""Preset files, and the search that writes one (``fxpass evaluate --tune``), torch-free.

A preset file is JSON: ``{"fxpass_preset": 1, "name": ..., "settings": {"sampler": ..., knob: value, ...}}``
plus records that are never read back (the budget, the model, the search, the held-apart measurement).
:func:`read_preset` is strict: a regular file of at most :data:`MAX_PRESET_BYTES`, UTF-8 JSON without
duplicate keys or NaN, the marker, no unknown key, every knob of the right type and checked as its flag
is (:class:`fxpass.samplers.Settings`, ``check_knobs``); each refusal is one line naming the file and the
key.  Nothing in a preset file is executed.

:func:`tune` searches DDNM's and DiffPIR's knobs within a budget of model calls per image on the user's images:

- the images (sorted by name) are split alternately: even positions tune, odd positions are held apart;
- the candidates (:func:`candidates`) are a grid of ``start`` x the method (DDNM at
  eta 0.85 and 1, DiffPIR started from the known pixels) x time travel (x ``cache_interval``
  on a ``--deep-cache`` model), each with as many ``steps`` as the budget allows; the budget counts model
  calls, or on a deep-cache model full calls + shallow calls x the measured shallow/full latency ratio
  (:func:`shallow_ratio`); candidates far below the budget are dropped, and a larger grid is cut to a
  subset in which every level of every knob appears about equally often;
- successive halving: every candidate on the first third of the tuning images, the best third of them on
  all the tuning images (the cases already run are kept: each case keeps its seed), ranked by mean PSNR,
  ties by SSIM;
- the winner is then measured once on the held-apart images, which took no part in choosing it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import FxpassError
from .samplers import INITS, KNOBS, SAMPLERS, Settings

#: the marker and version of a preset file
MARKER, VERSION = "fxpass_preset", 1
#: the largest preset file read (a file written by --tune is a few kilobytes)
MAX_PRESET_BYTES = 1_000_000
MAX_NAME = 255
#: a preset file's keys: only "name" and "settings" are read; the others are records
TOP_KEYS = (MARKER, "name", "settings", "budget", "model", "tuning", "measured", "note")
#: the keys of "settings": the sampler, the knobs (Settings' field names), start (a fraction of the table)
SETTINGS_KEYS = ("sampler", "start", "t_T", "steps", "eta", "jump_length", "jump_n_sample", "travel_length",
                 "travel_repeat", "travel_below", "cache_interval", "zeta", "init")
NOTE = "chosen on the tuning images, measured once on the held-apart ones"

#: the search grid: the method (DDNM at two etas; DiffPIR from the known pixels), where it starts (a fraction
#: of the table), time travel (length, repeat; (1, 1) is none), the cache intervals tried on a --deep-cache model
METHODS = ({"sampler": "ddnm", "eta": 0.85}, {"sampler": "ddnm", "eta": 1.0}, {"sampler": "diffpir", "init": "fill"})
STARTS = (0.4, 0.5, 0.6, 0.7, 0.8, 1.0)
TRAVELS = ((1, 1), *((length, repeat) for length in (2, 3, 4, 5) for repeat in (2, 3, 4)))
CACHE_INTERVALS = (2, 3)
#: the most candidates searched, the fewest levels a candidate walks
MAX_CANDIDATES = 36
MIN_STEPS = 2
#: latency samples per graph for the shallow/full ratio
RATIO_CALLS = 5

Progress = Callable[[int, int], None]


# ---- reading a preset file ----------------------------------------------------------------------------
def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise ValueError(f"the key {_shown(key)} appears twice")
    return dict(pairs)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _load_json(path: str | Path):
    from .fileio import check_input_file

    path = check_input_file(path, "a preset file (JSON)")
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_PRESET_BYTES + 1)
    except OSError as exc:
        raise FxpassError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_PRESET_BYTES:
        raise FxpassError(f"{path}: larger than {MAX_PRESET_BYTES:,} bytes; not a preset file")
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise FxpassError(f"{path}: not a preset file (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise FxpassError(f"{path}: not a preset file (not JSON: {exc.msg} at line {exc.lineno} column "
                          f"{exc.colno})") from None
    except RecursionError:
        raise FxpassError(f"{path}: not a preset file (JSON nested too deeply)") from None
    except ValueError as exc:
        raise FxpassError(f"{path}: not a preset file ({exc})") from None


def check_name(path, name) -> str:
    """``name`` when it can name a preset (printable text of 1 to 255 characters); FxpassError otherwise."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable():
        raise FxpassError(f'{path}: "name" is {_shown(name)}, expected printable text of 1 to {MAX_NAME} characters')
    return name


def _knob(path, key: str, value):
    """A knob's value as its flag takes it: eta a number in [0, 1], start in (0, 1], the others positive ints."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in ("eta", "zeta"):
        if not number or not 0.0 <= value <= 1.0:
            raise FxpassError(f'{path}: "settings.{key}" is {_shown(value)}, expected a number in [0, 1]')
        return float(value)
    if key == "init":
        if value not in INITS:
            raise FxpassError(f'{path}: "settings.init" is {_shown(value)}, expected one of {", ".join(INITS)}')
        return value
    if key == "start":
        if not number or not 0.0 < value <= 1.0:
            raise FxpassError(f'{path}: "settings.start" is {_shown(value)}, expected a fraction of the table in '
                              "(0, 1]")
        return float(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FxpassError(f'{path}: "settings.{key}" is {_shown(value)}, expected a positive integer')
    return value


def settings_of(path, entry, name: str) -> Settings:
    """The ``"settings"`` object of a preset file as Settings named ``name``; FxpassError naming the key."""
    if not isinstance(entry, dict):
        raise FxpassError(f'{path}: "settings" is {_shown(entry)}, expected a JSON object')
    for key in entry:
        if key not in SETTINGS_KEYS:
            raise FxpassError(f'{path}: unknown key {_shown(key)} in "settings"; choose from '
                              f'{", ".join(SETTINGS_KEYS)}')
    sampler = entry.get("sampler")
    if sampler not in SAMPLERS:
        raise FxpassError(f'{path}: "settings.sampler" is {_shown(sampler)}, expected one of {", ".join(SAMPLERS)}')
    values = {key: _knob(path, key, value) for key, value in entry.items() if key != "sampler"}
    for key in values:
        if key != "start" and key not in KNOBS[sampler]:
            readers = " or ".join(s for s in SAMPLERS if key in KNOBS[s])
            raise FxpassError(f'{path}: "settings.{key}" is for sampler {readers}, not {sampler}')
    if "start" in values and "t_T" in values:
        raise FxpassError(f'{path}: "settings.start" and "settings.t_T" both set where the walk starts; keep one')
    settings = Settings(sampler, **values, preset=name)
    try:
        settings.check_knobs()
    except ValueError as exc:
        raise FxpassError(f'{path}: "settings": {exc}') from None
    return settings


def preset_from(doc, path) -> Settings:
    """A preset document (parsed JSON) as Settings; FxpassError naming ``path`` and the key."""
    if not isinstance(doc, dict) or MARKER not in doc:
        raise FxpassError(f'{path}: not an fxpass preset file (no "{MARKER}": {VERSION}; fxpass evaluate --tune '
                          "writes them)")
    if type(doc[MARKER]) is not int or doc[MARKER] != VERSION:
        raise FxpassError(f'{path}: "{MARKER}" is {_shown(doc[MARKER])}, expected {VERSION}')
    for key in doc:
        if key not in TOP_KEYS:
            raise FxpassError(f'{path}: unknown key {_shown(key)}; a preset file has {", ".join(TOP_KEYS)}')
    for key in ("name", "settings"):
        if key not in doc:
            raise FxpassError(f'{path}: "{key}" is missing')
    return settings_of(path, doc["settings"], check_name(path, doc["name"]))


def read_preset(path: str | Path) -> Settings:
    """The Settings of the preset file at ``path`` (``preset`` = its name); FxpassError naming the file."""
    return preset_from(_load_json(path), path)


# ---- the candidates -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """One setting of the search, its model calls per image and their cost (calls, or full calls +
    shallow calls x the shallow/full latency ratio)."""

    settings: Settings
    calls: int
    cost: float


def cost_of(calls: int, interval: int, ratio: float | None) -> float:
    """Full calls + shallow calls x ``ratio`` (every ``interval``-th call is full); ``calls`` without a cache."""
    if interval == 1 or ratio is None:
        return calls
    full = -(-calls // interval)
    return round(full + (calls - full) * ratio, 3)


def _fit(diffusion, base: Settings, budget: int, ratio: float | None) -> tuple[Candidate | None, Candidate]:
    """(``base`` with the most steps whose cost fits ``budget``, or None; ``base`` with the fewest steps)."""
    def make(steps: int) -> Candidate:
        s = replace(base, steps=steps)
        sampler = s.build(diffusion)
        return Candidate(s, sampler.calls, cost_of(sampler.calls, s.cache_interval, ratio))

    top = base.resolved(diffusion.num_steps).t_T
    lo = make(min(MIN_STEPS, top))
    if lo.cost > budget:
        return None, lo
    low, high = lo.settings.steps, top  # calls grow with steps: the largest that fits, by bisection
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if make(mid).cost <= budget else (low, mid - 1)
    return make(low), lo


def _balanced(found: list[Candidate], limit: int) -> list[Candidate]:
    """At most ``limit`` of ``found``, chosen greedily so that every level of every knob appears about equally
    often (ties: grid order), returned in grid order."""
    if len(found) <= limit:
        return found
    knobs = ("sampler", "start", "eta", "init", "travel_length", "travel_repeat", "cache_interval")
    levels = [[(k, getattr(c.settings, k)) for k in knobs] for c in found]
    counts: dict = {}
    left, chosen = list(range(len(found))), []
    for _ in range(limit):
        best = min(left, key=lambda i: (sum(counts.get(level, 0) for level in levels[i]), i))
        left.remove(best)
        chosen.append(best)
        for level in levels[best]:
            counts[level] = counts.get(level, 0) + 1
    return [found[i] for i in sorted(chosen)]


def candidates(diffusion, budget: int, *, ratio: float | None = None, limit: int = MAX_CANDIDATES) -> list[Candidate]:
    """The candidates for ``budget`` model calls per image (cache intervals too where ``ratio``, the
    shallow/full latency ratio of a deep-cache model, is given); FxpassError where none fits."""
    intervals = (1,) if ratio is None else (1, *CACHE_INTERVALS)
    found, plans, cheapest = [], set(), None
    for start in STARTS:
        for method in METHODS:
            for length, repeat in TRAVELS:
                for interval in intervals:
                    base = Settings(**method, start=start, travel_length=length, travel_repeat=repeat,
                                    cache_interval=interval)
                    fit, low = _fit(diffusion, base, budget, ratio)
                    cheapest = low if cheapest is None or low.cost < cheapest.cost else cheapest
                    key = None if fit is None else (tuple(fit.settings.build(diffusion).plan), tuple(method.items()),
                                                    interval)
                    if fit is not None and key not in plans:
                        plans.add(key)
                        found.append(fit)
    if not found:
        raise FxpassError(f"--budget {budget}: the cheapest candidate, {cheapest.settings.label(diffusion.num_steps)}, "
                          f"costs {cheapest.cost:g} model calls per image; give at least {math.ceil(cheapest.cost)}")
    if max(c.cost for c in found) >= budget / 2:  # far below the budget: another candidate spends it
        found = [c for c in found if c.cost >= budget / 2]
    return _balanced(found, limit)


def shallow_ratio(model, shape: tuple[int, ...] | None = None, calls: int = RATIO_CALLS) -> float:
    """The median latency of the shallow graph over the full one's (``calls`` each after a warm-up, at the
    middle of the table), rounded to 2 decimals; the model's shallow graph must be loaded."""
    size = int(model.image_size)
    x = np.random.default_rng(0).standard_normal(shape or (1, 3, size, size)).astype(np.float32)
    t = np.full((x.shape[0],), model.diffusion.num_steps // 2, dtype=np.int64)
    _, feature = model.full(x, t)
    model.shallow(x, t, feature)
    full, shallow = [], []
    for _ in range(calls):
        start = time.perf_counter()
        model.full(x, t)
        full.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.shallow(x, t, feature)
        shallow.append(time.perf_counter() - start)
    return max(0.01, round(float(np.median(shallow) / max(np.median(full), 1e-9)), 2))


# ---- the search ---------------------------------------------------------------------------------------
def split(count: int, where) -> tuple[list[int], list[int]]:
    """(tuning positions, held-apart positions) of ``count`` images sorted by name: even and odd positions."""
    if count < 4:
        raise FxpassError(f"{where}: --tune needs at least 4 images (every other one is held apart), found {count}")
    return list(range(0, count, 2)), list(range(1, count, 2))


def _means(cases: Sequence[dict]) -> dict:
    return {"cases": len(cases), **{m: float(np.mean([c[m] for c in cases])) for m in ("psnr", "ssim")}}


def _ranked(results: dict[int, dict], found: list[Candidate]) -> list[int]:
    """Candidate indices best first: mean PSNR, then SSIM, then lower cost, then grid order."""
    return sorted(results, key=lambda i: (-results[i]["psnr"], -results[i]["ssim"], found[i].cost, i))


class _Calls:
    """One progress count over the search's compare() runs: ``part()`` is a compare progress callback; the
    total starts as an estimate (the survivors at the most calls) and is corrected as stages are chosen."""

    def __init__(self, progress: Progress | None, total: int, second: int):
        self.progress, self.total, self.second, self.done = progress, total, second, 0

    def part(self) -> Progress | None:
        base = self.done
        return None if self.progress is None else (lambda done, _total: self.progress(base + done, self.total))

    def add(self, report: dict) -> None:
        self.done += sum(c["calls"] for run in report["runs"] for c in run["cases"])


def _halving(model, images, masks, names, found: list[Candidate], seed: int, calls: _Calls) -> tuple[list[int], dict]:
    """Successive halving on ``images``: (candidate indices best first, {index: stage, cases, psnr, ssim})."""
    from .compare_runs import compare

    first, per_image = -(-len(images) // 3), len(masks)
    report = compare(model, images[:first], masks, [c.settings for c in found], seed=seed, names=names[:first],
                     progress=calls.part())
    calls.add(report)
    cases = {i: run["cases"] for i, run in enumerate(report["runs"])}
    results = {i: {"stage": 1, **_means(rows)} for i, rows in cases.items()}
    survivors = _ranked(results, found)[:-(-len(found) // 3)]
    calls.total += per_image * (len(images) - first) * (sum(found[i].calls for i in survivors) - calls.second)
    report = compare(model, images[first:], masks, [found[i].settings for i in survivors],
                     seed=seed + first * per_image, names=names[first:], progress=calls.part())
    calls.add(report)
    for i, run in zip(survivors, report["runs"]):
        results[i] = {"stage": 2, **_means(cases[i] + run["cases"])}
    order = _ranked({i: results[i] for i in survivors}, found)
    return order + [i for i in _ranked(results, found) if i not in survivors], results


def _record(candidate: Candidate, steps: int) -> dict:
    s = candidate.settings
    knobs = {k: getattr(s, k) for k in KNOBS[s.sampler] if k != "t_T" and getattr(s, k) is not None}
    return {"settings": {"sampler": s.sampler, "start": s.start, **knobs},
            "label": s.label(steps), "calls": candidate.calls, "cost": candidate.cost}


def tune(model, images: np.ndarray, masks: dict, found: list[Candidate], *, budget: int, name: str,
         names: Sequence[str], seed: int = 0, ratio: float | None = None, progress: Progress | None = None) -> dict:
    """Search ``found`` (from :func:`candidates`) on ``images`` (sorted by name, ``names``) and return the
    preset document (see the module docstring): the winner's settings named ``name``, the search, and the
    winner's one measurement on the held-apart images."""
    from .compare_runs import compare

    tuning, held = split(len(images), "--tune")
    steps, per_image, top = model.diffusion.num_steps, len(masks), max(c.calls for c in found)
    first, keep = -(-len(tuning) // 3), -(-len(found) // 3)
    calls = _Calls(progress, per_image * (sum(c.calls for c in found) * first
                                          + top * keep * (len(tuning) - first) + top * len(held)), top * keep)
    order, results = _halving(model, images[tuning], masks, [names[i] for i in tuning], found, seed, calls)
    winner = found[order[0]]
    calls.total += per_image * len(held) * (winner.calls - top)
    report = compare(model, images[held], masks, [winner.settings], seed=seed, names=[names[i] for i in held],
                     progress=calls.part())
    summary = report["summary"][0]
    meta = getattr(model, "meta", None)
    cost = "model calls per image" if ratio is None else (
        f"full calls + shallow calls x {ratio:g} per image ({ratio:g}: the shallow graph's latency over the full "
        f"graph's, median of {RATIO_CALLS} calls each, measured at the start of the search)")
    doc = {
        MARKER: VERSION, "name": name, "settings": _record(winner, steps)["settings"], "budget": budget,
        "model": {"file": Path(str(getattr(model, "path", "model"))).name, "steps": steps,
                  "precision": getattr(meta, "precision", None)},
        "tuning": {
            "images": [names[i] for i in tuning], "cases": len(tuning) * len(masks), "masks": list(masks), "seed": seed,
            "cost": cost, "shallow_to_full": ratio,
            "search": (f"successive halving over {len(found)} candidates: all on the first {first} tuning image(s), "
                       f"the best {keep} on all of them; ranked by mean PSNR in the inpainted region, ties by SSIM"),
            "candidates": [{"rank": r + 1, **_record(found[i], steps), **results[i]} for r, i in enumerate(order)]},
        "measured": {"held_apart": {
            "images": [names[i] for i in held], "cases": len(held) * len(masks), "masks": list(masks), "seed": seed,
            "psnr": summary["psnr"], "ssim": summary["ssim"], "model_seconds_per_image": summary["seconds_per_case"],
            "calls_per_image": summary["calls_per_case"]}},
        "note": NOTE,
    }
    preset_from(doc, name)  # what is written reads back
    return doc
