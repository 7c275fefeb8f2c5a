"""Batch inpainting: one job (images, masks, sampler, seeds per image) run in process or on Ray by the same code.

A :class:`BatchJob` names the model, the image directory, the masks (a directory matched by name, or one mask
file for all), the output directory and the sampler :class:`~fxpass.samplers.Settings`.  :func:`plan_cases`
makes one :class:`Case` per image: its output ``OUTDIR/<stem>.png`` and its seed, derived from the job's
seed and the image's file name alone (:func:`case_seed`: stable across runs, whatever the order or the
worker), so ``fxpass sample --image IMG --seed <that seed>`` gives the same bytes.  A :class:`Worker` loads
the model once and turns (inputs, seed) into PNG bytes through :func:`render_png`, the function the
single-image ``fxpass sample`` calls too.  The driver (:mod:`fxpass.batch_run`) reads the inputs, hands
them to workers and writes each result atomically, then the manifest (:mod:`fxpass.batch_manifest`), so a
re-run skips what is done and valid.  Torch-free; Ray is imported only by :mod:`fxpass.batch_ray`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FxpassError, first_line
from .samplers import Settings


@dataclass(frozen=True)
class BatchJob:
    """What to inpaint and how: ``masks`` (a directory, matched by name) or ``mask`` (one file for all)."""

    model: Path
    images: Path
    out: Path
    settings: Settings = field(default_factory=Settings)
    masks: Path | None = None
    mask: Path | None = None
    seed: int = 0
    runtime: str = "ort"
    #: ONNX Runtime / OpenVINO intra-op threads per worker (None: the runtime's default)
    threads: int | None = None
    #: redo every image, and replace a manifest of other settings
    force: bool = False
    #: other input files (a preset file) that the outputs must not overwrite
    inputs: tuple = ()

    def __post_init__(self):
        for name in ("model", "images", "out", "masks", "mask"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if (self.masks is None) == (self.mask is None):
            raise FxpassError("sample: give --masks DIR or --mask FILE with --images DIR (one of them)")


@dataclass
class Case:
    """One image of a job: its inputs, output and seed; ``error`` where it cannot be run (a missing mask)."""

    name: str
    image: Path
    mask: Path | None
    output: Path
    seed: int
    error: str | None = None


def case_seed(seed: int, name: str) -> int:
    """The seed of the image named ``name`` in a job seeded ``seed``: SHA-256 of both, below 2**63 (what
    ``fxpass sample --seed`` takes), so it depends on nothing else."""
    digest = hashlib.sha256(f"fxpass-batch\0{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _mask_index(directory: Path) -> dict[str, list[Path]]:
    from .images import IMAGE_SUFFIXES

    if not directory.is_dir():
        raise FxpassError(f"{directory}: not a directory, expected a directory of masks")
    index: dict[str, list[Path]] = {}
    for p in sorted(directory.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            index.setdefault(p.stem, []).append(p)
    return index


def _find_mask(job: BatchJob, image: Path, index: dict[str, list[Path]]) -> tuple[Path | None, str | None]:
    if job.mask is not None:
        return job.mask, None
    same = job.masks / image.name
    if same.exists():
        return same, None
    found = index.get(image.stem, [])
    if len(found) == 1:
        return found[0], None
    if not found:
        return None, f"{image}: no mask {image.stem}.* in {job.masks}"
    return None, f"{image}: several masks match in {job.masks} ({', '.join(p.name for p in found)})"


def plan_cases(job: BatchJob) -> list[Case]:
    """A case per image of ``job.images`` (sorted by name); a missing or ambiguous mask, or two images
    with one output name, is that case's error."""
    from .images import image_files

    index = _mask_index(job.masks) if job.masks is not None else {}
    cases: list[Case] = []
    taken: dict[str, str] = {}
    for image in image_files(job.images):
        mask, error = _find_mask(job, image, index)
        output = job.out / f"{image.stem}.png"
        if error is None and output.name in taken:
            error = f"{image}: its output {output.name} is also {taken[output.name]}'s; rename one"
        taken.setdefault(output.name, image.name)
        cases.append(Case(image.name, image, mask, output, case_seed(job.seed, image.name), error))
    return cases


