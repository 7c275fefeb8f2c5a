"""CLI door for lower (placeholder until the command lands)."""

import argparse

from .errors import FxpassError


def _not_yet(args):
    raise FxpassError(f"fxpass {args.command}: not in this version yet")


def add_commands(sub, common):
    p = sub.add_parser("lower", parents=[common], help="lower MODEL.pt to ONNX")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_not_yet)
