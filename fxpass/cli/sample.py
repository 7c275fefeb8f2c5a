"""``fxpass sample MODEL.onnx``: RePaint, DDIM or DDNM inpainting (or DDPM) on a lowered model, without torch.

``--sampler repaint`` (default) | ``ddim`` | ``ddnm`` with their knobs (:mod:`fxpass.cli.sampling`).

``--runtime ort`` (default) | ``openvino`` | ``openvino-bf16`` | ``litert`` (a ``.tflite`` file;
``fxpass.denoisers.RUNTIMES``).  Only NumPy, Pillow, rich, onnx and the runtime (ONNX Runtime, OpenVINO behind
Polygraphy, or LiteRT's interpreter) are imported on
this path (tests check that torch stays out of ``sys.modules``).  Exit 3, before loading the model, where
the runtime cannot run here (as ``fxpass check`` for an unavailable target).
"""

from __future__ import annotations

import time

from ..denoisers import RUNTIMES
from ..errors import FxpassError
from . import args as shared
from . import sample_batch, sampling
from .output import console


def _progress_bar():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
    )


def run(args) -> int:
    if args.images is not None:
        return sample_batch.run(args)
    sample_batch.refuse_batch_flags(args)
    from ..batch import load_sampler, render_png
    from ..denoisers import make_denoiser, runtime_unavailable_reason
    from ..fileio import atomic_write_bytes, check_input_file, plan_outputs
    from ..images import load_image, load_mask
    from ..sampler import descent_schedule
    from ..samplers import RePaint
    from ..verify import EXIT_UNAVAILABLE

    out = plan_outputs({"-o": args.out}, inputs=[args.model, args.image, args.mask, *sampling.preset_files(args)],
                       force=args.force)["-o"]
    settings = sampling.settings_from(args)  # knobs of another sampler, before loading the model
    if not args.ddpm:
        if args.image is None or args.mask is None:
            raise FxpassError("sample: --image IMG.png and --mask MASK.png are required (or --ddpm for plain generation)")
        for path in (args.image, args.mask):  # cheap checks before loading the model
            check_input_file(path, "an image")
    reason = runtime_unavailable_reason(args.runtime)
    if reason:
        console().print(f"unavailable: {reason}", soft_wrap=True)
        return EXIT_UNAVAILABLE
    gt = mask = None
    if args.ddpm and settings.sampler == "repaint":
        model = make_denoiser(args.model, args.runtime)
        sampling.load_cache(model, [settings])
        steps, size = model.diffusion.num_steps, model.image_size
        sampler = RePaint(model.diffusion, descent_schedule(steps))
        what = f"DDPM generation over {steps} steps"
    else:
        model, sampler = load_sampler(args.model, args.runtime, settings)
        steps, size = model.diffusion.num_steps, model.image_size
        what = settings.label(steps) + (" generation" if args.ddpm else "")
        if not args.ddpm:
            gt = load_image(args.image, size, model.channels)
            mask = load_mask(args.mask, size)
    total = sampler.calls
    t0 = time.perf_counter()
    with _progress_bar() as bar:
        task = bar.add_task("sampling", total=total)
        png = render_png(sampler, model, gt, mask, args.seed,
                         on_step=lambda done, _total: bar.update(task, completed=done))
    atomic_write_bytes(out, lambda fh: fh.write(png), exclusive=not args.force)
    console().print(f"wrote {out}: {what}, {total} model calls on {model.runtime}, seed {args.seed}, "
                    f"{time.perf_counter() - t0:.1f} s", soft_wrap=True)
    return 0


def add_parser(sub, common) -> None:
    p = sub.add_parser("sample", parents=[common], help="RePaint, DDIM or DDNM inpainting on a lowered ONNX model (no torch)",
                       description="RePaint (default), DDIM or DDNM inpainting with ONNX Runtime or OpenVINO on a table-mode model from "
                                   "fxpass lower. Mask: white = known pixels to keep, black = pixels to inpaint.",
                       epilog="exit status: 0 the image was written; 3 the --runtime cannot run here (OpenVINO "
                              "missing, no bf16 on this CPU), nothing done; 2 a usage or file error")
    p.add_argument("model", metavar="MODEL.onnx", help="table-mode ONNX model written by fxpass lower")
    p.add_argument("--image", metavar="IMG.png", help="image to inpaint (grayscale or RGB, image_size square)")
    p.add_argument("--mask", metavar="MASK.png", help="white = known pixels to keep, black = to inpaint (with --images: "
                                                      "one mask for every image)")
    p.add_argument("-o", "--out", required=True, metavar="RESULT.png|OUTDIR",
                   help="output PNG (written atomically); with --images, the output directory")
    sample_batch.add_arguments(p)
    p.add_argument("--seed", type=shared.seed_type, default=0, help="seed of all the noise (default 0)")
    sampling.add_arguments(p)
    p.add_argument("--ddpm", action="store_true",
                   help="plain generation over the respaced schedule: no resampling, no image or mask")
    p.add_argument("--runtime", choices=list(RUNTIMES), default="ort",
                   help="ort: ONNX Runtime CPU (default); openvino: OpenVINO CPU, f32; openvino-bf16: OpenVINO CPU "
                        "at bf16 inference precision (looser numerics; needs a CPU with bf16); litert: LiteRT's "
                        "interpreter on a .tflite file from fxpass lower --format tflite (pip install 'fxpass[tflite]')")
    shared.add_force(p, "overwrite an existing output")
    p.set_defaults(func=run)
