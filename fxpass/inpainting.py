"""An inpainting evaluation of a lowered model on the user's images (``fxpass evaluate``), torch-free.

Every image of a directory is cut with every one of a few fixed masks (:func:`fixed_masks`, 1 = known
pixel kept, 0 = to inpaint), inpainted with RePaint (or DDIM/DDNM: :mod:`fxpass.samplers`, over a runtime
denoiser) and with two trivial fills that need no model (:func:`fill_mean`, :func:`fill_nearest`), and
each result is scored against the ground truth in the unknown region only (:func:`masked_psnr`,
:func:`masked_ssim`).  A model that learned something beats both fills; the report says by how much.

Conventions: images are float32 [N, 3, H, W] in [-1, 1]; a mask is float32 [1, 1, H, W].  Every
result is composited before scoring (ground truth where the mask is 1, the method's pixels where it is
0) and clipped to [-1, 1], as writing it as an image would: SSIM windows at the border of the unknown
region then see the same known pixels for every method.  Case ``k`` (image ``k // len(masks)``, mask
``k % len(masks)``) draws all its noise from ``GeneratorNoise(seed + k)``, so one seed gives one report.

Only NumPy, Pillow, SciPy and scikit-image (the ``metrics`` extra) are imported here, plus whatever the
denoiser needs (ONNX Runtime for :class:`fxpass.denoisers.OnnxDenoiser`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from .errors import FxpassError
from .images import IMAGE_SUFFIXES, image_files, load_image_dir  # noqa: F401  (re-exported)

#: the mask kinds :func:`fixed_masks` draws, in report order
MASK_KINDS = ("box", "half", "strokes")
#: file name endings :func:`image_files` takes as images (case-insensitive)
#: PSNR of a result equal to the ground truth in the unknown region (instead of inf, so that means and
#: the JSON report stay finite): an MSE of 4e-10 on [-1, 1] data, far below float32 rounding of pixels
PSNR_MAX = 100.0
#: the methods of a case, in report order
METHODS = ("repaint", "mean_fill", "nearest_fill")
TRIVIAL = ("mean_fill", "nearest_fill")
#: how a report's scores are made
METRICS_NOTE = ("in the unknown region (mask 0) of results composited with the ground truth and clipped to [-1, 1]; "
                f"PSNR data range 2, capped at {PSNR_MAX:g} dB; SSIM (scikit-image) map averaged over the unknown pixels")

Progress = Callable[[int, int], None]


# ---- masks ---------------------------------------------------------------------------------
def _box(size: int) -> np.ndarray:
    keep = np.ones((size, size), dtype=np.float32)
    side = max(1, size // 2)
    lo = (size - side) // 2
    keep[lo:lo + side, lo:lo + side] = 0
    return keep


def _half(size: int) -> np.ndarray:
    keep = np.ones((size, size), dtype=np.float32)
    keep[:, size // 2:] = 0
    return keep


def _strokes(size: int, seed: int) -> np.ndarray:
    """3 to 5 straight strokes of width about size/10 with round ends, endpoints uniform in the image."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, 0x57])  # its own stream: not the sampler's GeneratorNoise(seed)
    width = max(1, round(size / 10))
    canvas = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(canvas)
    r = width / 2
    for _ in range(int(rng.integers(3, 6))):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size - 1, 4))
        draw.line([(x0, y0), (x1, y1)], fill=0, width=width)
        for x, y in ((x0, y0), (x1, y1)):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=0)
    return (np.asarray(canvas) >= 128).astype(np.float32)


