"""``python -m bench.sampling_time``: ``fxpass sample``'s wall time and peak memory per image, per lowering
precision × runtime × sampler preset, beside the paper setting's time.

    python -m bench.sampling_time                            # CAMUS: fp32, int8 × ort, openvino × fast, balanced
    python -m bench.sampling_time --workdir ~/sampling-bench # keep the lowerings; the next run reuses them
    python -m bench.sampling_time --cache-interval 2,3       # ... each preset also with --cache-interval 2 and 3
    python -m bench.sampling_time --paper-full               # ... and --preset paper end to end (long on CAMUS)
    python -m bench.sampling_time --show FILE.json           # print the table of an earlier run

The model is ``fxpass init --seed 0`` (random weights), lowered with ``--deep-cache`` per precision (int8
calibrated on the model's own trajectories).  Each row runs ``fxpass sample`` on a seeded synthetic image
with a centre box to inpaint, in a child Python process running fxpass's CLI in-process: the wall time
is the child's whole life (start-up, imports, loading the model, sampling, the written PNG), the peak
memory its own high-water mark (``VmHWM``; ``ru_maxrss`` where there is no /proc).  The paper setting (RePaint, 2,410 model calls on CAMUS) is estimated as its
call count × the median time of ``--paper-calls`` calls of the same model and runtime, unless
``--paper-full`` runs it.  Results go to ``bench/results/<date>-<host-kind>-sampling.json``; benchmarks
measure, they never assert (the target prints as met / not met).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import RESULTS_DIR, LoadSampler, machine_info, now_utc, results_path, write_results
from .sampling_report import KIND, add_speedups, evaluate_target, render

REPO = Path(__file__).resolve().parent.parent
RUNTIME_CHOICES = ("ort", "openvino", "openvino-bf16")
PRESET_CHOICES = ("fast", "balanced", "paper")
#: the child: fxpass's CLI in-process, then its own peak RSS in KiB: VmHWM from /proc/self/status on Linux
#: (ru_maxrss there keeps the forking parent's high-water mark across exec), ru_maxrss elsewhere (bytes on macOS)
CHILD = """\
import resource, sys
code = 1
try:
    from fxpass.cli import main
    code = main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
finally:
    try:
        with open("/proc/self/status") as status:
            peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak // 1024 if sys.platform == "darwin" else peak
    with open(sys.argv[1], "w") as fh:
        fh.write(str(peak))
sys.exit(code)
"""


class BenchError(Exception):
    pass


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} sampling-time: {message}", file=sys.stderr, flush=True)


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path}


def _fxpass(args: list[str], cwd: Path, log_file: Path) -> float:
    """``python -m fxpass ARGS`` in ``cwd``, its output kept in ``log_file``; seconds taken (BenchError on failure)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fxpass", *args], cwd=cwd, env=_env(), capture_output=True, text=True)
    log_file.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise BenchError(f"fxpass {args[0]} exited {proc.returncode} ({log_file}): {tail}")
    return time.perf_counter() - start


def reuse_problem(path: Path, config: dict[str, Any], precision: str) -> str | None:
    """None where ``path`` is this fxpass's ``--deep-cache`` lowering of ``config`` at ``precision`` with its
    shallow graph beside it; otherwise why it cannot be reused."""
    import fxpass
    from fxpass.deep_cache import sha256, shallow_path
    from fxpass.errors import FxpassError
    from fxpass.metadata import read_file

    if not path.is_file():
        return "not there"
    try:
        meta = read_file(path, require=("table",)).meta
    except FxpassError as exc:
        return str(exc)
    if json.dumps(meta.config, sort_keys=True) != json.dumps(config, sort_keys=True, default=str):
        return "lowered from another config"
    if meta.precision != precision:
        return f"lowered at {meta.precision}"
    if meta.version != fxpass.__version__:
        return f"lowered by fxpass {meta.version}, this is {fxpass.__version__}"
    if not meta.deep_cache or meta.deep_cache.get("role") != "full":
        return "not a --deep-cache lowering"
    shallow = shallow_path(path)
    if not shallow.is_file() or sha256(shallow.read_bytes()) != meta.deep_cache.get("shallow_sha256"):
        return f"{shallow.name} is missing or another lowering's"
    return None


