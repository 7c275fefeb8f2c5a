"""Images per second of ``fxpass sample --images``: in process against a local Ray, interleaved in one process.

    python -m bench.batch_throughput [--images 16] [--repeats 3] [--workers N]

Lowers a small U-Net (the tests' tiny config: 32 px, a 10-step table, seeded weights) into a temporary
directory, writes ``--images`` seeded images and masks, starts one local Ray (``num_cpus`` = ``--workers``,
default this machine's cores; its start is not timed), then runs the same job ``--repeats`` times each way,
alternating, each into a fresh output directory.  A job's time is :attr:`fxpass.batch_run.Summary.seconds`:
from the first image handed out to the last written, so the Ray rows include making the actors and their
model loads (once per job), not Ray's start.  Checks that both ways wrote the same bytes, then prints a
markdown table (median and each run) and the machine.  On a machine of few cores expect parity: the
in-process run already uses every core inside ONNX Runtime; Ray gains where it adds machines.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

#: the sampler of every job: RePaint over the whole 10-step table, jump length 2, two passes (38 model calls)
SETTINGS = {"sampler": "repaint", "t_T": 10, "jump_length": 2, "jump_n_sample": 2}


def _model(root: Path) -> Path:
    import onnx
    import torch

    from fxpass.checkpoint import init_model
    from fxpass.config import from_dict
    from fxpass.pipeline import lower

    tiny = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "16",
            "num_heads": 2, "diffusion_steps": 100, "timestep_respacing": "10"}
    cfg = from_dict(tiny)
    torch.manual_seed(0)
    path = root / "tiny.onnx"
    onnx.save(lower(init_model(cfg, seed=0), config=cfg), str(path))
    return path


def _data(root: Path, count: int) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for k in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / f"{k:04d}.png")
        keep = np.zeros((32, 32), np.uint8)
        keep[:, : 8 + k % 16] = 255
        Image.fromarray(keep).save(masks / f"{k:04d}.png")
    return images, masks


def measure(count: int, repeats: int, workers: int) -> dict:
    import ray

    from fxpass.batch import BatchJob
    from fxpass.batch_run import run_batch
    from fxpass.samplers import Settings

    rows: dict[str, list[float]] = {"in process": [], f"local Ray, {workers} workers": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = _model(root)
        images, masks = _data(root, count)
        ray.init(num_cpus=workers, object_store_memory=128 * 1024**2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        try:
            outputs = []
            for r in range(repeats):
                for label, where in zip(rows, (None, "")):
                    out = root / f"out-{r}-{'ray' if where is not None else 'local'}"
                    job = BatchJob(model=model, images=images, masks=masks, out=out, settings=Settings(**SETTINGS))
                    summary = run_batch(job, ray=where, workers=workers if where is not None else None)
                    assert summary.done == count and summary.failed == 0, summary.failures
                    rows[label].append(count / summary.seconds)
                    outputs.append(out)
            reference = {p.name: p.read_bytes() for p in outputs[0].glob("*.png")}
            for out in outputs[1:]:
                assert {p.name: p.read_bytes() for p in out.glob("*.png")} == reference, f"{out} differs"
        finally:
            ray.shutdown()
    return rows


def table(rows: dict, count: int, workers: int) -> str:
    lines = [f"{count} images of 32 px, RePaint t_T 10 / jump 2 x 2 (38 model calls each), tiny U-Net on ONNX Runtime; "
             f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}); Ray rows include making "
             f"{workers} actors and their model loads, once per job; every run's PNGs byte-identical",
             "", "| run | images/s (median) | each run |", "|---|---:|---|"]
    for label, rates in rows.items():
        lines.append(f"| {label} | {statistics.median(rates):.2f} | {', '.join(f'{r:.2f}' for r in rates)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    rows = measure(args.images, args.repeats, args.workers)
    print(table(rows, args.images, args.workers))


if __name__ == "__main__":
    main()
