"""CLI door for check, golden (placeholder until the command lands)."""

import argparse

from .errors import FxpassError


def _not_yet(args):
    raise FxpassError(f"fxpass {args.command}: not in this version yet")


def add_commands(sub, common):
    p = sub.add_parser("check", parents=[common], help="compare an ONNX model across runtimes with Polygraphy")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_not_yet)
    p = sub.add_parser("golden", parents=[common], help="write a golden input/output set")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_not_yet)
