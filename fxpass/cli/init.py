"""``fxpass init OUT.pt``: a seeded random checkpoint of a config."""

from __future__ import annotations

import time
from . import args as shared
from .output import console


def add_parser(sub, common) -> None:
    p = sub.add_parser("init", parents=[common], help="write a seeded random checkpoint")
    p.add_argument("out", metavar="OUT.pt")
    shared.add_config(p)
    p.add_argument("--seed", type=shared.seed_type, default=0)
    shared.add_force(p, "overwrite OUT if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint import init_model, save_checkpoint
    from ..config import load_config
    from ..fileio import plan_outputs

    cfg = load_config(args.config)
    out = plan_outputs({"OUT": args.out}, inputs=[args.config], force=args.force)["OUT"]  # before building
    t0 = time.perf_counter()
    model = init_model(cfg, seed=args.seed)
    save_checkpoint(model, out, exclusive=not args.force)  # of two runs racing for a new path, one wins
    n = sum(p.numel() for p in model.parameters())
    console().print(
        f"wrote {out}: seeded random U-Net (seed {args.seed}), {n:,} parameters, "
        f"{out.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s",
        soft_wrap=True,  # one line whatever the terminal width
    )
    return 0
