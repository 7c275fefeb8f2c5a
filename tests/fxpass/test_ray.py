"""``fxpass sample --images DIR ... --ray``: the same batch job on a local Ray (started here, shut down after).

On the tiny lowered U-Net with a 3-call DDIM: the Ray run's PNGs are the in-process run's byte for byte, with
the same seeds, and were made by the actors; actors killed mid-job are restarted and their images retried,
so every image is written exactly once; an actor dead past its restarts fails only the image it had, and a
re-run completes it.  Skipped with the reason where ``ray`` is not installed (``pip install 'fxpass[ray]'``).
"""

from __future__ import annotations

import json
import os
import socket
from collections import Counter

import pytest
from check_helpers import cli

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'fxpass[ray]')")

from fxpass.batch import BatchJob  # noqa: E402
from fxpass.samplers import Settings  # noqa: E402
from test_batch import DDIM, _write_set  # noqa: E402

NAMES = [f"im{k}.png" for k in range(6)]


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray of 2 CPUs with a small object store for this session's tests, shut down after."""
    ray.init(num_cpus=2, object_store_memory=100 * 1024**2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def data(tmp_path):
    return _write_set(tmp_path, NAMES)


@pytest.fixture
def in_process(capsys, tiny_onnx, data, tmp_path):
    """The in-process run's output directory (the reference)."""
    images, masks = data
    out = tmp_path / "in-process"
    rc, _, err = cli(capsys, "sample", tiny_onnx, "--images", images, "--masks", masks, "-o", out, *DDIM)
    assert rc == 0, err
    return out


def _images(out) -> dict:
    return json.loads((out / "manifest.json").read_text())["images"]


def _job(tiny_onnx, data, out) -> BatchJob:
    images, masks = data
    return BatchJob(model=tiny_onnx, images=images, masks=masks, out=out, settings=Settings("ddim", steps=3))


def _count_writes(monkeypatch) -> Counter:
    import fxpass.batch_run as batch_run

    writes: Counter = Counter()
    write = batch_run._write

    def counted(case, result):
        writes[case.name] += 1
        write(case, result)

    monkeypatch.setattr(batch_run, "_write", counted)
    return writes


# a local Ray's start and three jobs' actors: about 20 s on two cores
pytestmark = pytest.mark.slow


def test_ray_run_is_the_in_process_run(capsys, local_ray, tiny_onnx, data, in_process, tmp_path):
    images, masks = data
    out = tmp_path / "ray"
    rc, stdout, err = cli(capsys, "sample", tiny_onnx, "--images", images, "--masks", masks, "-o", out, "--ray", *DDIM)
    assert rc == 0, err
    assert "6 written, 0 failed" in stdout and "on Ray" in stdout
    for name in NAMES:
        assert (out / name).read_bytes() == (in_process / name).read_bytes(), name
    ours, theirs = _images(out), _images(in_process)
    assert {n: e["seed"] for n, e in ours.items()} == {n: e["seed"] for n, e in theirs.items()}
    driver = f"{socket.gethostname()}:{os.getpid()}"
    assert all(e["worker"] and e["worker"] != driver for e in ours.values())  # made by the actors
    assert ray.is_initialized()  # a Ray the process had is left as it was


def test_killed_workers_are_restarted_and_every_image_written_once(local_ray, tiny_onnx, data, in_process, tmp_path,
                                                                   monkeypatch):
    """Both actors killed after the first result: one of them had an image in flight, which is retried on its
    restart; the rest run on the restarted actors."""
    from fxpass.batch_run import run_batch

    writes = _count_writes(monkeypatch)
    actors: list = []

    first: list = []

    def kill(case, result, summary):
        if summary.done == 1:
            first.append((case.name, result.worker))
            for actor in actors:
                ray.kill(actor, no_restart=False)

    summary = run_batch(_job(tiny_onnx, data, tmp_path / "ray"), ray="", on_actors=actors.extend, on_result=kill)
    assert (summary.done, summary.failed) == (len(NAMES), 0), summary.failures
    assert writes == Counter(NAMES)  # each image written exactly once
    for name in NAMES:
        assert (tmp_path / "ray" / name).read_bytes() == (in_process / name).read_bytes(), name
    [(name, killed)] = first
    later = {e["worker"] for n, e in _images(tmp_path / "ray").items() if n != name}
    assert killed not in later  # the others ran on restarted actors (new processes)


def test_worker_dead_past_retries_fails_only_its_image(capsys, local_ray, tiny_onnx, data, in_process, tmp_path,
                                                       monkeypatch):
    from fxpass.batch_run import run_batch

    writes = _count_writes(monkeypatch)
    actors: list = []

    def kill(case, result, summary):
        if summary.done == 1:
            ray.kill(actors[0], no_restart=True)

    out = tmp_path / "ray"
    summary = run_batch(_job(tiny_onnx, data, out), ray="", on_actors=actors.extend, on_result=kill)
    assert (summary.done, summary.failed) == (len(NAMES) - 1, 1)
    [(failed, error)] = summary.failures
    assert "its Ray worker died" in error and _images(out)[failed]["status"] == "failed"
    assert sum(writes.values()) == len(NAMES) - 1 and set(writes.values()) == {1}
    images, masks = data
    rc, stdout, err = cli(capsys, "sample", tiny_onnx, "--images", images, "--masks", masks, "-o", out, *DDIM)
    assert rc == 0 and "1 written, 0 failed, 5 already done" in stdout, err
    for name in NAMES:
        assert (out / name).read_bytes() == (in_process / name).read_bytes(), name


def test_evaluate_on_ray_is_the_in_process_report(capsys, local_ray, tiny_onnx, data, tmp_path):
    pytest.importorskip("skimage", reason="fxpass evaluate needs scikit-image (pip install 'fxpass[metrics]')")
    images, _ = data
    reports = []
    for name, flags in (("here.json", []), ("ray.json", ["--ray", "--workers", "2"])):
        rc, _, err = cli(capsys, "evaluate", tiny_onnx, "--data", images, "--count", "3", *DDIM, "-o",
                         tmp_path / name, *flags)
        assert rc == 0, err
        reports.append(json.loads((tmp_path / name).read_text()))
    here, there = reports
    assert len(here["cases"]) == 9 and there["cases"] == here["cases"]  # same seeds, same images: same scores
    assert there["overall"] == here["overall"]
