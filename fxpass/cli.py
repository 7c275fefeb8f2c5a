"""The ``fxpass`` command: thin doors onto the pipeline."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__
from .errors import FxpassError


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False, markup=False)  # paths like "run[1].pt" print as they are


# ---- init -------------------------------------------------------------------------------------
def cmd_init(args) -> int:
    from .checkpoint import init_model, save_checkpoint
    from .config import load_config
    from .fileio import check_writable_target

    cfg = load_config(args.config)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FxpassError(f"{out}: already exists (pass --force to overwrite)")
    check_writable_target(out)  # before building the model, not after
    t0 = time.perf_counter()
    model = init_model(cfg, seed=args.seed)
    save_checkpoint(model, out)
    n = sum(p.numel() for p in model.parameters())
    _console().print(
        f"wrote {out}: seeded random U-Net (seed {args.seed}), {n:,} parameters, "
        f"{out.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s",
        soft_wrap=True,  # one line whatever the terminal width
    )
    return 0


# ---- inspect ----------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    from collections import Counter

    from rich.table import Table

    from .checkpoint import load_model
    from .config import load_config

    cfg = load_config(args.config)
    t0 = time.perf_counter()
    model = load_model(args.model, cfg, trust_pickle=args.trust_pickle)
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
    for key, value in cfg.to_dict().items():
        table.add_row(f"  {key}", repr(value))
    _console().print(table)
    return 0


# ---- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxpass",
        description="Lower guided-diffusion / RePaint U-Nets to ONNX through torch.fx rewrites.",
    )
    parser.add_argument("--version", action="version", version=f"fxpass {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="{init,inspect,lower,check,golden,sample}")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")

    p = sub.add_parser("init", parents=[common], help="write a seeded random checkpoint")
    p.add_argument("out", metavar="OUT.pt")
    p.add_argument("--config", metavar="FILE", help="RePaint/guided-diffusion YAML (default: built-in CAMUS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("inspect", parents=[common], help="show a checkpoint's config, parameters, dtypes, size")
    p.add_argument("model", metavar="MODEL.pt")
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--trust-pickle", action="store_true", help="allow checkpoints that are full pickled modules")
    p.set_defaults(func=cmd_inspect)

    from . import cli_check, cli_lower, cli_sample

    cli_lower.add_commands(sub, common)
    cli_check.add_commands(sub, common)
    cli_sample.add_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FxpassError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"fxpass: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fxpass: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if getattr(args, "debug", False):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"fxpass: internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
