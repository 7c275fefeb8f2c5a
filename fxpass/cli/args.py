"""Argument groups shared by the commands, defined once: config, checkpoint trust, seed, output/force."""

from __future__ import annotations

import argparse


def int_at_least(minimum: int, what: str, maximum: int | None = None):
    """An argparse type: an integer in ``minimum..maximum``, refused as "expected a ``what`` integer"."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value

    return parse


positive = int_at_least(1, "positive")
#: numpy's and torch's generators take seeds below 2**63 (and 2**64); refuse more in one line
seed_type = int_at_least(0, "non-negative (below 2**63)", 2**63 - 1)


def add_config(p: argparse.ArgumentParser, help: str = "RePaint/guided-diffusion YAML (default: built-in CAMUS)"):
    p.add_argument("--config", metavar="FILE", help=help)


def add_trust(p: argparse.ArgumentParser, nonfinite: bool = True) -> None:
    """How far a checkpoint is trusted: pickled modules (``--trust-pickle``) and NaN/Inf weights."""
    p.add_argument("--trust-pickle", action="store_true", help="allow checkpoints that are full pickled modules")
    if nonfinite:
        p.add_argument("--allow-nonfinite", action="store_true",
                       help="load a checkpoint whose weights hold NaN or Inf (refused by default)")


def add_seed(p: argparse.ArgumentParser, help: str = "seed of the random inputs (default 0)") -> None:
    p.add_argument("--seed", type=seed_type, default=0, help=help)


def add_force(p: argparse.ArgumentParser, help: str = "overwrite an existing output") -> None:
    p.add_argument("--force", action="store_true", help=help)


def add_model_class(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-class", metavar="pkg.mod:Class", help="your own U-Net class instead of fxpass's")
    p.add_argument("--model-kwargs", metavar="JSON", help="keyword arguments for --model-class")
