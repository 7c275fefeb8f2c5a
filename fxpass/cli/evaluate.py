"""``fxpass evaluate MODEL.onnx --data DIR``: RePaint against trivial fills on the user's images, without torch.

Parses, plans the output, calls :func:`fxpass.inpainting.evaluate`, prints a table per mask and writes
the JSON report atomically.  Only NumPy, Pillow, SciPy, scikit-image, rich and ONNX Runtime are
imported on this path (a test checks that torch stays out of ``sys.modules``).
"""

from __future__ import annotations

import argparse
import json
import time

from ..errors import FxpassError
from . import args as shared
from . import sampling
from .output import console


def _mask_kinds(text: str) -> tuple[str, ...]:
    from ..inpainting import parse_mask_kinds

    try:
        return parse_mask_kinds(text)
    except FxpassError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _table(report: dict):
    """Per mask (and all cases): the mean PSNR and SSIM of each method in the unknown region, and the
    diffusion sampler's margin over the better trivial fill (the report's "repaint" rows, whichever
    --sampler made them)."""
    from rich import box
    from rich.table import Table

    from ..inpainting import METHODS

    s = report["settings"]
    short = {"repaint": s["method"].partition(" ")[0], "mean_fill": "mean", "nearest_fill": "nearest"}
    table = Table(title=f"inpainted region, mean of {s['images']} image(s): {s['method']}, seed {s['seed']} vs "
                        "mean-colour and nearest-pixel fills (PSNR in dB)",
                  box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    table.add_column("mask\n(unknown)", no_wrap=True)
    for metric in ("PSNR", "SSIM"):
        for method in METHODS:
            table.add_column(f"{metric}\n{short[method]}", justify="right")
        table.add_column(f"{metric}\nmargin", justify="right")
    rows = [(f"{kind} {report['masks'][kind]['unknown_fraction']:.0%}", means)
            for kind, means in report["per_mask"].items()]
    rows.append(("all", report["overall"]))
    for label, means in rows:
        margin = means["repaint_margin"]
        table.add_row(label,
                      *(f"{means[m]['psnr']:.2f}" for m in METHODS), f"{margin['psnr']:+.2f}",
                      *(f"{means[m]['ssim']:.3f}" for m in METHODS), f"{margin['ssim']:+.3f}")
    return table


def run(args) -> int:
    from ..fileio import plan_outputs

    out = plan_outputs({"-o": args.out}, inputs=[args.model, args.data], force=args.force).get("-o")
    try:
        import scipy.ndimage  # noqa: F401  (scikit-image brings SciPy)
        import skimage.metrics  # noqa: F401
    except ImportError as exc:
        raise FxpassError(f"evaluate needs scikit-image (pip install 'fxpass[metrics]'): {exc}") from None
    from ..denoisers import OnnxDenoiser
    from ..fileio import atomic_write_bytes
    from ..inpainting import evaluate, fixed_masks, image_files, load_image_dir

    files = image_files(args.data, args.count)  # cheap checks before loading the model
    settings = sampling.settings_from(args)
    model = OnnxDenoiser(args.model)
    size = model.image_size
    sampling.plan(settings, model.diffusion, args.model, "evaluate")  # bad knobs before loading the images
    images = load_image_dir(args.data, size, args.count)
    masks = fixed_masks(size, args.masks, args.seed)
    t0 = time.perf_counter()
    from .sample import _progress_bar

    with _progress_bar() as bar:
        task = bar.add_task("evaluating", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        report = evaluate(model, images, masks, seed=args.seed, settings=settings, progress=progress,
                          names=[f.name for f in files])
    report = {"model": str(args.model), "data": str(args.data), "precision": model.meta.precision,
              "image_files": [f.name for f in files], **report}
    console().print(_table(report), soft_wrap=True)
    summary = (f"{len(report['cases'])} cases, {report['settings']['model_calls_per_case']} model calls each, "
               f"{time.perf_counter() - t0:.1f} s")
    if out is not None:
        text = json.dumps(report, indent=1, allow_nan=False) + "\n"
        atomic_write_bytes(out, lambda fh: fh.write(text.encode("utf-8")))
        summary = f"wrote {out}: {summary}"
    console().print(summary, soft_wrap=True)
    return 0


def add_parser(sub, common) -> None:
    from ..inpainting import MASK_KINDS

    p = sub.add_parser("evaluate", parents=[common],
                       help="inpainting quality of a lowered model on your images: RePaint vs trivial fills (no torch)",
                       description="Inpaint every image of --data with fixed masks by RePaint, or --sampler ddim/ddnm (ONNX Runtime, a "
                                   "table-mode model from fxpass lower) and by two fills that need no model (the "
                                   "known pixels' mean colour; the nearest known pixel), and compare PSNR and SSIM "
                                   "in the inpainted region.")
    p.add_argument("model", metavar="MODEL.onnx", help="table-mode ONNX model written by fxpass lower")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="directory of image_size x image_size images (grayscale or RGB), taken sorted by name")
    p.add_argument("-o", "--out", metavar="REPORT.json", help="JSON report: every case and the means (written atomically)")
    p.add_argument("--masks", type=_mask_kinds, default=MASK_KINDS, metavar="KINDS",
                   help=f"comma-separated mask kinds from {','.join(MASK_KINDS)} (default: all); box = centre "
                        "square of half the side, half = right half, strokes = seeded thick strokes")
    p.add_argument("--count", type=shared.positive, default=None, metavar="N",
                   help="evaluate the first N images (default: all)")
    p.add_argument("--seed", type=shared.seed_type, default=0,
                   help="seed of the strokes mask and of all the noise; case k uses seed + k (default 0)")
    sampling.add_arguments(p)
    shared.add_force(p, "overwrite an existing report")
    p.set_defaults(func=run)