def prepare_lowerings(workdir: Path, config_path: str | None, config: dict[str, Any], precisions: list[str],
                      log=_log) -> dict[str, dict[str, Any]]:
    """``model-<precision>.onnx`` (``--deep-cache``) per precision in ``workdir``, reused where it matches."""
    config_args = ["--config", str(Path(config_path).resolve())] if config_path else []
    out: dict[str, dict[str, Any]] = {}
    initialised = False
    for precision in precisions:
        path = workdir / f"model-{precision}.onnx"
        problem = reuse_problem(path, config, precision)
        if problem is None:
            log(f"reuse {path.name} (its metadata matches the config)")
            out[precision] = {"file": path.name, "reused": True, "lower_s": None}
        else:
            if not initialised:
                log("fxpass init model.pt --seed 0")
                _fxpass(["init", "model.pt", *config_args, "--seed", "0", "--force"], workdir, workdir / "init.log")
                initialised = True
            log(f"lower {path.name} ({problem}): fxpass lower --precision {precision} --deep-cache ...")
            try:
                int8 = ["--calibrate-on-samples"] if precision == "int8" else []  # random weights: no images
                seconds = _fxpass(["lower", "model.pt", "-o", path.name, "--precision", precision, "--deep-cache",
                                   *int8, *config_args, "--force"], workdir, workdir / f"lower-{precision}.log")
            except BenchError as exc:  # this precision's rows record it; the others still run
                log(f"lowering {path.name} failed: {exc}")
                out[precision] = {"file": path.name, "reused": False, "error": str(exc)}
                continue
            log(f"lowered {path.name} in {seconds:.1f} s")
            out[precision] = {"file": path.name, "reused": False, "lower_s": seconds}
        out[precision]["bytes"] = path.stat().st_size
    return out