def parse_mask_kinds(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"box,half"`` (or a sequence) as a tuple of known kinds, duplicates dropped; FxpassError otherwise."""
    items = text.split(",") if isinstance(text, str) else list(text)
    kinds: list[str] = []
    for item in (i.strip() for i in items):
        if item not in MASK_KINDS:
            raise FxpassError(f"unknown mask kind {item!r}; choose from {','.join(MASK_KINDS)}")
        if item not in kinds:
            kinds.append(item)
    if not kinds:
        raise FxpassError(f"no mask kinds given; choose from {','.join(MASK_KINDS)}")
    return tuple(kinds)


def fixed_masks(size: int, kinds: str | Sequence[str] = MASK_KINDS, seed: int = 0) -> dict[str, np.ndarray]:
    """``{kind: float32 [1, 1, size, size]}``, 1 = known pixel kept, 0 = to inpaint; deterministic.

    ``box``: the centre square of half the side unknown (a quarter of the pixels); ``half``: the right
    half unknown; ``strokes``: 3 to 5 thick random line segments unknown, drawn from ``seed`` (the same
    for every image of a run).
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 2:
        raise FxpassError(f"masks need an image size of at least 2 pixels, got {size!r}")
    masks = {}
    for kind in parse_mask_kinds(kinds):
        keep = _box(size) if kind == "box" else _half(size) if kind == "half" else _strokes(size, seed)
        masks[kind] = keep[None, None]
    return masks


def unknown_fraction(mask: np.ndarray) -> float:
    return float(1.0 - np.asarray(mask, dtype=np.float64).mean())


# ---- trivial fills -------------------------------------------------------------------------
def _as_nchw(gt: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt, dtype=np.float32)
    if gt.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {gt.shape}")
    keep = np.asarray(mask, dtype=np.float32)
    if keep.ndim != 4 or keep.shape[1] != 1 or keep.shape[2:] != gt.shape[2:] or keep.shape[0] not in (1, gt.shape[0]):
        raise ValueError(f"mask must be [1 or N, 1, H, W] for images {gt.shape}, got {keep.shape}")
    keep = np.broadcast_to(keep >= 0.5, (gt.shape[0], 1, *gt.shape[2:]))
    if not keep.any(axis=(1, 2, 3)).all():
        raise ValueError("a mask has no known pixels to fill from")
    return gt, keep


def fill_mean(gt: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Every unknown pixel (mask 0) takes the mean colour of the image's known pixels (mask 1)."""
    gt, keep = _as_nchw(gt, mask)
    out = gt.copy()
    for n in range(gt.shape[0]):
        k = keep[n, 0]
        colour = gt[n][:, k].mean(axis=1)  # [C]
        out[n][:, ~k] = colour[:, None]
    return out


def fill_nearest(gt: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Every unknown pixel takes the value of the nearest known pixel (Euclidean distance; SciPy's
    exact distance transform picks among equally near ones)."""
    from scipy.ndimage import distance_transform_edt

    gt, keep = _as_nchw(gt, mask)
    out = gt.copy()
    for n in range(gt.shape[0]):
        # the transform measures the distance to the nearest zero: known pixels are the zeros here
        _, (rows, cols) = distance_transform_edt(~keep[n, 0], return_indices=True)
        out[n] = gt[n][:, rows, cols]
    return out


# ---- metrics in the unknown region ---------------------------------------------------------
def _metric_inputs(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image as float64 [C, H, W] pair and the unknown pixels as bool [H, W]."""
    gt = np.asarray(gt, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if gt.ndim != 3 or pred.shape != gt.shape:
        raise ValueError(f"expected two [C, H, W] images of one shape, got {gt.shape} and {pred.shape}")
    unknown = np.asarray(mask).reshape(gt.shape[1:]) < 0.5
    if not unknown.any():
        raise ValueError("the mask has no unknown pixels to score")
    return gt, pred, unknown


def masked_psnr(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, data range 2 for [-1, 1]) over the unknown pixels (mask 0) of every channel of one
    [C, H, W] image; :data:`PSNR_MAX` where they are equal."""
    from skimage.metrics import mean_squared_error, peak_signal_noise_ratio

    gt, pred, unknown = _metric_inputs(gt, pred, mask)
    a, b = gt[:, unknown], pred[:, unknown]
    if mean_squared_error(a, b) <= 4.0 * 10.0 ** (-PSNR_MAX / 10.0):
        return PSNR_MAX
    return float(peak_signal_noise_ratio(a, b, data_range=2.0))


def masked_ssim(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
    """SSIM (scikit-image, data range 2, 7x7 windows or the largest odd size that fits) of one
    [C, H, W] image: the full SSIM map, averaged over the unknown pixels (mask 0) of every channel."""
    from skimage.metrics import structural_similarity

    gt, pred, unknown = _metric_inputs(gt, pred, mask)
    side = min(gt.shape[1:])
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {gt.shape[1]}x{gt.shape[2]}")
    _, ssim_map = structural_similarity(gt, pred, channel_axis=0, data_range=2.0, full=True, win_size=win)
    return float(ssim_map[:, unknown].mean())


def score(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    return {"psnr": masked_psnr(gt, pred, mask), "ssim": masked_ssim(gt, pred, mask)}


def composite(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Ground truth where the mask is 1, ``pred`` clipped to [-1, 1] where it is 0."""
    keep = np.asarray(mask, dtype=np.float32) >= 0.5
    return np.where(keep, np.asarray(gt, dtype=np.float32), np.clip(np.asarray(pred, dtype=np.float32), -1.0, 1.0))


# ---- the evaluation ------------------------------------------------------------------------
def _means(rows: list[dict]) -> dict:
    out = {m: {k: float(np.mean([r[m][k] for r in rows])) for k in ("psnr", "ssim")} for m in METHODS}
    margin = {}
    for k in ("psnr", "ssim"):
        best = max(TRIVIAL, key=lambda m: out[m][k])
        margin[k] = out["repaint"][k] - out[best][k]
        margin[f"{k}_best_trivial"] = best
    out["repaint_margin"] = margin
    out["cases"] = len(rows)
    return out


def check_cases(images: np.ndarray, masks: dict[str, np.ndarray], size: int, names: Sequence[str] | None) -> None:
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1] not in (1, 3) or images.shape[2:] != (size, size):
        raise FxpassError(f"evaluate: images must be [N, 3 or 1, {size}, {size}] for this model, got {list(images.shape)}")
    if not masks:
        raise FxpassError("evaluate: no masks")
    for kind, m in masks.items():
        if np.shape(m) != (1, 1, size, size):
            raise FxpassError(f"evaluate: mask {kind!r} has shape {list(np.shape(m))}, expected [1, 1, {size}, {size}]")
        frac = unknown_fraction(m)
        if not 0.0 < frac < 1.0:
            raise FxpassError(f"evaluate: mask {kind!r} has {'no' if frac == 0 else 'only'} unknown pixels")
    if names is not None and len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} images")


def inpaint(sampler, denoiser, gt: np.ndarray, mask: np.ndarray, seed: int, on_step: Progress | None = None,
            what: str = "") -> np.ndarray:
    """``sampler``'s inpainting of ``gt`` [1, 3, H, W] under ``mask`` on ``denoiser`` with noise
    ``GeneratorNoise(seed)``, composited with the ground truth; FxpassError for non-finite output."""
    from .sampler import GeneratorNoise
    from .samplers import run_plan

    x = run_plan(sampler, denoiser, gt.shape, noise=GeneratorNoise(seed), gt=gt, mask=mask, on_step=on_step)
    if not np.isfinite(x).all():
        where = getattr(denoiser, "path", "the model")
        raise FxpassError(f"{where}: the model produced non-finite values ({what})")
    return composite(gt, x, mask)


def evaluate(denoiser, images: np.ndarray, masks: dict[str, np.ndarray], *, seed: int = 0, jump_length: int = 10,
             jump_n_sample: int = 10, t_T: int | None = None, progress: Progress | None = None,
             names: Sequence[str] | None = None, settings=None, inpaint_cases=None) -> dict:
    """Inpaint every image of ``images`` [N, 3, H, W] with every mask of ``masks`` (``{kind: [1, 1, H, W]}``)
    by a diffusion sampler on ``denoiser`` and by the two trivial fills, and score all in the unknown region.

    The sampler is ``settings`` (a :class:`fxpass.samplers.Settings`), or RePaint with ``t_T``,
    ``jump_length`` and ``jump_n_sample`` when it is None; its results are the "repaint" method whichever
    sampler made them.  Returns ``{"settings", "masks", "cases", "per_mask", "overall", "seconds"}``: a row
    per case (image, mask, its noise seed, PSNR/SSIM of each method), the means per mask and over all
    cases, each with ``repaint_margin`` (the sampler's mean minus the better trivial fill's, for PSNR and
    SSIM separately).  ``progress(done, total)`` counts model calls over the whole run.  ``names`` label
    the images.  ``inpaint_cases(cases)``, where given, inpaints the (image, mask, seed, label) cases
    elsewhere (``fxpass evaluate --ray``) and yields :func:`inpaint`'s results in their order.
    """
    from .samplers import Settings

    images = np.asarray(images, dtype=np.float32)
    size = int(denoiser.image_size)
    check_cases(images, masks, size, names)
    if settings is None:
        settings = Settings("repaint", t_T=t_T, jump_length=jump_length, jump_n_sample=jump_n_sample)
    steps = denoiser.diffusion.num_steps
    try:
        sampler = settings.build(denoiser.diffusion)
    except ValueError as exc:
        raise FxpassError(f"evaluate: {exc}") from None
    calls_per_case = sampler.calls
    kinds = list(masks)
    total = calls_per_case * len(images) * len(kinds)
    keys = [(i, kind) for i in range(len(images)) for kind in kinds]
    cases = [(images[i:i + 1], np.asarray(masks[kind], dtype=np.float32), seed + k, f"image {i}, mask {kind}")
             for k, (i, kind) in enumerate(keys)]
    rows: list[dict] = []
    start = time.perf_counter()
    if inpaint_cases is None:
        results = (inpaint(sampler, denoiser, gt, mask, s, None if progress is None else
                           (lambda d, _t, base=k * calls_per_case: progress(base + d, total)), what)
                   for k, (gt, mask, s, what) in enumerate(cases))
    else:
        results = inpaint_cases(cases)
    for k, ((i, kind), (gt, mask, case_seed, _), x) in enumerate(zip(keys, cases, results)):
        if inpaint_cases is not None and progress is not None:
            progress((k + 1) * calls_per_case, total)
        results_of = {"repaint": x, "mean_fill": fill_mean(gt, mask), "nearest_fill": fill_nearest(gt, mask)}
        row = {"image": i, "mask": kind, "seed": case_seed}
        if names is not None:
            row["name"] = str(names[i])
        for method in METHODS:
            row[method] = score(gt[0], results_of[method][0], mask[0])
        rows.append(row)
    seconds = time.perf_counter() - start
    return {
        "settings": {"seed": seed, "sampler": settings.sampler, **settings.knobs(steps),
                     "method": settings.label(steps), "model_calls_per_case": calls_per_case, "images": len(images), "image_size": size,
                     "noise": "GeneratorNoise(seed + case), case = image * len(masks) + mask",
                     "metrics": METRICS_NOTE},
        "masks": {kind: {"unknown_fraction": unknown_fraction(masks[kind])} for kind in kinds},
        "cases": rows,
        "per_mask": {kind: _means([r for r in rows if r["mask"] == kind]) for kind in kinds},
        "overall": _means(rows),
        "seconds": round(seconds, 2),
        "seconds_per_case": round(seconds / len(rows), 3),
    }