def load_inputs(case: Case, size: int, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The case's image [1, channels, size, size] and mask [1, 1, size, size]; FxpassError naming the bad file."""
    from .images import load_image, load_mask

    if case.error is not None:
        raise FxpassError(case.error)
    return load_image(case.image, size, channels), load_mask(case.mask, size)


def render_png(sampler, model, gt: np.ndarray | None, mask: np.ndarray | None, seed: int, on_step=None) -> bytes:
    """``sampler`` run on ``model`` from ``GeneratorNoise(seed)`` with the known pixels ``gt`` under ``mask``
    (neither: generation), as PNG bytes; FxpassError for non-finite output.  ``fxpass sample`` (one image)
    and every batch worker call this, so both give the same bytes for the same inputs and seed."""
    from .images import encode_png
    from .sampler import GeneratorNoise
    from .samplers import run_plan

    size = int(model.image_size)
    shape = (1, int(getattr(model, "channels", 3)), size, size)
    x = run_plan(sampler, model, shape, noise=GeneratorNoise(seed), gt=gt, mask=mask, on_step=on_step)
    if not np.isfinite(x).all():
        raise FxpassError(f"{getattr(model, 'path', 'the model')}: the model produced non-finite values; nothing written")
    return encode_png(x[0])


def load_sampler(model_path, runtime: str, settings: Settings, threads: int | None = None, command: str = "sample"):
    """The denoiser of ``runtime`` for ``model_path`` and the sampler of ``settings`` for it (its deep-cache
    graph loaded where the settings use it); FxpassError where a knob does not fit the model."""
    from .cli import sampling
    from .denoisers import make_denoiser

    model = make_denoiser(model_path, runtime, threads=threads)
    sampling.load_cache(model, [settings])
    return model, sampling.plan(settings, model.diffusion, model_path, command)


@dataclass
class Result:
    """One image's outcome from a worker: PNG bytes, or the error; seconds of sampling."""

    name: str
    png: bytes | None
    seconds: float
    error: str | None = None
    worker: str = ""


class Worker:
    """The model loaded once, then one image per :meth:`run` (in process, or as a Ray actor)."""

    def __init__(self, model_path, runtime: str, settings: Settings, threads: int | None = None,
                 command: str = "sample"):
        self.model, self.sampler = load_sampler(model_path, runtime, settings, threads, command)
        import os
        import socket

        self.id = f"{socket.gethostname()}:{os.getpid()}"

    def describe(self) -> dict:
        """Model calls per image, the image size and the sampler's label (for progress and the summary)."""
        steps = self.model.diffusion.num_steps
        return {"calls": self.sampler.calls, "image_size": int(self.model.image_size), "runtime": self.model.runtime,
                "steps": steps, "channels": int(getattr(self.model, "channels", 3))}

    def run(self, name: str, gt: np.ndarray, mask: np.ndarray, seed: int) -> Result:
        """Inpaint one image; any failure is the result's error (one line), never an exception."""
        start = time.perf_counter()
        try:
            png = render_png(self.sampler, self.model, gt, mask, seed)
        except Exception as exc:  # noqa: BLE001 - one image's failure must not stop the job
            text = str(exc) if isinstance(exc, FxpassError) else f"{type(exc).__name__}: {first_line(exc)}"
            return Result(name, None, time.perf_counter() - start, text, self.id)
        return Result(name, png, time.perf_counter() - start, None, self.id)

    def inpaint(self, gt: np.ndarray, mask: np.ndarray, seed: int, what: str = "") -> np.ndarray:
        """:func:`fxpass.inpainting.inpaint` of one case (``fxpass evaluate --ray``); raises as it does."""
        from .inpainting import inpaint

        return inpaint(self.sampler, self.model, gt, mask, seed, None, what)
