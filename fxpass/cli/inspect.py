"""``fxpass inspect MODEL.pt``: the config a checkpoint matches, parameters, dtypes, sizes, load time;
for your own class (``--model-class`` / ``--model-factory``) also the inputs ``lower`` would infer."""

from __future__ import annotations

import time
from pathlib import Path

from . import args as shared
from .output import console


def add_parser(sub, common) -> None:
    p = sub.add_parser("inspect", parents=[common], help="show a checkpoint's config, parameters, dtypes, size")
    p.add_argument("model", metavar="MODEL.pt")
    shared.add_config(p)
    shared.add_trust(p, nonfinite=False)
    shared.add_model_class(p)
    shared.add_user_schedule(p)
    p.set_defaults(func=run)


#: the config keys fxpass uses of a user's class (its constructor decides the rest)
_USED = ("image_size", "diffusion_steps", "timestep_respacing", "noise_schedule", "rescale_timesteps", "model_class")


def run(args) -> int:
    from collections import Counter

    from rich.markup import escape
    from rich.table import Table

    from ..checkpoint import first_nonfinite
    from ..config import CAMUS, load_config
    from ..errors import FxpassError
    from ..load import load
    from . import user as user_flags

    user = user_flags.user_spec(args)
    if user:  # a schedule only where one is given: inspecting needs none
        cfg = user_flags.schedule_config(args, user)  # no schedule flags: a model with no timestep
    else:
        cfg = load_config(args.config)
    t0 = time.perf_counter()
    model = load(args.model, config=cfg or CAMUS, model_class=args.model_class, model_kwargs=args.model_kwargs,
                 model_factory=args.model_factory, trust_pickle=args.trust_pickle,
                 allow_nonfinite=True)  # non-finite weights are shown below
    seconds = time.perf_counter() - t0
    if user and cfg is not None and not cfg.image_size:  # the size lower takes: the model's image_size
        try:
            cfg = user_flags.sized(cfg, model)
        except FxpassError:
            pass  # shown as 0; the inputs row says what to pass
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    dtypes = Counter(str(p.dtype).replace("torch.", "") for p in params)
    size = sum(p.numel() * p.element_size() for p in params)
    table = Table(title=escape(f"{args.model}"), show_header=False)
    if user:
        table.add_row("config", escape(args.config or ("schedule flags" if cfg.diffusion_steps else "no schedule given "
                                                       "(lowered as a network with no timestep; a diffusion model "
                                                       "needs --config FILE or --diffusion-steps N)")))
    else:
        table.add_row("config", escape(args.config or "built-in CAMUS default"))
    table.add_row("model", f"{type(model).__module__}.{type(model).__name__}")
    table.add_row("parameters", f"{n:,}")
    table.add_row("dtypes", ", ".join(f"{k} ({v} tensors)" for k, v in dtypes.items()))
    table.add_row("size in memory", f"{size / 2**20:.1f} MiB")
    table.add_row("file size", f"{Path(args.model).stat().st_size / 2**20:.1f} MiB")
    table.add_row("load time", f"{seconds:.2f} s")
    bad = first_nonfinite(model.state_dict().items())
    table.add_row("non-finite weights", "none" if bad is None else f"tensor {bad[0]} has {bad[1]} values")
    if user:
        _inputs(table, model, cfg, args)
    for key, value in (cfg.to_dict().items() if cfg is not None else ()):
        if not user or key in _USED:  # of a user's class fxpass uses the schedule and size only
            table.add_row(f"  {key}", escape(repr(value)))
    console().print(table)
    return 0


def _inputs(table, model, cfg, args) -> None:
    """The inputs ``fxpass lower`` would infer for a user's class, each with where its shape comes
    from; where they cannot be inferred, the reason (what to pass) instead."""
    from rich.markup import escape

    from ..errors import FxpassError
    from ..load import model_image_size
    from ..signature import plan, takes_timestep

    size = args.image_size or (cfg.image_size if cfg is not None else 0) or model_image_size(model)
    size = size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None
    try:
        p = plan(model, image_size=size, timestep_input=args.timestep_input, inputs=args.inputs,
                 plain=cfg is not None and cfg.plain and not takes_timestep(model, args.timestep_input))
    except FxpassError as exc:
        table.add_row("inputs", escape(f"not inferred: {exc}"))
        return
    table.add_row("inputs", "as fxpass lower infers them (graph inputs: x" + (", t_index" if p.t_name else "")
                  + "".join(f", {k}" for k in p.extras) + ")")
    table.add_row(f"  {p.x_name}", escape(f"{tuple(p.x.shape)} from {p.origins.get(p.x_name, 'the model')}"))
    kind = "a continuous noise level (float32)" if p.continuous else "int64 timesteps"
    if p.t_name is not None:
        table.add_row(f"  {p.t_name}", escape(f"{kind}, folded into tables gathered by t_index"))
    for name, value in p.extras.items():
        dtype = str(value.dtype).removeprefix("torch.")
        table.add_row(f"  {name}", escape(f"{tuple(value.shape)} {dtype} from {p.origins.get(name, '--input')}"))
    for name in p.omitted:
        table.add_row(f"  {name}", "left at its default (--input NAME=SHAPE gives it)")
