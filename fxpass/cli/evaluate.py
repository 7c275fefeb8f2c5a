"""``fxpass evaluate MODEL.onnx --data DIR``: RePaint against trivial fills on the user's images, without torch.

Parses, plans the output, calls :func:`fxpass.inpainting.evaluate`, prints a table per mask and writes
the JSON report atomically; with ``--run`` (or ``--preset A,B,...``), :func:`fxpass.compare_runs.compare` and
:mod:`.runs_view`; with ``--tune --budget CALLS -o PRESET.json``, :func:`fxpass.tune.tune` and a preset file.
Only NumPy, Pillow, SciPy, scikit-image, rich and ONNX Runtime are imported on this path (a test checks that
torch stays out of ``sys.modules``).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

from ..errors import FxpassError
from . import args as shared
from . import runs_view, sampling
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


def _runs(args):
    """The ``--run`` entries, or the entries of a ``--preset`` list, as (label, Settings) pairs (None for neither);
    FxpassError for a bad entry, for either beside the single-sampler flags, for ``--plot`` without runs or
    without matplotlib."""
    presets = sampling.preset_entries(args.preset) if args.preset is not None else []
    if len(presets) > 1 and not args.run:
        given = [flag for flag in sampling.given_flags(args) if flag != "--preset"]
        if given:
            raise FxpassError(f"--preset {args.preset} sets the samplers and their knobs: drop {', '.join(given)}")
        runs = [(f"--preset {entry}", sampling.preset_settings(entry)) for entry in presets]
    elif args.run:
        given = sampling.given_flags(args)
        if given:
            raise FxpassError(f"--run and {given[0]} do not go together: put the sampler and its knobs in the --run "
                              "entries (e.g. --run ddim:steps=25)")
        runs = [(f"--run {spec}", sampling.settings_from_spec(spec)) for spec in args.run]
    else:
        if args.plot:
            raise FxpassError("--plot draws the --run entries against each other: give at least one --run "
                              "(or a --preset list)")
        return None
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise FxpassError("--plot: matplotlib is not installed (pip install 'fxpass[plot]')")
    return runs


def _load(args):
    """(image files, the model, the images, the masks), each checked before the next is loaded."""
    from ..denoisers import OnnxDenoiser
    from ..inpainting import fixed_masks, image_files, load_image_dir

    files = image_files(args.data, args.count)  # cheap checks before loading the model
    model = OnnxDenoiser(args.model)
    return files, model, load_image_dir(args.data, model.image_size, args.count, model.channels), \
        fixed_masks(model.image_size, args.masks, args.seed)


def _with_model(args, model, files, report: dict) -> dict:
    """``report`` headed by what it was made from: the model, the data, its precision and the image files."""
    return {"model": str(args.model), "data": str(args.data), "precision": model.meta.precision,
            "image_files": [f.name for f in files], **report}


def _with_progress(work, what: str = "evaluating"):
    """``work(progress)`` under a progress bar counting model calls."""
    from .sample import _progress_bar

    with _progress_bar() as bar:
        task = bar.add_task(what, total=None)
        return work(lambda done, total: bar.update(task, completed=done, total=total))


def _compare(args, entries, outs) -> int:
    """The runs (label, Settings) on the same cases: a table, the JSON report, the plot."""
    from ..compare_runs import compare

    files, model, images, masks = _load(args)
    for label, settings in entries:  # bad knobs before any model call
        sampling.plan(settings, model.diffusion, f"{args.model}: {label}", f"evaluate: {label}")
    runs = [settings for _, settings in entries]
    sampling.load_cache(model, runs)
    t0 = time.perf_counter()
    report = _with_progress(lambda progress: compare(model, images, masks, runs, seed=args.seed, progress=progress,
                                                     names=[f.name for f in files]))
    report = _with_model(args, model, files, report)
    return runs_view.show(report, outs, time.perf_counter() - t0, force=args.force)


def _tune_checks(args) -> None:
    """One line for each way ``--tune`` is asked for wrongly, before anything is read."""
    from ..tune import check_name

    given = [*sampling.given_flags(args), *(["--run"] if args.run else []), *(["--plot"] if args.plot else [])]
    if given:
        raise FxpassError(f"--tune searches the sampler and its knobs itself: drop {', '.join(given)}")
    missing = [flag for flag, value in (("--budget CALLS", args.budget), ("-o PRESET.json", args.out)) if value is None]
    if missing:
        raise FxpassError(f"--tune needs {' and '.join(missing)}: the model calls per image it may spend and the "
                          "preset file to write")
    if not sampling.is_preset_file(str(args.out)):
        raise FxpassError(f"{args.out}: a preset file's name ends in .json (so that --preset tells it from a name)")
    check_name(args.out, Path(args.out).stem)


def _tune_table(doc: dict, shown: int = 5):
    """The best ``shown`` candidates: settings, calls (and cost), the cases they ran on, mean PSNR and SSIM."""
    from rich import box
    from rich.table import Table

    tuning = doc["tuning"]
    cached = tuning["shallow_to_full"] is not None
    t = Table(title=f"{len(tuning['candidates'])} candidates within {doc['budget']} model calls per image on "
                    f"{len(tuning['images'])} tuning image(s) x {len(tuning['masks'])} mask(s), seed {tuning['seed']}: "
                    f"the best {min(shown, len(tuning['candidates']))}, mean per image over the cases each ran",
              box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for name in ("rank", "candidate", "calls\n/image", *(["cost\n/image"] if cached else []), "cases",
                 "PSNR\n(dB)", "SSIM"):
        t.add_column(name, justify="left" if name == "candidate" else "right")
    for c in tuning["candidates"][:shown]:
        t.add_row(str(c["rank"]), c["label"], str(c["calls"]), *([f"{c['cost']:g}"] if cached else []),
                  str(c["cases"]), f"{c['psnr']:.2f}", f"{c['ssim']:.3f}")
    return t


def _tune(args) -> int:
    """``--tune``: search DDNM's knobs within ``--budget`` on the tuning images, measure the winner once on the
    held-apart ones, write the preset file."""
    from .. import tune
    from ..denoisers import OnnxDenoiser
    from ..fileio import plan_outputs
    from ..inpainting import fixed_masks, image_files, load_image_dir

    _tune_checks(args)
    out = plan_outputs({"-o": args.out}, inputs=[args.model, args.data], force=args.force)["-o"]
    _need_metrics()
    files = image_files(args.data, args.count)
    tune.split(len(files), args.data)  # cheap checks before loading the model
    model = OnnxDenoiser(args.model)
    ratio = None
    if model.meta.deep_cache is not None:
        model.load_shallow()
        ratio = tune.shallow_ratio(model)
    found = tune.candidates(model.diffusion, args.budget, ratio=ratio)
    images = load_image_dir(args.data, model.image_size, args.count, model.channels)
    masks = fixed_masks(model.image_size, args.masks, args.seed)
    t0 = time.perf_counter()
    doc = _with_progress(lambda progress: tune.tune(
        model, images, masks, found, budget=args.budget, name=out.stem, names=[f.name for f in files], seed=args.seed,
        ratio=ratio, progress=progress), "tuning")
    runs_view.write_json(out, doc, force=args.force)
    console().print(_tune_table(doc), soft_wrap=True)
    held, winner = doc["measured"]["held_apart"], doc["tuning"]["candidates"][0]
    lines = [f"held apart, {len(held['images'])} image(s) x {len(held['masks'])} mask(s), seed {held['seed']}: "
             f"PSNR {held['psnr']:.2f} dB, SSIM {held['ssim']:.3f}, {held['calls_per_image']:g} model calls and "
             f"{held['model_seconds_per_image']:.3g} model s per image ({tune.NOTE})"]
    if max(c.cost for c in found) < args.budget / 2:
        lines.append(f"note: no candidate spends more than {max(c.cost for c in found):g} of the {args.budget} calls "
                     f"per image on this model's {model.diffusion.num_steps}-step table")
    lines.append(f"wrote {out}: preset {out.stem!r}, {winner['label']}, {time.perf_counter() - t0:.1f} s; "
                 f"use it with --preset {out}")
    for line in lines:
        console().print(line, soft_wrap=True)
    return 0


def _need_metrics() -> None:
    try:
        import scipy.ndimage  # noqa: F401  (scikit-image brings SciPy)
        import skimage.metrics  # noqa: F401
    except ImportError as exc:
        raise FxpassError(f"evaluate needs scikit-image (pip install 'fxpass[metrics]'): {exc}") from None


def run(args) -> int:
    from ..fileio import plan_outputs

    if args.ray is not None and (args.tune or args.run or len(sampling.preset_entries(args.preset or "")) > 1):
        raise FxpassError("evaluate --ray runs one sampler's cases; --run, a --preset list and --tune run in process")
    if args.workers is not None and args.ray is None:
        raise FxpassError("evaluate: --workers is for --ray")
    if args.tune:
        return _tune(args)
    if args.budget is not None:
        raise FxpassError("--budget is the model calls per image that --tune may spend: give --tune too")
    runs = _runs(args)
    inputs = [args.model, args.data, *sampling.preset_files(args)]
    outs = plan_outputs({"-o": args.out, "--plot": args.plot}, inputs=inputs, force=args.force)
    _need_metrics()
    if runs is not None:
        return _compare(args, runs, outs)
    from ..inpainting import evaluate

    settings = sampling.settings_from(args)
    inpaint_cases = None
    if args.ray is not None:
        from ..batch_ray import ray_inpaint_cases

        inpaint_cases = ray_inpaint_cases(args.model, settings, address=args.ray, workers=args.workers)
    files, model, images, masks = _load(args)
    sampling.plan(settings, model.diffusion, args.model, "evaluate")
    sampling.load_cache(model, [settings])
    t0 = time.perf_counter()
    report = _with_progress(lambda progress: evaluate(model, images, masks, seed=args.seed, settings=settings,
                                                      progress=progress, names=[f.name for f in files],
                                                      inpaint_cases=inpaint_cases))
    report = _with_model(args, model, files, report)
    console().print(_table(report), soft_wrap=True)
    summary = (f"{len(report['cases'])} cases, {report['settings']['model_calls_per_case']} model calls each, "
               f"{time.perf_counter() - t0:.1f} s")
    out = outs.get("-o")
    if out is not None:
        runs_view.write_json(out, report, force=args.force)
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
    p.add_argument("-o", "--out", metavar="REPORT.json",
                   help="JSON report: every case and the means (written atomically); with --tune, the preset file")
    p.add_argument("--masks", type=_mask_kinds, default=MASK_KINDS, metavar="KINDS",
                   help=f"comma-separated mask kinds from {','.join(MASK_KINDS)} (default: all); box = centre "
                        "square of half the side, half = right half, strokes = seeded thick strokes")
    p.add_argument("--count", type=shared.positive, default=None, metavar="N",
                   help="evaluate the first N images (default: all)")
    p.add_argument("--seed", type=shared.seed_type, default=0,
                   help="seed of the strokes mask and of all the noise; case k uses seed + k (default 0)")
    sampling.add_arguments(p, many_presets=True)
    p.add_argument("--run", action="append", default=[], metavar="SPEC",
                   help="compare samplers on the same cases (repeatable, instead of --sampler and its knobs): a "
                        "preset name or file, SAMPLER or SAMPLER:knob=value,... with knobs t_T, jump_length, jump_n_sample, steps, eta, "
                        "travel_length, travel_repeat, e.g. ddnm:t_T=25,steps=25,travel_length=5,travel_repeat=3; "
                        "reports PSNR, SSIM, model calls and model seconds per image, and each run's paired "
                        "difference to the first")
    p.add_argument("--plot", metavar="FILE.png",
                   help="with --run: mean PSNR and SSIM against model seconds per image, a point per run "
                        "(needs matplotlib: pip install 'fxpass[plot]')")
    p.add_argument("--tune", action="store_true",
                   help="search DDNM's knobs (start, steps, eta, time travel; the cache interval on a --deep-cache "
                        "model) within --budget on every other image of --data (sorted by name), measure the best "
                        "once on the others, and write it as the preset file -o PRESET.json (for --preset)")
    p.add_argument("--budget", type=shared.positive, default=None, metavar="CALLS",
                   help="with --tune: model calls per image a candidate may make (on a --deep-cache model, full calls "
                        "+ shallow calls x their measured latency ratio)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="inpaint the cases on Ray (pip install 'fxpass[ray]'), the same report: no ADDRESS starts a "
                        "local Ray with this machine's cores, ADDRESS joins a cluster (ray start --head)")
    p.add_argument("--workers", type=shared.positive, default=None, metavar="N",
                   help="with --ray: N model-holding workers (default one per CPU of the Ray instance)")
    shared.add_force(p, "overwrite an existing report, plot or preset file")
    p.set_defaults(func=run)
