"""``--sampler`` and its knobs, shared by ``fxpass sample`` and ``fxpass evaluate``.

A knob given for a sampler that does not read it is refused in one line naming the flag (exit 2),
as is an ``--eta`` outside [0, 1]; the knobs that depend on the model (``--steps``, ``--t-T`` more
than its respaced steps, a plan over the call limit) are checked once its metadata is read.

``--preset`` takes a name (``paper``, ``balanced``, ``fast``) or a preset file (a path ending in ``.json``,
written by ``fxpass evaluate --tune`` and read strictly by :func:`fxpass.tune.read_preset`); ``fxpass
evaluate --preset A,B,...`` compares a list of them as ``--run`` entries would.

``fxpass evaluate --run SPEC`` (:func:`settings_from_spec`) names a sampler and its knobs in one
argument, a preset name or file, ``SAMPLER`` or ``SAMPLER:knob=value,...`` with the knobs' field names (``t_T``,
``steps``, ...), each checked as its flag is, the message naming the entry.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FxpassError
from ..samplers import DEFAULT_ETA, INITS, KNOBS, PRESETS, SAMPLERS, Settings
from . import args as shared

#: each knob's flag -> its Settings field
FLAGS = {"--t-T": "t_T", "--jump-length": "jump_length", "--jump-n-sample": "jump_n_sample", "--steps": "steps",
         "--eta": "eta", "--travel-length": "travel_length", "--travel-repeat": "travel_repeat",
         "--travel-below": "travel_below", "--zeta": "zeta", "--init": "init",
         "--cache-interval": "cache_interval"}


def unit_interval(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def init_choice(text: str) -> str:
    """An argparse type: where DiffPIR's walk starts (:data:`fxpass.samplers.INITS`)."""
    if text not in INITS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(INITS)}, got {text!r}")
    return text


def is_preset_file(entry: str) -> bool:
    """Whether a ``--preset`` entry names a preset file (a path ending in .json) rather than a preset."""
    return entry.lower().endswith(".json")


def preset_entries(text: str) -> list[str]:
    """The entries of a ``--preset`` value: a name, a file, or a comma-separated list of them (a file whose
    own name holds a comma is one entry where it exists)."""
    text = text.strip()
    if "," not in text or (is_preset_file(text) and Path(text).is_file()):
        return [text]
    return [entry.strip() for entry in text.split(",")]


def preset_type(many: bool):
    """An argparse type: a preset name or file; with ``many``, a comma-separated list of them."""
    def parse(text: str) -> str:
        entries = preset_entries(text)
        if len(entries) > 1 and not many:
            raise argparse.ArgumentTypeError(f"expected one preset, got {text!r} (fxpass evaluate compares a list)")
        for entry in entries:
            if entry not in PRESETS and not is_preset_file(entry):
                raise argparse.ArgumentTypeError(f"expected {', '.join(PRESETS)} or a preset file FILE.json, got "
                                                 f"{entry!r}")
        return text
    return parse


def preset_settings(entry: str) -> Settings:
    """The Settings of one ``--preset`` entry: a built-in preset, or a preset file read strictly."""
    from ..tune import read_preset

    return PRESETS[entry] if entry in PRESETS else read_preset(entry)


def preset_files(args) -> list[str]:
    """The preset files that ``--preset`` and ``--run`` name (inputs: an output must not overwrite them)."""
    entries = preset_entries(args.preset) if getattr(args, "preset", None) else []
    return [e for e in [*entries, *getattr(args, "run", [])] if is_preset_file(e.strip())]


def add_arguments(p: argparse.ArgumentParser, many_presets: bool = False) -> None:
    """``--preset`` (with ``many_presets``, a list of them too), or ``--sampler`` with RePaint's, DDIM's and DDNM's
    knobs (each left None when not given)."""
    p.add_argument("--preset", type=preset_type(many_presets), default=None, metavar="NAME|FILE.json",
                   help="paper: RePaint's paper setting (the default); balanced, fast: DDNM with time travel from "
                        "the middle of the schedule, chosen by measurement on the trained reference "
                        "(docs/sampling.md); FILE.json: a preset file written by fxpass evaluate --tune"
                        + ("; a comma-separated list compares them, as --run entries" if many_presets else ""))
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="repaint: RePaint's resampling over every step (default); ddim: DDIM skip-step sampling, "
                        "known pixels noised into x_t; ddnm: DDNM, known pixels projected into the predicted x0; "
                        "diffpir: DiffPIR, x0 projected as DDNM's, then re-noised (--zeta), optionally started from "
                        "the known pixels (--init fill)")
    p.add_argument("--t-T", dest="t_T", type=shared.positive, default=None, metavar="N",
                   help="start from pure noise at level N-1 of the lowered schedule; ddim, ddnm: --steps are spread "
                        "over levels 0..N-1 (default: the number of respaced steps)")
    p.add_argument("--jump-length", type=shared.positive, default=None, metavar="N",
                   help="repaint: steps per jump back (default 10)")
    p.add_argument("--jump-n-sample", type=shared.positive, default=None, metavar="N",
                   help="repaint: passes over each jump section (default 10; 1 = no resampling)")
    p.add_argument("--steps", type=shared.positive, default=None, metavar="N",
                   help="ddim, ddnm: model steps to walk, evenly spaced over the lowered schedule with its top "
                        "and 0 included (default: all of them)")
    p.add_argument("--eta", type=unit_interval, default=None, metavar="F",
                   help="ddim, ddnm: stochasticity in [0, 1], 0 = deterministic DDIM, 1 = DDPM-like noise "
                        f"(default {DEFAULT_ETA:g}, DDNM's setting)")
    p.add_argument("--travel-length", type=shared.positive, default=None, metavar="L",
                   help="ddnm: time travel jumps back L steps (default 1)")
    p.add_argument("--travel-repeat", type=shared.positive, default=None, metavar="R",
                   help="ddnm: passes over each time-travel section (default 1 = no time travel)")
    p.add_argument("--travel-below", type=shared.positive, default=None, metavar="N",
                   help="ddnm: time travel only from the N least noisy walked levels (default: from all of them)")
    p.add_argument("--zeta", type=unit_interval, default=None, metavar="F",
                   help="diffpir: re-noising weight in [0, 1], 1 = fresh noise only (default 1)")
    p.add_argument("--init", type=init_choice, default=None, metavar="noise|fill",
                   help="diffpir: start from pure noise (default) or from the known pixels, the unknown ones their "
                        "mean colour, noised to the top level")
    p.add_argument("--cache-interval", type=shared.positive, default=None, metavar="N",
                   help="every sampler, on a model lowered with --deep-cache: every N-th model call is full, the "
                        "others run the shallow graph on the last full call's deep feature (default 1 = no cache)")


