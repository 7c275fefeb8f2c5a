"""CLI door for ``fxpass sample``: RePaint inpainting on a lowered ONNX model, without torch.

Only NumPy, Pillow, rich and ONNX Runtime are imported on this path (a test checks that torch stays
out of ``sys.modules``).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np

from .errors import FxpassError

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


# ---- images ------------------------------------------------------------------------------------
def _read(path: str | Path, size: int, what: str, gray: bool) -> np.ndarray:
    """Pixels of ``path`` in [0, 1], [H, W] when ``gray`` else [H, W, 3]; one-line errors."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise FxpassError(f"{p}: no such file")
    if p.is_dir():
        raise FxpassError(f"{p}: is a directory, expected an image file")
    try:
        with Image.open(p) as img:
            img.load()
            if img.size != (size, size):
                raise FxpassError(f"{p}: {what} is {img.size[0]}x{img.size[1]} pixels, the model takes {size}x{size}")
            if img.mode in _SIXTEEN_BIT:
                a = np.clip(np.asarray(img, dtype=np.float64) / 65535.0, 0.0, 1.0)
                if a.ndim == 3:
                    a = a[..., 0]
                return a if gray else np.repeat(a[..., None], 3, axis=2)
            if img.mode == "F":
                raise FxpassError(f"{p}: {what} has 32-bit float pixels; use an 8- or 16-bit image")
            return np.asarray(img.convert("L" if gray else "RGB"), dtype=np.float64) / 255.0
    except UnidentifiedImageError:
        raise FxpassError(f"{p}: not an image file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise FxpassError(f"{p}: not a readable image ({text})") from None


def load_image(path: str | Path, size: int) -> np.ndarray:
    """A grayscale or RGB image as float32 [1, 3, size, size] in [-1, 1] (gray is repeated)."""
    a = _read(path, size, "image", gray=False)
    return (a.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)


def load_mask(path: str | Path, size: int) -> np.ndarray:
    """A mask as float32 [1, 1, size, size]: 1 where the pixel is light (known, kept), 0 where dark."""
    keep = (_read(path, size, "mask", gray=True) >= 0.5).astype(np.float32)
    known = int(keep.sum())
    if known == 0:
        raise FxpassError(f"{path}: mask has no known (white) pixels; RePaint needs some to keep")
    if known == keep.size:
        raise FxpassError(f"{path}: mask has no unknown (black) pixels; there is nothing to inpaint")
    return keep[None, None]


def encode_png(x: np.ndarray) -> bytes:
    """[3, H, W] in [-1, 1] as an 8-bit RGB PNG."""
    from PIL import Image

    pixels = np.clip(np.rint((np.asarray(x, dtype=np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


# ---- the command -------------------------------------------------------------------------------
def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer ≥ ``minimum``, refused as "expected a ``what`` integer"."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value

    return parse


_positive = _int_at_least(1, "positive")
_seed = _int_at_least(0, "non-negative")


def _progress_bar():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
    )


def cmd_sample(args) -> int:
    from rich.console import Console

    from .fileio import atomic_write_bytes, check_writable_target
    from .sampler import GeneratorNoise, OnnxDenoiser, count_model_calls, descent_schedule, jump_schedule, sample_loop

    out = check_writable_target(args.out)
    if not args.ddpm:
        if args.image is None or args.mask is None:
            raise FxpassError("sample: --image IMG.png and --mask MASK.png are required (or --ddpm for plain generation)")
        for path in (args.image, args.mask):  # cheap checks before loading the model
            if not Path(path).exists():
                raise FxpassError(f"{path}: no such file")
    model = OnnxDenoiser(args.model)
    steps, size = model.diffusion.num_steps, model.image_size
    if args.ddpm:
        gt = mask = None
        times = descent_schedule(steps)
        what = f"DDPM generation over {steps} steps"
    else:
        t_T = steps if args.t_T is None else args.t_T
        if t_T > steps:
            raise FxpassError(f"{args.model}: --t-T {t_T} is more than the model's {steps} respaced steps")
        gt = load_image(args.image, size)
        mask = load_mask(args.mask, size)
        times = jump_schedule(t_T, args.jump_length, args.jump_n_sample)
        what = f"RePaint (t_T {t_T}, jump_length {args.jump_length}, jump_n_sample {args.jump_n_sample})"
    total = count_model_calls(times)
    t0 = time.perf_counter()
    with _progress_bar() as bar:
        task = bar.add_task("sampling", total=total)
        x = sample_loop(model, model.diffusion, times, (1, 3, size, size), noise=GeneratorNoise(args.seed),
                        gt=gt, mask=mask, on_step=lambda done, _total: bar.update(task, completed=done))
    if not np.isfinite(x).all():
        raise FxpassError(f"{args.model}: the model produced non-finite values; nothing written")
    png = encode_png(x[0])
    atomic_write_bytes(out, lambda fh: fh.write(png))
    Console(highlight=False, soft_wrap=True).print(
        f"wrote {out}: {what}, {total} model calls, seed {args.seed}, {time.perf_counter() - t0:.1f} s"
    )
    return 0


def add_commands(sub, common):
    p = sub.add_parser("sample", parents=[common], help="RePaint inpainting on a lowered ONNX model (no torch)",
                       description="RePaint inpainting with ONNX Runtime on a table-mode model from fxpass lower. "
                                   "Mask: white = known pixels to keep, black = pixels to inpaint.")
    p.add_argument("model", metavar="MODEL.onnx", help="table-mode ONNX model written by fxpass lower")
    p.add_argument("--image", metavar="IMG.png", help="image to inpaint (grayscale or RGB, image_size square)")
    p.add_argument("--mask", metavar="MASK.png", help="white = known pixels to keep, black = to inpaint")
    p.add_argument("-o", "--out", required=True, metavar="RESULT.png", help="output PNG (written atomically)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of all the noise (default 0)")
    p.add_argument("--t-T", dest="t_T", type=_positive, default=None, metavar="N",
                   help="start index of RePaint's schedule (default: the number of respaced steps)")
    p.add_argument("--jump-length", type=_positive, default=10, metavar="N", help="steps per jump back (default 10)")
    p.add_argument("--jump-n-sample", type=_positive, default=10, metavar="N",
                   help="passes over each jump section (default 10; 1 = no resampling)")
    p.add_argument("--ddpm", action="store_true",
                   help="plain generation over the respaced schedule: no resampling, no image or mask")
    p.set_defaults(func=cmd_sample)
