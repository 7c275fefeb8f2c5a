"""What fits on this machine: estimates made before anything is allocated, refused in one line.

A config with ``num_channels: 1000000`` or ``diffusion_steps: 1000000000``, or an ONNX model that
declares a [1, 3, 40000, 40000] input, would otherwise end in an allocation failure deep inside torch or
NumPy.  These checks name the key and say how much memory the run would need.  Torch-free.
"""

from __future__ import annotations

import os

from .errors import FxpassError

#: the longest diffusion chain a config may declare (guided-diffusion uses at most a few thousand steps)
MAX_DIFFUSION_STEPS = 1_000_000
#: the longest schedule a lowered model may carry (a table row per entry)
MAX_SCHEDULE = 100_000
#: a run needs several copies of the weights at once (the module, capture, export, the ONNX proto, ORT)
WEIGHT_COPIES = 4


def available_bytes() -> int:
    """Memory this process can still count on: MemAvailable (Linux), else physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits(nbytes: float, what: str, source: str) -> None:
    """Refuse ``what`` (e.g. "num_channels: 1000000") when ``nbytes`` is more than this machine has."""
    have = available_bytes()
    if nbytes > have:
        raise FxpassError(f"{source}: {what} needs about {gib(nbytes)} of memory; this machine has {gib(have)} "
                          "available")


def unet_parameters(cfg) -> int:
    """An estimate of the U-Net's parameter count from the config alone (3x3 convolutions of the
    ResBlocks, attention projections, time MLP): 82-84% of the true count on CAMUS and small configs,
    enough to tell what cannot fit by orders of magnitude."""
    ch = cfg.num_channels
    widths = [int(m * ch) for m in cfg.channel_mults]
    emb = 4 * ch
    total = ch * emb + emb * emb
    attention = set(cfg.attention_ds)
    prev = ch
    for level, w in enumerate(widths):
        blocks_down = cfg.num_res_blocks
        blocks_up = cfg.num_res_blocks + 1
        res = 9 * w * w * 2 + emb * 2 * w  # two 3x3 convs and the scale-shift projection
        total += (blocks_down + blocks_up) * res + 9 * prev * w * 2
        if 2**level in attention:
            total += (blocks_down + blocks_up) * 4 * w * w
        prev = w
    total += 2 * (9 * widths[-1] ** 2 * 2 + emb * 2 * widths[-1]) + 4 * widths[-1] ** 2  # middle block
    return int(total)


def schedule_length(diffusion_steps: int, respacing: str) -> int:
    """How many timesteps ``timestep_respacing`` keeps, without building the list."""
    text = str(respacing).strip()
    if text == "":
        return diffusion_steps
    if text.startswith("ddim"):
        try:
            return int(text[4:])
        except ValueError:
            return 0
    try:
        return sum(int(p) for p in text.split(","))
    except ValueError:
        return 0


def check_config_fits(cfg, source: str) -> None:
    """The checks :func:`fxpass.config.from_dict` runs: chain length, schedule length, weights, tables."""
    if cfg.diffusion_steps > MAX_DIFFUSION_STEPS:
        raise FxpassError(f"{source}: diffusion_steps: at most {MAX_DIFFUSION_STEPS:,} (got {cfg.diffusion_steps:,})")
    steps = schedule_length(cfg.diffusion_steps, cfg.timestep_respacing)
    if steps > MAX_SCHEDULE:
        raise FxpassError(f"{source}: timestep_respacing {cfg.timestep_respacing!r} keeps {steps:,} of "
                          f"{cfg.diffusion_steps:,} steps; fxpass lowers schedules of at most {MAX_SCHEDULE:,} "
                          "(set timestep_respacing, e.g. '250')")
    params = unet_parameters(cfg)
    check_fits(params * 4 * WEIGHT_COPIES, f"num_channels {cfg.num_channels}, num_res_blocks {cfg.num_res_blocks} "
               f"(about {params:,} parameters)", source)
    # table mode: every ResBlock's scale and shift (2 x width floats) for every schedule entry
    widths = [int(m * cfg.num_channels) for m in cfg.channel_mults]
    per_step = sum(2 * w * (2 * cfg.num_res_blocks + 1) for w in widths) + 4 * widths[-1]
    check_fits(steps * per_step * 4 * 2, f"timestep_respacing {cfg.timestep_respacing!r} ({steps:,} table rows)",
               source)


#: a U-Net's activations on an input are many times the input (64 channels at full size and more)
ACTIVATIONS_PER_INPUT = 64


def check_input_fits(shape, what: str, source: str, itemsize: int = 4) -> None:
    """An input of static ``shape`` must fit, with the activations a U-Net computes from it."""
    n = 1
    for d in shape:
        n *= max(int(d), 1)
    check_fits(n * itemsize * ACTIVATIONS_PER_INPUT, f"{what} of shape {list(shape)}", source)