def _settings(sampler: str, values: dict, name, where: str = "") -> Settings:
    """Settings of ``sampler`` with ``values`` (field -> value); FxpassError, prefixed with ``where``, for
    a knob of another sampler (``name(field)`` says it) or ``steps`` over ``t_T``."""
    for field in values:
        if field not in KNOBS[sampler]:
            readers = [s for s in SAMPLERS if field in KNOBS[s]]
            raise FxpassError(f"{where}{name(field)} is for --sampler {' or '.join(readers)}, not --sampler {sampler}")
    settings = Settings(sampler, **values)
    try:
        settings.check_knobs()
    except ValueError as exc:
        raise FxpassError(f"{where}{exc}") from None
    return settings


def settings_from(args) -> Settings:
    """The :class:`fxpass.samplers.Settings` of parsed ``args``; FxpassError for a knob of another sampler,
    or for a knob given with ``--preset`` (which sets them all)."""
    if getattr(args, "preset", None) is not None:
        given = [flag for flag in given_flags(args) if flag != "--preset"]
        if given:
            raise FxpassError(f"--preset {args.preset} sets the sampler and its knobs: drop {', '.join(given)}")
        return preset_settings(preset_entries(args.preset)[0])
    values = {field: getattr(args, field) for field in FLAGS.values() if getattr(args, field, None) is not None}
    flag_of = {field: flag for flag, field in FLAGS.items()}
    return _settings(args.sampler or "repaint", values, flag_of.get)


def given_flags(args) -> list[str]:
    """The single-sampler flags given on the command line (``--sampler`` and the knobs)."""
    given = [flag for flag, dest in (("--preset", "preset"), ("--sampler", "sampler"))
             if getattr(args, dest, None) is not None]
    return given + [flag for flag, field in FLAGS.items() if getattr(args, field, None) is not None]


def settings_from_spec(spec: str) -> Settings:
    """A preset name or file, ``SAMPLER`` or ``SAMPLER:knob=value,...`` (knobs by field name, e.g.
    ``ddnm:steps=25,eta=0.5``) as Settings; FxpassError naming the ``--run`` entry for an unknown sampler or
    knob, a bad value, a knob of another sampler (a preset file's own refusals name the file)."""
    where = f"--run {spec}: "
    if spec.strip() in PRESETS or is_preset_file(spec.strip()):
        return preset_settings(spec.strip())
    sampler, _, rest = spec.partition(":")
    sampler = sampler.strip()
    if sampler not in SAMPLERS:
        raise FxpassError(f"{where}unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    types = {"eta": unit_interval, "zeta": unit_interval, "init": init_choice}
    flag_of = {field: flag for flag, field in FLAGS.items()}
    values: dict = {}
    for item in filter(None, (i.strip() for i in rest.split(","))):
        field, eq, text = (part.strip() for part in item.partition("="))
        if field not in flag_of:
            raise FxpassError(f"{where}unknown knob {field!r}; choose from {', '.join(flag_of)}")
        if not eq or field in values:
            raise FxpassError(f"{where}expected each knob once, as knob=value, got {item!r}")
        try:
            values[field] = types.get(field, shared.positive)(text)
        except argparse.ArgumentTypeError as exc:
            raise FxpassError(f"{where}argument {flag_of[field]}: {exc}") from None
    return _settings(sampler, values, lambda field: field, where)


def plan(settings, diffusion, model_path, command: str):
    """The sampler of ``settings`` for ``diffusion``: FxpassError naming the model where a knob does not
    fit it, naming ``command`` where the plan cannot be made (over the call limit)."""
    try:
        settings.check(diffusion.num_steps)
    except ValueError as exc:
        raise FxpassError(f"{model_path}: {exc}") from None
    try:
        return settings.build(diffusion)
    except ValueError as exc:
        raise FxpassError(f"{command}: {exc}") from None


def load_cache(model, runs) -> None:
    """Load ``model``'s deep-cache shallow graph where one of ``runs`` (Settings) uses a cache interval."""
    if any(settings.cache_interval > 1 for settings in runs):
        model.load_shallow()
