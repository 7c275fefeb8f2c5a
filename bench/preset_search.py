"""``python -m bench.preset_search``: sampler settings against RePaint's paper setting on sets of held-out
images of the trained reference, each set at its own seed: how the presets were searched (docs/sampling.md).

    python -m bench.preset_search --run fast --run balanced                     # the three tuning sets
    python -m bench.preset_search --set 0:32:0 --run 'diffpir:t_T=25,steps=13,travel_length=3,travel_repeat=3,init=fill'
    python -m bench.preset_search --workdir ~/search --run ...                 # keep each set's paper rows

Each ``--set FIRST:COUNT:SEED`` takes held-out images FIRST..FIRST+COUNT-1 (sorted by name) × the box, half
and strokes masks, noise seed SEED + case; each ``--run`` is an ``fxpass evaluate --run`` entry (a preset
name or file, or ``SAMPLER:knob=value,...``).  Every setting is paired per case against paper on the same
cases; the table gives the mean paired difference of PSNR and SSIM per set and pooled (± its standard error)
and model seconds per image against paper's.  Paper's rows are cached per set in ``--workdir`` (they
are the slow part: 410 calls per case).  The reference is lowered at fp32 and run on ONNX Runtime with one
thread.  It measures; it never asserts.  Never report a preset on the sets it was chosen on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from fxpass.reference import CHECKPOINT, CONFIG

HELDOUT = Path(CHECKPOINT).parent / "heldout"
#: the sets the presets were searched on (images 0..31 seed 0, 100..131 seed 7, 150..181 seed 11)
TUNING_SETS = ("0:32:0", "100:32:7", "150:32:11")


def parse_set(text: str) -> tuple[int, int, int]:
    try:
        first, count, seed = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST:COUNT:SEED, got {text!r}") from None
    if first < 0 or count < 1 or seed < 0:
        raise argparse.ArgumentTypeError(f"expected FIRST >= 0, COUNT >= 1, SEED >= 0, got {text!r}")
    return first, count, seed


def lowered_reference(workdir: Path) -> Path:
    out = workdir / "digits.onnx"
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "fxpass", "lower", str(CHECKPOINT), "--config", str(CONFIG), "-o",
                        str(out)], check=True)
    return out


def set_rows(denoiser, spec: tuple[int, int, int], settings, cache: Path | None) -> list[dict]:
    """Per-case rows of ``settings`` on one set (paper's cached in ``cache`` when given)."""
    from fxpass.compare_runs import compare
    from fxpass.images import load_image
    from fxpass.inpainting import fixed_masks

    if cache is not None and cache.is_file():
        return json.loads(cache.read_text())
    first, count, seed = spec
    paths = sorted(HELDOUT.glob("*.png"))[first:first + count]
    if len(paths) < count:
        raise SystemExit(f"--set {first}:{count}:{seed}: only {len(paths)} held-out images from {first}")
    size = int(denoiser.image_size)
    images = np.stack([load_image(p, size)[0] for p in paths])
    rows = compare(denoiser, images, fixed_masks(size, seed=seed), [settings], seed=seed)["runs"][0]["cases"]
    if cache is not None:
        cache.write_text(json.dumps(rows))
    return rows


def paired(paper: list[dict], rows: list[dict], key: str) -> np.ndarray:
    return np.array([b[key] - a[key] for a, b in zip(paper, rows, strict=True)])


def table(results: dict, sets: list[tuple[int, int, int]]) -> str:
    names = [f"{f}..{f + c - 1}/{s}" for f, c, s in sets]
    lines = ["| setting | calls | time vs paper | " + " | ".join(f"ΔPSNR {n}" for n in names) + " | ΔPSNR all | "
             + " | ".join(f"ΔSSIM {n}" for n in names) + " | ΔSSIM all |",
             "|---|---:|---:|" + "---:|" * (2 * len(sets) + 2)]
    for label, (calls, ratio, dp, ds) in results.items():
        pooled_p, pooled_s = np.concatenate(dp), np.concatenate(ds)
        se = lambda v: v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")  # noqa: E731
        lines.append(f"| {label} | {calls} | {ratio:.3f} | " + " | ".join(f"{d.mean():+.2f}" for d in dp)
                     + f" | {pooled_p.mean():+.2f} ± {se(pooled_p):.2f} | " + " | ".join(f"{d.mean():+.3f}" for d in ds)
                     + f" | {pooled_s.mean():+.3f} ± {se(pooled_s):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fxpass.cli.sampling import settings_from_spec
    from fxpass.denoisers import make_denoiser
    from fxpass.samplers import PRESETS

    p = argparse.ArgumentParser(prog="python -m bench.preset_search", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="SPEC", help="a setting (as evaluate --run)")
    p.add_argument("--set", action="append", type=parse_set, metavar="FIRST:COUNT:SEED",
                   help=f"a set of held-out images and its seed (default: {', '.join(TUNING_SETS)})")
    p.add_argument("--workdir", type=Path, help="keep the lowered reference and paper's rows here")
    args = p.parse_args(argv)
    sets = args.set or [parse_set(s) for s in TUNING_SETS]
    runs = [settings_from_spec(spec) for spec in args.run]
    with tempfile.TemporaryDirectory(prefix="fxpass-search-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        denoiser = make_denoiser(str(lowered_reference(workdir)), "ort", threads=1)
        steps = denoiser.diffusion.num_steps
        papers = [set_rows(denoiser, s, PRESETS["paper"], workdir / f"paper-{s[0]}-{s[1]}-{s[2]}.json") for s in sets]
        results = {}
        for settings in runs:
            label = settings.label(steps)
            print(f"running {label}", file=sys.stderr, flush=True)
            rows = [set_rows(denoiser, s, settings, None) for s in sets]
            seconds = sum(r["seconds"] for rs in rows for r in rs) / sum(r["seconds"] for rs in papers for r in rs)
            results[label] = (rows[0][0]["calls"], seconds, [paired(a, b, "psnr") for a, b in zip(papers, rows)],
                              [paired(a, b, "ssim") for a, b in zip(papers, rows)])
    print(table(results, sets))
    print(f"\nΔ: mean paired difference to paper (RePaint t_T {steps}, jump 10 × 10) over each set's cases "
          "(images × box, half, strokes); all: pooled ± standard error; time: model seconds against paper's.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
