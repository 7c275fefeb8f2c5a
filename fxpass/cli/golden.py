"""``fxpass golden MODEL.pt -o DIR``: a golden input/output set in Polygraphy's JSON formats."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import FxpassError
from ..metadata import PRECISIONS
from . import args as shared
from .output import console


def add_parser(sub, common) -> None:
    p = sub.add_parser("golden", parents=[common], help="write a golden input/output set (Polygraphy JSON)")
    p.add_argument("model", metavar="MODEL.pt")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="the golden set's directory, e.g. golden/NAME")
    shared.add_config(p, "YAML config (default: --onnx's metadata, else built-in CAMUS)")
    p.add_argument("--onnx", metavar="OUT.onnx",
                   help="the lowered model the set is for: schedule and inputs from its metadata; checked "
                        "against the new outputs before writing; named in the regression command")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="with --onnx: the precision that file must be, whose bound it is checked at (default fp32; "
                        "its own metadata label is never trusted)")
    shared.add_seed(p)
    p.add_argument("--t-index", nargs="+", metavar="I", help="t_index values (default: first and last)")
    shared.add_force(p, "replace DIR if it is empty or holds a golden set")
    shared.add_trust(p)
    shared.add_model_class(p)
    shared.add_user_schedule(p)
    p.set_defaults(func=run)


def parse_t_indices(values: list[str] | None) -> list[int] | None:
    if not values:
        return None
    out: list[int] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                index = int(part)
            except ValueError:
                raise FxpassError(f"--t-index {part}: expected integers such as 0 249") from None
            if index not in out:
                out.append(index)
    return out


def run(args) -> int:
    from ..config import resolve_config
    from ..fileio import plan_outputs
    from ..golden import make_golden, refuse_replacing_other, write_golden
    from ..metadata import read_file
    from ..load import load
    from . import user as user_flags

    user = user_flags.user_spec(args)
    out = plan_outputs({"-o": args.output}, inputs=[args.model, args.onnx, args.config], directories=("-o",),
                       force=args.force)["-o"]
    refuse_replacing_other(out)  # before any work
    info = read_file(args.onnx) if args.onnx else None
    if info is not None:  # the precision the user asks for, the graph that precision makes
        from ..expected import asked_precision, check_structure

        check_structure(info, asked_precision(info, args.precision))
    elif args.precision is not None:
        raise FxpassError("--precision: says what the --onnx file must be; give --onnx OUT.onnx")
    if user and info is not None:
        user_flags.agree_with_lowered(args, info)
        cfg = resolve_config(args.config, info.config, source=f"{args.onnx}: metadata", architecture=False)
    elif user:
        cfg = user_flags.schedule_config(args, user)
    else:
        cfg = resolve_config(args.config, info.config if info else None, source=f"{args.onnx}: metadata")
    t_indices = parse_t_indices(args.t_index)
    model_path = Path(args.model)
    model = load(model_path, config=cfg, model_class=args.model_class, model_kwargs=args.model_kwargs,
                 model_factory=args.model_factory, trust_pickle=args.trust_pickle,
                 allow_nonfinite=args.allow_nonfinite)
    specs = seen = None
    if user and info is not None:  # called as it was lowered: the graph's inputs
        model = user_flags.wrapped_for_graph(model, args, info)
    elif user:  # the inputs lower would infer, the timestep values it would feed
        model, cfg, specs, seen = _user_inputs(model, cfg, args)
    t0 = time.perf_counter()
    golden = make_golden(model, cfg, name=out.name, checkpoint=model_path, info=info, seed=args.seed,
                         t_indices=t_indices, output_dir=str(out), specs=specs, model_timesteps=seen)
    write_golden(out, golden, force=args.force)
    manifest = golden.manifest
    size = sum(p.stat().st_size for p in out.iterdir())
    say = console()
    say.print(f"wrote {out}: {len(golden.feeds)} inputs "
              + (f"(t_index {', '.join(map(str, manifest['t_index']))}) " if manifest["mode"] == "table" else "")
              + f"and {manifest['outputs']['runner']} outputs, {size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s",
              soft_wrap=True)
    verified = manifest["verified_with"]
    if verified:
        say.print(f"{info.path}: matches the golden outputs ({verified['max_rel_to_scale']:.3g}·max|ref|)",
                  soft_wrap=True)
    say.print(f"regression (fp32): {manifest['regression']['commands']['fp32']}", soft_wrap=True)
    return 0


def _user_inputs(model, cfg, args):
    """A user class without ``--onnx``: the model wrapped as ``lower`` wraps it, the config sized by
    it, the graph inputs ``lower`` would write (x, t_index, the extras) and the timestep values fed."""
    from ..diffusion import noise_levels, schedule_for
    from ..signature import plan, wrap
    from ..inputs import InputSpec
    from . import user as user_flags

    cfg = user_flags.sized(cfg, model)
    plain = cfg.plain  # no schedule given: a network with no timestep (refused if it takes one)
    p = plan(model, image_size=cfg.image_size, timestep_input=args.timestep_input, inputs=args.inputs,
             output=args.model_output, plain=plain)
    specs = [InputSpec("x", "float32", tuple(p.x.shape))]
    specs += [] if plain else [InputSpec("t_index", "int64", (int(p.x.shape[0]),))]
    specs += [InputSpec(n, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for n, v in p.extras.items()]
    seen = None
    if args.timestep_values != "index":
        seen = noise_levels(cfg, schedule_for(cfg, "respaced")[1], args.timestep_values)
    return wrap(model, p), cfg, specs, seen
