"""The driver of a batch job (:mod:`fxpass.batch`): plan, skip what is done, run the rest, write as results come.

:func:`run_batch` checks the output directory (never among the inputs), loads the model once to check the
sampler against it, opens the manifest (:mod:`fxpass.batch_manifest`), then feeds the images still to do to
a runner: in this process (one :class:`~fxpass.batch.Worker`), or on Ray (:func:`fxpass.batch_ray.ray_runner`,
a pool of actors).  Either way only this driver writes: each PNG atomically, the manifest at most every
:data:`SAVE_EVERY` seconds and at the end (Ctrl-C included), so an interrupted job leaves whole files and a
re-run goes on where it stopped (a PNG written after the last save is taken as done: see
:mod:`fxpass.batch_manifest`).  An image that cannot be read,
has the wrong size or no mask is a failed entry; the others go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from .batch import BatchJob, Case, Result, Worker, load_inputs, plan_cases
from .batch_manifest import Manifest, job_key
from .fileio import file_sha256
from .errors import FxpassError


#: seconds between two saves of the manifest during a job (and once at its end): a job of many fast images
#: does not rewrite a growing file after each one; a PNG written after the last save is recovered on a re-run
SAVE_EVERY = 1.0


@dataclass
class Summary:
    """What a job did: counts, failures (name, error), wall seconds, the workers that ran images."""

    total: int
    skipped: int = 0
    done: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    workers: set[str] = field(default_factory=set)
    info: dict = field(default_factory=dict)

    @property
    def ran(self) -> int:
        return self.done + self.failed

    def images_per_second(self) -> float | None:
        return self.done / self.seconds if self.done and self.seconds > 0 else None


def check_outputs(job: BatchJob) -> None:
    """``-o OUTDIR`` may exist (a re-run) but never sit among the inputs, nor the inputs inside it."""
    from .fileio import check_input_file, plan_outputs

    check_input_file(job.model, "an ONNX model")
    if job.mask is not None:
        check_input_file(job.mask, "a mask image")
    plan_outputs({"-o": job.out}, inputs=[job.model, job.images, job.masks, job.mask, *job.inputs], force=True,
                 directories=("-o",))


def _inputs(todo: list[Case], size: int, failed: Callable[[Case, Result], None], channels: int = 3) -> Iterator[tuple]:
    """(case, image, mask) for each case whose inputs load; the others go to ``failed`` as they come."""
    for case in todo:
        try:
            gt, mask = load_inputs(case, size, channels)
        except FxpassError as exc:
            failed(case, Result(case.name, None, 0.0, str(exc)))
            continue
        yield case, gt, mask


def _in_process(worker: Worker) -> Callable[[Iterable[tuple]], Iterator[tuple[Case, Result]]]:
    def run(items):
        for case, gt, mask in items:
            yield case, worker.run(case.name, gt, mask, case.seed)
    return run


def run_batch(job: BatchJob, *, ray: str | None = None, workers: int | None = None,
              on_start: Callable[[Summary, int], None] | None = None,
              on_result: Callable[[Case, Result, Summary], None] | None = None,
              on_actors: Callable[[list], None] | None = None) -> Summary:
    """Run ``job``: in process with ``ray`` None, else on Ray (``""``: a local instance of ``workers``
    CPUs, default all; an address: join that cluster, ``workers`` actors, default one per CPU).

    ``on_start(summary, todo)`` once the plan is known, ``on_result(case, result, summary)`` after each image
    is recorded (written, or failed), ``on_actors(actors)`` with the Ray actors once made (tests kill one).
    """
    if ray is not None:
        from .batch_ray import import_ray

        import_ray()  # a missing extra is said before any work
    check_outputs(job)
    cases = plan_cases(job)
    driver = Worker(job.model, job.runtime, job.settings, job.threads)  # checks the settings against the model
    info = driver.describe()
    size = info["image_size"]
    job.out.mkdir(exist_ok=True)
    manifest = Manifest.open(job.out, job_key(job, file_sha256(job.model)), cases, job.force)
    todo = [c for c in cases if job.force or not manifest.finished(c, size)]
    summary = Summary(total=len(cases), skipped=len(cases) - len(todo), info=info)
    manifest.save()
    if on_start is not None:
        on_start(summary, len(todo))
    start = time.perf_counter()
    saved = [start]

    def finish(case: Case, result: Result) -> None:
        if result.error is None:
            _write(case, result)
            summary.done += 1
            summary.workers.add(result.worker)
        else:
            summary.failed += 1
            summary.failures.append((case.name, result.error))
        manifest.record(case, result)
        if time.perf_counter() - saved[0] >= SAVE_EVERY:
            manifest.save()
            saved[0] = time.perf_counter()
        summary.seconds = time.perf_counter() - start
        if on_result is not None:
            on_result(case, result, summary)

    if ray is None:
        runner = _in_process(driver)
    else:
        from .batch_ray import ray_runner

        del driver  # its memory back before the actors load their copies
        runner = ray_runner(job, address=ray, workers=workers, on_actors=on_actors)
    try:
        for case, result in runner(_inputs(todo, size, finish, info["channels"])):
            finish(case, result)
    finally:  # also on Ctrl-C: what was written is entered
        manifest.save()
    summary.seconds = time.perf_counter() - start
    return summary


def _write(case: Case, result: Result) -> None:
    from .fileio import atomic_write_bytes

    atomic_write_bytes(case.output, lambda fh: fh.write(result.png))
