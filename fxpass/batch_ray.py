"""A batch job's images on Ray: a pool of :class:`fxpass.batch.Worker` actors, each loading the model once.

:func:`ray_runner` connects (``""``: starts a local Ray with this machine's cores, or ``workers`` of them;
an address: joins that cluster, e.g. one started by ``ray start --head``), makes one actor per CPU (or
``workers``), and hands each idle actor the next image; results come back to the driver, which writes them.
An actor that dies is restarted (``max_restarts``) and its image retried (``max_task_retries``); an image
whose actor dies past those retries is a failed result, and the job goes on with the actors left.  A Ray
started here is shut down at the end.  ``ray`` is an optional extra: imported only here, only when asked.
On a cluster every node needs fxpass installed and the model at the same path (a shared file system);
the images are read by the driver and sent to the workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .batch import BatchJob, Case, Result, Worker
from .errors import FxpassError, first_line

#: restarts of a dead actor, and retries of the image it was running
RETRIES = 3
#: a local Ray's object store (bytes): the images and PNGs in flight are small
LOCAL_OBJECT_STORE = 128 * 1024**2


def import_ray():
    """The ``ray`` module; FxpassError (exit 2) naming the extra where it is missing."""
    try:
        import ray
    except ImportError:
        raise FxpassError("--ray needs Ray: pip install 'fxpass[ray]'", exit_code=2) from None
    return ray


def connect(ray, address: str, workers: int | None) -> bool:
    """Join ``address``, or start a local Ray (``""``); True when this call started or joined it (and so
    shuts it down after), False when the process was connected already (a test's, a notebook's)."""
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, object_store_memory=LOCAL_OBJECT_STORE, **quiet)
    except Exception as exc:  # noqa: BLE001 - Ray's connection errors vary by version
        raise FxpassError(f"--ray {address or '(local)'}: cannot start or join Ray ({first_line(exc)})") from None
    return True


def actor_threads(threads: int | None) -> int:
    """The runtime's intra-op threads in an actor: as asked, else one (each actor holds one CPU, so actors on
    one machine do not oversubscribe it).  The in-process run uses the runtime's default; on the models
    measured, ONNX Runtime's CPU outputs are the same bits at 1, 2 or the default threads, and the tests
    check that the Ray run's PNGs are the in-process run's bytes."""
    return threads if threads is not None else 1


def _pool_size(ray, workers: int | None) -> int:
    if workers:
        return workers
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _schedule(ray, actors: list, items: Iterable[tuple]) -> Iterator[tuple[Case, Result]]:
    """Each idle actor takes the next image; results in the order they finish."""
    idle = list(actors)
    pending: dict = {}  # object ref -> (actor, case)
    items = iter(items)
    more = True
    while True:
        while idle and more:
            item = next(items, None)
            if item is None:
                more = False
                break
            case, gt, mask = item
            actor = idle.pop(0)
            pending[actor.run.remote(case.name, gt, mask, case.seed)] = (actor, case)
        if not pending:
            if more:  # every actor is gone: what is left fails, said once per image
                for case, _, _ in items:
                    yield case, Result(case.name, None, 0.0, "no Ray worker left to run it")
            return
        [ready], _ = ray.wait(list(pending), num_returns=1)
        actor, case = pending.pop(ready)
        try:
            result = ray.get(ready)
            idle.append(actor)
        except ray.exceptions.RayActorError as exc:  # dead past its restarts: not handed work again
            result = Result(case.name, None, 0.0, f"its Ray worker died ({first_line(exc, 160)})")
        except ray.exceptions.RayError as exc:
            result = Result(case.name, None, 0.0, f"Ray: {first_line(exc, 200)}")
            idle.append(actor)
        yield case, result


@contextmanager
def _pool(ray, address: str, workers: int | None, worker_args: tuple):
    """Ray connected (started locally where ``address`` names none), one :class:`Worker` actor per worker
    slot built with ``worker_args``; the actors are killed after a whole run, Ray shut down if started here."""
    started = connect(ray, address, workers)
    try:
        actor_class = ray.remote(num_cpus=1, max_restarts=RETRIES, max_task_retries=RETRIES)(Worker)
        actors = [actor_class.remote(*worker_args) for _ in range(_pool_size(ray, workers))]
        yield actors
        for actor in actors:
            ray.kill(actor)
    finally:
        if started:
            ray.shutdown()


def ray_runner(job: BatchJob, *, address: str, workers: int | None = None,
               on_actors: Callable[[list], None] | None = None
               ) -> Callable[[Iterable[tuple]], Iterator[tuple[Case, Result]]]:
    """A runner for :func:`fxpass.batch_run.run_batch`: (case, image, mask) items in, (case, result) out."""
    ray = import_ray()

    def run(items):
        worker = (str(job.model.resolve()), job.runtime, job.settings, actor_threads(job.threads))
        with _pool(ray, address, workers, worker) as actors:
            if on_actors is not None:
                on_actors(actors)
            yield from _schedule(ray, actors, items)
    return run


def ray_inpaint_cases(model_path, settings, *, address: str, workers: int | None = None, runtime: str = "ort"):
    """For :func:`fxpass.inpainting.evaluate`'s ``inpaint_cases``: the (image, mask, seed, label) cases on a pool
    of actors (``ray.util.ActorPool``, results in the cases' order); FxpassError where an actor dies past its
    restarts or a case fails (an evaluation is whole or nothing)."""
    ray = import_ray()

    def run(cases):
        from ray.util import ActorPool

        worker = (str(Path(model_path).resolve()), runtime, settings, actor_threads(None), "evaluate")
        with _pool(ray, address, workers, worker) as actors:
            try:
                yield from ActorPool(actors).map(lambda actor, case: actor.inpaint.remote(*case), cases)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.as_instanceof_cause()
                raise FxpassError(str(cause) if isinstance(cause, FxpassError) else
                                  f"evaluate --ray: a case failed on Ray ({first_line(exc, 200)})") from None
            except ray.exceptions.RayError as exc:
                raise FxpassError(f"evaluate --ray: a Ray worker died past its restarts ({first_line(exc, 200)})") from None
    return run
