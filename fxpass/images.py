"""Images in and out for the sampler, torch-free: PNG/TIFF/... to float32 arrays in [-1, 1] and back."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .errors import FxpassError

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
#: images are refused above this many pixels before any pixel is decoded (a model takes at most 4096²)
MAX_PIXELS = 4096 * 4096


def _read(path: str | Path, size: int, what: str, gray: bool) -> np.ndarray:
    """Pixels of ``path`` in [0, 1], [H, W] when ``gray`` else [H, W, 3]; one-line errors."""
    from PIL import Image, UnidentifiedImageError

    from .fileio import check_input_file

    p = check_input_file(path, "an image file")
    try:
        with Image.open(p) as img:  # reads the header only: the size is checked before decoding
            if img.size[0] * img.size[1] > MAX_PIXELS:
                raise FxpassError(f"{p}: {what} is {img.size[0]}x{img.size[1]} pixels, more than fxpass opens "
                                  f"({MAX_PIXELS:,})")
            if img.size != (size, size):
                raise FxpassError(f"{p}: {what} is {img.size[0]}x{img.size[1]} pixels, the model takes {size}x{size}")
            img.load()
            if img.mode in _SIXTEEN_BIT:
                raw = np.asarray(img, dtype=np.float64)
                if raw.size and (raw.max() > 65535 or raw.min() < 0):
                    raise FxpassError(f"{p}: {what} has 32-bit integer pixels (values up to {raw.max():.0f}); "
                                      "use an 8- or 16-bit image")
                a = np.clip(raw / 65535.0, 0.0, 1.0)
                if a.ndim == 3:
                    a = a[..., 0]
                return a if gray else np.repeat(a[..., None], 3, axis=2)
            if img.mode == "F":
                raise FxpassError(f"{p}: {what} has 32-bit float pixels; use an 8- or 16-bit image")
            return np.asarray(img.convert("L" if gray else "RGB"), dtype=np.float64) / 255.0
    except UnidentifiedImageError:
        raise FxpassError(f"{p}: not an image file") from None
    except Image.DecompressionBombError:
        raise FxpassError(f"{p}: {what} has more pixels than fxpass opens (a decompression bomb?)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise FxpassError(f"{p}: not a readable image ({text})") from None


def load_image(path: str | Path, size: int, channels: int = 3) -> np.ndarray:
    """A grayscale or RGB image as float32 [1, channels, size, size] in [-1, 1]: 3 channels (gray is repeated)
    or 1 (a grayscale model's: RGB is converted to luminance)."""
    if channels not in (1, 3):
        raise FxpassError(f"{path}: a model of {channels} image channels (fxpass reads images as 1 or 3)")
    if channels == 1:
        return (_read(path, size, "image", gray=True)[None, None] * 2.0 - 1.0).astype(np.float32)
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
    """[3, H, W] (or [1, H, W]: grayscale) in [-1, 1] as an 8-bit RGB (gray) PNG."""
    from PIL import Image

    pixels = np.clip(np.rint((np.asarray(x, dtype=np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    if pixels.shape[0] == 1:
        Image.fromarray(np.ascontiguousarray(pixels[0]), mode="L").save(buffer, format="PNG")
    else:
        Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def image_files(directory: str | Path, count: int | None = None) -> list[Path]:
    """The first ``count`` (default all) image files of ``directory``, sorted by name; one-line errors."""
    d = Path(directory)
    if not d.exists():
        raise FxpassError(f"{d}: no such directory")
    if not d.is_dir():
        raise FxpassError(f"{d}: not a directory, expected a directory of images")
    try:
        names = sorted(p for p in d.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    except OSError as exc:
        raise FxpassError(f"{d}: cannot list ({exc.strerror or exc})") from None
    if not names:
        raise FxpassError(f"{d}: no images ({', '.join(IMAGE_SUFFIXES)}) in this directory")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise FxpassError(f"count must be a positive integer, got {count!r}")
        if count > len(names):
            raise FxpassError(f"{d}: {len(names)} image{'s' if len(names) != 1 else ''} in this directory, "
                              f"{count} asked for")
        names = names[:count]
    return names


def load_image_dir(directory: str | Path, size: int, count: int | None = None, channels: int = 3) -> np.ndarray:
    """The first ``count`` images of ``directory`` (sorted by name), each exactly size x size, as
    float32 [N, channels, size, size] in [-1, 1] (:func:`load_image`); an error names the first bad file."""
    return np.concatenate([load_image(p, size, channels) for p in image_files(directory, count)])
