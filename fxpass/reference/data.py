"""The digits data of the reference model: sklearn's 8x8 digits as 32x32 RGB images in [-1, 1].

The split is fixed: a permutation of ``range(1797)`` drawn from ``np.random.default_rng(SEED)``;
its first ``HELD_OUT`` entries (sorted) are held out and never trained on.  ``split.json`` records
them; :func:`split_indices` recomputes them and checks that they agree.

Images go 0..16 -> [-1, 1] (x / 8 - 1), are upscaled 8 -> 32 px with torch's bilinear interpolation
(``align_corners=False``, which stays inside [-1, 1]) and replicated to 3 channels.

Run ``python -m fxpass.reference.data`` to (re)write ``split.json`` and the held-out PNGs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SPLIT_JSON = HERE / "split.json"
HELDOUT_DIR = HERE / "heldout"
SEED = 14  # the issue number
HELD_OUT = 197
NUM_DIGITS = 1797
IMAGE_SIZE = 32


@dataclass(frozen=True)
class Split:
    """Images float32 [N, 3, 32, 32] in [-1, 1], labels int64 [N], indices into load_digits() order."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray


def _load_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float64)  # [1797, 8, 8], values 0..16
    labels = np.asarray(digits.target, dtype=np.int64)
    if images.shape != (NUM_DIGITS, 8, 8):
        raise RuntimeError(f"unexpected load_digits() images of shape {images.shape}")
    return images, labels


def compute_split(seed: int = SEED, held_out: int = HELD_OUT) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices into load_digits() order, each sorted."""
    perm = np.random.default_rng(seed).permutation(NUM_DIGITS)
    return np.sort(perm[held_out:]), np.sort(perm[:held_out])


def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """The committed split; checked against ``split.json`` when that file exists."""
    train, held = compute_split()
    if SPLIT_JSON.is_file():
        recorded = json.loads(SPLIT_JSON.read_text(encoding="utf-8"))
        if recorded.get("seed") != SEED or recorded.get("heldout") != held.tolist():
            raise RuntimeError(f"{SPLIT_JSON} does not match the split drawn with seed {SEED}")
    return train, held


def to_images(digits8: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """[N, 8, 8] values 0..16 -> float32 [N, 3, size, size] in [-1, 1] (bilinear upscaling)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(digits8, dtype=np.float32) / 8.0 - 1.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(-1.0, 1.0).repeat(1, 3, 1, 1)
    return x.numpy().astype(np.float32)


def load_split() -> tuple[Split, Split]:
    """(train, held-out) as :class:`Split`; deterministic."""
    images, labels = _load_digits()
    train, held = split_indices()
    return (Split(to_images(images[train]), labels[train], train),
            Split(to_images(images[held]), labels[held], held))


def load_train() -> Split:
    return load_split()[0]


def load_heldout() -> Split:
    return load_split()[1]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    x = np.clip((np.asarray(images, dtype=np.float64) + 1.0) * 127.5, 0, 255)
    return np.rint(x).astype(np.uint8).transpose(0, 2, 3, 1)


def png_name(position: int, label: int) -> str:
    return f"digit-{position:04d}-label{label}.png"


def load_heldout_pngs(directory: str | Path = HELDOUT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """The held-out PNGs as float32 [N, 3, 32, 32] in [-1, 1] (8-bit quantised) and their labels."""
    from PIL import Image

    files = sorted(Path(directory).glob("digit-*-label*.png"))
    if not files:
        raise FileNotFoundError(f"{directory}: no digit-*.png files")
    images, labels = [], []
    for f in files:
        a = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)
        images.append(a.transpose(2, 0, 1) / 127.5 - 1.0)
        labels.append(int(f.stem.rsplit("label", 1)[1]))
    return np.stack(images).astype(np.float32), np.asarray(labels, dtype=np.int64)


def write_split_files() -> None:
    """Write split.json and heldout/*.png (deterministic content)."""
    from PIL import Image

    images, labels = _load_digits()
    train, held = compute_split()
    SPLIT_JSON.write_text(json.dumps({
        "source": "sklearn.datasets.load_digits()",
        "seed": SEED,
        "rule": f"np.random.default_rng(seed).permutation({NUM_DIGITS})[:{HELD_OUT}], sorted",
        "num_heldout": int(held.size),
        "num_train": int(train.size),
        "heldout": held.tolist(),
        "heldout_labels": labels[held].tolist(),
        "png": "heldout/digit-<position in heldout>-label<label>.png, 32x32 RGB, "
               "bilinear upscale of (v / 8 - 1), stored as round((x + 1) * 127.5)",
    }, indent=1) + "\n", encoding="utf-8")
    HELDOUT_DIR.mkdir(exist_ok=True)
    for old in HELDOUT_DIR.glob("digit-*.png"):
        old.unlink()
    pixels = to_uint8(to_images(images[held]))
    for pos, (img, lab) in enumerate(zip(pixels, labels[held])):
        Image.fromarray(img).save(HELDOUT_DIR / png_name(pos, int(lab)), optimize=False)


if __name__ == "__main__":
    write_split_files()
    train, held = load_split()
    print(f"train {train.images.shape}, held-out {held.images.shape}; wrote {SPLIT_JSON} and {HELDOUT_DIR}/")
