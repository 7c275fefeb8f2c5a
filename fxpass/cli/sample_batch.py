"""``fxpass sample MODEL --images DIR (--masks DIR | --mask FILE) -o OUTDIR [--ray [ADDRESS]]``: a directory of images.

Parses, builds a :class:`fxpass.batch.BatchJob` and calls :func:`fxpass.batch_run.run_batch`, showing progress
over the whole job (images done, failed, ETA) and a summary.  Exit 0 when every image is written (or was
already), 1 when any failed (each named in the summary and the manifest), 2 for a usage or file error, 3
where the runtime cannot run here.
"""

from __future__ import annotations

from ..errors import FxpassError
from . import args as shared
from .output import console

#: exit status when some images failed (the others written)
EXIT_SOME_FAILED = 1
#: failures listed in the summary (all are in the manifest)
SHOWN_FAILURES = 10


def add_arguments(p) -> None:
    """``--images``, ``--masks``, ``--ray``, ``--workers`` (``--mask`` and ``-o`` are the single image's)."""
    p.add_argument("--images", metavar="DIR", help="inpaint every image of DIR into -o OUTDIR (OUTDIR/<name>.png; a "
                                                   "re-run skips those done, see OUTDIR/manifest.json)")
    p.add_argument("--masks", metavar="DIR", help="with --images: the masks, matched by file name (or stem)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="with --images: run on Ray (pip install 'fxpass[ray]'); no ADDRESS starts a local Ray with "
                        "this machine's cores, ADDRESS joins a cluster (ray start --head)")
    p.add_argument("--workers", type=shared.positive, default=None, metavar="N",
                   help="with --ray: N model-holding workers (default one per CPU of the Ray instance)")


def refuse_batch_flags(args) -> None:
    """One image: the directory flags have no meaning."""
    for flag, value in (("--masks", args.masks), ("--ray", args.ray), ("--workers", args.workers)):
        if value is not None:
            raise FxpassError(f"sample: {flag} goes with --images DIR (a directory of images)")


def _check_flags(args) -> None:
    if args.image is not None:
        raise FxpassError("sample: --image is one image, --images a directory: give one of them")
    if args.ddpm:
        raise FxpassError("sample: --ddpm generates one image; it does not go with --images")
    if (args.masks is None) == (args.mask is None):
        raise FxpassError("sample: --images needs --masks DIR (matched by name) or --mask FILE (one for all)")


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("images"), BarColumn(), MofNCompleteColumn(), TextColumn("failed {task.fields[failed]}"),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=False)


def _summary(job, summary, where: str) -> None:
    out = console()
    rate = summary.images_per_second()
    info = summary.info
    out.print(f"{job.out}: {summary.total} image(s): {summary.done} written, {summary.failed} failed, "
              f"{summary.skipped} already done; {info['calls']} model calls each on {info['runtime']} {where}, "
              f"{summary.seconds:.1f} s" + (f", {rate:.2f} images/s" if rate else "")
              + f" (seeds and times in {job.out / 'manifest.json'})", soft_wrap=True)
    for name, error in summary.failures[:SHOWN_FAILURES]:
        out.print(f"  failed {name}: {error}", soft_wrap=True)
    if len(summary.failures) > SHOWN_FAILURES:
        out.print(f"  ... and {len(summary.failures) - SHOWN_FAILURES} more (see the manifest)", soft_wrap=True)


def run(args) -> int:
    from ..batch import BatchJob
    from ..batch_run import run_batch
    from ..denoisers import runtime_unavailable_reason
    from ..verify import EXIT_UNAVAILABLE
    from . import sampling

    _check_flags(args)
    if args.workers is not None and args.ray is None:
        raise FxpassError("sample: --workers is for --ray (in process, one worker runs the images in turn)")
    settings = sampling.settings_from(args)
    reason = runtime_unavailable_reason(args.runtime)
    if reason:
        console().print(f"unavailable: {reason}", soft_wrap=True)
        return EXIT_UNAVAILABLE
    job = BatchJob(model=args.model, images=args.images, out=args.out, settings=settings, masks=args.masks,
                   mask=args.mask, seed=args.seed, runtime=args.runtime, force=args.force,
                   inputs=tuple(sampling.preset_files(args)))
    bar = _progress()
    task = bar.add_task("images", total=None, failed=0)

    def started(summary, todo: int) -> None:  # after the checks: an error is one line, without a bar
        bar.update(task, total=todo, completed=0)
        bar.start()

    def progressed(case, result, summary) -> None:
        bar.update(task, completed=summary.ran, failed=summary.failed)

    try:
        summary = run_batch(job, ray=args.ray, workers=args.workers, on_start=started, on_result=progressed)
    finally:
        bar.stop()
    where = "in process" if args.ray is None else f"on Ray ({len(summary.workers)} worker(s) ran images)"
    _summary(job, summary, where)
    return EXIT_SOME_FAILED if summary.failed else 0
