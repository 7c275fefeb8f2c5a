"""``fxpass init OUT.pt``: a seeded random checkpoint of a config."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import FxpassError
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
    from ..fileio import check_writable_target

    cfg = load_config(args.config)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FxpassError(f"{out}: already exists (pass --force to overwrite)")
    check_writable_target(out)  # before building the model, not after
    t0 = time.perf_counter()
    model = init_model(cfg, seed=args.seed)
    save_checkpoint(model, out)
    n = sum(p.numel() for p in model.parameters())
    console().print(
        f"wrote {out}: seeded random U-Net (seed {args.seed}), {n:,} parameters, "
        f"{out.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s",
        soft_wrap=True,  # one line whatever the terminal width
    )
    return 0
