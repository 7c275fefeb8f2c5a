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
    p.add_argument("--model-factory", metavar="pkg.mod:function",
                   help="a function called with --model-kwargs that returns your nn.Module (instead of --model-class)")
    p.add_argument("--model-kwargs", metavar="JSON",
                   help="keyword arguments for --model-class / --model-factory; nested objects become attribute "
                        "objects (e.g. {\"conf\": {\"diffusion_steps\": 4000}})")
    p.add_argument("--timestep-input", metavar="NAME",
                   help="the forward parameter that takes the timestep / noise level, where its name is not "
                        "one fxpass knows (timesteps, t, time, noise_level, gammas, sigma, ...)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE[:dtype]", dest="inputs",
                   help="shape of another forward input, e.g. low_res=1,3,16,16 (repeatable; x=... overrides "
                        "the inferred x); without it, an input's shape comes from the model's attributes where "
                        "they give it (NAME_shape, NAME_size, NAME_channels; small_size for low_res)")
    p.add_argument("--model-output", metavar="NAME",
                   help="the output to lower where forward returns several (a dataclass field, dict key or tuple "
                        "index; default: 'sample', the only tensor, or a tuple's first)")


def add_user_schedule(p: argparse.ArgumentParser) -> None:
    """For --model-class without --config: the schedule and size fxpass needs."""
    p.add_argument("--diffusion-steps", type=positive, metavar="N", help="with --model-class: the model's diffusion steps")
    p.add_argument("--timestep-respacing", metavar="S", help="with --model-class: respacing, e.g. 250 or ddim50")
    p.add_argument("--timestep-values", choices=("index", "alpha_bar", "sqrt_alpha_bar"), default="index",
                   help="what the model is fed for timestep t: t itself (default), or a continuous model's noise "
                        "level: alpha_bar (Palette's gammas) or sqrt_alpha_bar (SR3's noise_level)")
    p.add_argument("--image-size", type=positive, metavar="N",
                   help="with --model-class: image size (default: the model's image_size attribute)")