def write_inputs(workdir: Path, size: int, seed: int = 0) -> tuple[Path, Path]:
    """A seeded smooth synthetic RGB image and a mask whose centre box (half the side) is unknown."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.uint8)
    image = Image.fromarray(coarse, "RGB").resize((size, size), Image.BICUBIC)
    noise = rng.normal(0, 8, size=(size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    mask = np.full((size, size), 255, dtype=np.uint8)
    mask[size // 4:size // 4 + size // 2, size // 4:size // 4 + size // 2] = 0
    image_path, mask_path = workdir / "image.png", workdir / "mask.png"
    Image.fromarray(pixels, "RGB").save(image_path)
    Image.fromarray(mask, "L").save(mask_path)
    return image_path, mask_path


def row_settings(preset: str, interval: int):
    """The Settings a row samples with: the preset, with ``cache_interval`` where it is over 1."""
    from fxpass.samplers import PRESETS

    settings = PRESETS[preset]
    return settings if interval == 1 else dataclasses.replace(settings, cache_interval=interval)


def sample_flags(preset: str, interval: int, num_steps: int) -> list[str]:
    """``--preset NAME``; with a cache interval over 1, the preset's resolved knobs as explicit flags (the CLI
    takes no knob beside ``--preset``) and ``--cache-interval N``."""
    from fxpass.cli.sampling import FLAGS

    if interval == 1:
        return ["--preset", preset]
    settings = row_settings(preset, interval).resolved(num_steps)
    flag_of = {field: flag for flag, field in FLAGS.items()}
    flags = ["--sampler", settings.sampler]
    for field, value in settings.knobs(num_steps).items():
        flags += [flag_of[field], f"{value:g}" if isinstance(value, float) else str(value)]
    return flags


def run_sample(model: Path, image: Path, mask: Path, out: Path, flags: list[str], runtime: str) -> dict[str, Any]:
    """``fxpass sample`` in a child process: wall time (process start to exit, PNG written), peak RSS."""
    import re

    out.unlink(missing_ok=True)
    peak_file = out.with_suffix(".peak")
    peak_file.unlink(missing_ok=True)
    argv = [sys.executable, "-c", CHILD, str(peak_file), "sample", str(model), "--image", str(image), "--mask",
            str(mask), "-o", str(out), *flags, "--runtime", runtime, "--seed", "0"]
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=out.parent, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    text = (proc.stdout + proc.stderr).strip()
    last = text.splitlines()[-1] if text else ""
    if proc.returncode == 3:
        return {"skipped": last.removeprefix("unavailable: ")}
    if proc.returncode != 0 or not out.is_file():
        return {"error": f"exit {proc.returncode}: {last}" if proc.returncode else f"no {out.name} written"}
    kib = int(peak_file.read_text(encoding="utf-8").strip())  # the child writes KiB on every platform
    peak_file.unlink()
    found = re.search(r"([\d,]+) model calls", " ".join(text.split()))
    return {"wall_s": wall, "peak_rss_mib": kib / 1024, "png": out.name,
            "calls_reported": int(found.group(1).replace(",", "")) if found else None}


def per_call_time(model: Path, runtime: str, calls: int, *, warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """Median seconds of one model call (batch 1) at ``calls`` t_index values spread over the table, in this
    process, after ``warmup`` untimed calls."""
    import numpy as np

    from fxpass.denoisers import make_denoiser

    denoiser = make_denoiser(model, runtime)
    steps, size = len(denoiser.timesteps), denoiser.image_size
    rng = np.random.default_rng(seed)
    t_indices = [int(t) for t in np.linspace(0, steps - 1, calls).round()]
    for _ in range(warmup):
        denoiser(rng.standard_normal((1, 3, size, size), dtype=np.float32), np.array([steps - 1]))
    samples = []
    for t in t_indices:
        x = rng.standard_normal((1, 3, size, size), dtype=np.float32)
        start = time.perf_counter()
        denoiser(x, np.array([t], dtype=np.int64))
        samples.append(time.perf_counter() - start)
    del denoiser
    return {"per_call_s": statistics.median(samples), "samples_s": samples, "t_index": t_indices, "warmup": warmup}


def measure_pair(ctx: dict[str, Any], precision: str, runtime: str, log=_log) -> list[dict[str, Any]]:
    """The rows of one lowering × runtime: ``--paper-full``'s timed paper row, each preset × cache interval,
    and the paper estimate."""
    from fxpass.denoisers import runtime_unavailable_reason
    from fxpass.samplers import PRESETS

    base = {"precision": precision, "runtime": runtime}
    reason = runtime_unavailable_reason(runtime)
    failed = ctx["lowerings"][precision].get("error")
    failed = failed and {"error": f"the lowering failed: {failed}"}
    model = ctx["workdir"] / f"model-{precision}.onnx"
    plan = [("paper", 1)] if ctx["paper_full"] else []
    plan += [(p, n) for p in ctx["presets"] for n in ctx["cache_intervals"] if (p, n) != ("paper", 1) or
             not ctx["paper_full"]]
    rows = []
    for preset, interval in plan:
        settings = row_settings(preset, interval)
        row = {**base, "preset": preset, "cache_interval": interval, "estimated": False,
               "label": settings.label(ctx["num_steps"]), "calls": settings.build(ctx["diffusion"]).calls}
        if reason or failed:
            row.update(failed or {"skipped": reason})
        else:
            log(f"{precision} · {runtime} · {preset}" + (f" · cache {interval}" if interval > 1 else "")
                + f": fxpass sample ({row['calls']:,} model calls) ...")
            out = ctx["workdir"] / f"out-{precision}-{runtime}-{preset}-c{interval}.png"
            row.update(run_sample(model, ctx["image"], ctx["mask"], out,
                                  sample_flags(preset, interval, ctx["num_steps"]), runtime))
            log("  " + (f"{row['wall_s']:.2f} s, peak RSS {row['peak_rss_mib']:.0f} MiB" if "wall_s" in row
                        else row.get("skipped") or row.get("error")))
        ctx["load"].sample(f"{precision}/{runtime}/{preset}/c{interval}")
        rows.append(row)
    paper = PRESETS["paper"]
    calls = paper.build(ctx["diffusion"]).calls
    row = {**base, "preset": "paper", "cache_interval": 1, "estimated": True, "calls": calls,
           "peak_rss_mib": None, "paper_calls_timed": ctx["paper_calls"]}
    if reason or failed:
        row.update(failed or {"skipped": reason}, label=f"estimate: {paper.label(ctx['num_steps'])}")
    else:
        log(f"{precision} · {runtime} · paper estimate: {ctx['paper_calls']} model calls in this process ...")
        timing = per_call_time(model, runtime, ctx["paper_calls"])
        row.update(timing, wall_s=calls * timing["per_call_s"],
                   label=f"estimate: {calls:,} calls × {timing['per_call_s']:.3f} s/call measured "
                         f"(median of {ctx['paper_calls']})")
        log(f"  {timing['per_call_s']:.3f} s/call → {row['wall_s']:.1f} s")
    return [row, *rows]  # the paper rows first in the table; the estimate is measured last, after the children


def run_bench(args, workdir: Path, log=_log) -> dict[str, Any]:
    from fxpass.config import CAMUS, load_config
    from fxpass.diffusion import Diffusion

    cfg = load_config(args.config)
    load = LoadSampler()
    load.sample("start")
    started = time.perf_counter()
    values = cfg.to_dict()
    name = "CAMUS" if cfg == CAMUS else Path(args.config).stem if args.config else "custom"
    diffusion = Diffusion.from_config(values)
    lowerings = prepare_lowerings(workdir, args.config, values, args.precisions, log)
    image, mask = write_inputs(workdir, cfg.image_size)
    ctx = {"workdir": workdir, "image": image, "mask": mask, "diffusion": diffusion, "num_steps": diffusion.num_steps,
           "presets": args.presets, "cache_intervals": args.cache_intervals, "paper_full": args.paper_full,
           "paper_calls": args.paper_calls, "load": load, "lowerings": lowerings}
    rows = [row for p in args.precisions for rt in args.runtimes for row in measure_pair(ctx, p, rt, log)]
    reference = add_speedups(rows)
    load.sample("end")
    results = {
        "kind": KIND, "date": now_utc().isoformat(), "machine": machine_info(),
        "config": {"name": name, "path": str(args.config) if args.config else None, "values": values,
                   "image_size": cfg.image_size, "respaced_steps": diffusion.num_steps},
        "settings": {"precisions": args.precisions, "runtimes": args.runtimes, "presets": args.presets,
                     "cache_intervals": args.cache_intervals, "paper_calls": args.paper_calls,
                     "paper_full": args.paper_full, "seed": 0, "weights": "fxpass init --seed 0",
                     "lowering": "fxpass lower --deep-cache", "image": "seeded synthetic, centre box unknown"},
        "lowerings": lowerings, "rows": rows, "paper_reference": reference, "load": load.summary(),
        "wall_s": time.perf_counter() - started,
    }
    results["target"] = evaluate_target(results)
    return results


def _names(text: str, allowed: tuple[str, ...]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(bad) or 'nothing given'}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    from fxpass.metadata import PRECISIONS

    doc = __doc__.splitlines()
    p = argparse.ArgumentParser(prog="python -m bench.sampling_time",
                                description=" ".join(doc[:2]).split(": ", 1)[1], epilog="\n".join(doc[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="RePaint/guided-diffusion YAML (default: built-in CAMUS)")
    p.add_argument("--workdir", metavar="DIR", help="keep the model, lowerings and images here, and reuse lowerings "
                                                    "whose metadata matches (default: a temporary directory)")
    p.add_argument("--precisions", default="fp32,int8", metavar="P,...",
                   type=lambda t: _names(t, PRECISIONS),
                   help="lowering precisions, comma-separated (default fp32,int8)")
    p.add_argument("--runtimes", default="ort,openvino", metavar="R,...",
                   type=lambda t: _names(t, RUNTIME_CHOICES),
                   help=f"runtimes, comma-separated, of {', '.join(RUNTIME_CHOICES)} (default ort,openvino)")
    p.add_argument("--presets", default="fast,balanced", metavar="NAME,...",
                   type=lambda t: _names(t, PRESET_CHOICES),
                   help="sampler presets timed end to end (default fast,balanced; paper: see --paper-full)")
    p.add_argument("--cache-interval", action="append", default=[], metavar="N[,N...]",
                   help="also time each preset with --cache-interval N (repeatable or comma-separated; 1 always runs)")
    p.add_argument("--paper-calls", type=int, default=20, metavar="K",
                   help="model calls timed for the paper estimate (default 20)")
    p.add_argument("--paper-full", action="store_true",
                   help="also run fxpass sample --preset paper end to end per lowering × runtime (2,410 model calls: "
                        "about 18 minutes a row on CAMUS)")
    p.add_argument("--out", metavar="FILE.json",
                   help="results file (default bench/results/<date>-<host-kind>-sampling.json)")
    p.add_argument("--results-dir", metavar="DIR", default=str(RESULTS_DIR))
    p.add_argument("--show", metavar="FILE.json", help="print the table of a results file and exit")
    return p


def _intervals(values: list[str], parser) -> list[int]:
    out = {1}
    for text in values:
        for item in filter(None, (i.strip() for i in text.split(","))):
            if not item.isdigit() or int(item) < 1:
                parser.error(f"--cache-interval {item}: expected a positive integer")
            out.add(int(item))
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.show:
        print(render(json.loads(Path(args.show).read_text(encoding="utf-8")), args.show))
        return 0
    args.cache_intervals = _intervals(args.cache_interval, parser)
    if args.paper_calls < 1:
        parser.error("--paper-calls must be at least 1")
    from fxpass.errors import FxpassError

    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fxpass-sampling-")))
        try:
            results = run_bench(args, workdir)
        except (BenchError, FxpassError, OSError) as exc:
            print(f"bench.sampling_time: error: {exc}", file=sys.stderr)
            return 2
    if args.out:
        out = Path(args.out)
    else:
        default = results_path(results, Path(args.results_dir))
        out = default.with_name(default.stem + "-sampling.json")
    write_results(results, out)
    print(render(results, str(out)))
    _log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
