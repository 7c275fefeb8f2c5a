"""``fxpass inspect MODEL.pt``: the config a checkpoint matches, parameters, dtypes, sizes, load time."""

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
    p.set_defaults(func=run)


def run(args) -> int:
    from collections import Counter

    from rich.table import Table

    from ..checkpoint import first_nonfinite, load_model
    from ..config import load_config

    cfg = load_config(args.config)
    t0 = time.perf_counter()
    model = load_model(args.model, cfg, trust_pickle=args.trust_pickle, allow_nonfinite=True)  # shown below
    seconds = time.perf_counter() - t0
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    dtypes = Counter(str(p.dtype).replace("torch.", "") for p in params)
    size = sum(p.numel() * p.element_size() for p in params)
    table = Table(title=f"{args.model}", show_header=False)
    table.add_row("config", args.config or "built-in CAMUS default")
    table.add_row("model", f"{type(model).__module__}.{type(model).__name__}")
    table.add_row("parameters", f"{n:,}")
    table.add_row("dtypes", ", ".join(f"{k} ({v} tensors)" for k, v in dtypes.items()))
    table.add_row("size in memory", f"{size / 2**20:.1f} MiB")
    table.add_row("file size", f"{Path(args.model).stat().st_size / 2**20:.1f} MiB")
    table.add_row("load time", f"{seconds:.2f} s")
    bad = first_nonfinite(model.state_dict().items())
    table.add_row("non-finite weights", "none" if bad is None else f"tensor {bad[0]} has {bad[1]} values")
    for key, value in cfg.to_dict().items():
        table.add_row(f"  {key}", repr(value))
    console().print(table)
    return 0
