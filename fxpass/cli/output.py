"""Printing for the commands (rich, no markup in paths)."""

from __future__ import annotations


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, markup=False)  # paths like "run[1].pt" print as they are
