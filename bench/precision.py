"""The precision section: every runtime × precision on the CPU, its speed and what it costs in accuracy.

Each row (:data:`ROWS`) is built twice, the same way (:mod:`bench.precision_builds`):

- **latency** from the bench's config (CAMUS by default: seeded random weights, the model and inputs of
  :func:`bench.cpu.make_setup`), one denoising step at batch 1, timed in alternating rounds together
  with eager PyTorch (:func:`bench.harness.measure_interleaved`) and reported as a ratio to it;
- **fidelity** from the *trained* digits reference (:mod:`bench.precision_fidelity`): eps-MSE at every
  step of its schedule on held-out images against the eager float32 model, the worst ratio over t and
  where.

fxpass's own int8 (``fxpass.precision.quantize_int8``, default options) calibrates and measures its plan on
the first held-out digits (``calibration_data=heldout/``, as the project's reference tests run it); the
eps-MSE is measured on the images after those.  On the bench config there are no images of its size: it
calibrates on the model's own trajectories, and with random weights its plan says nothing either.

A row that cannot be built on this machine (OpenVINO or nncf not installed, a CPU without bf16,
fxpass's int8 API missing) records ``{"unavailable": reason}``; one that fails ``{"error": ...}``;
neither ever shows a number.

The baselines are built as a user would without fxpass's int8 (:mod:`bench.precision_baselines`): ONNX
Runtime's ``quantize_static`` and NNCF's ``nncf.quantize`` at default parameters, on random inputs.
``--repaint-full`` times a whole RePaint run at the paper setting on the fastest row within the fidelity
budget.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .harness import LoadSampler, measure_interleaved, short_error
from .precision_baselines import BASELINE_FEEDS
from .precision_builds import Subject, Variant, build_all
from .precision_fidelity import DIGITS_CHECKPOINT, digits_subject, run_fidelity

#: a row is "gated" (fit for --repaint-full's automatic choice) when its eps-MSE stays within this
#: fraction of float32's at every step (fxpass.precision.Int8Options' default error_budget)
GATE_BUDGET = 0.05
#: RePaint's paper setting: 250 steps, jumps of 10, 10 resamplings (2,410 model calls)
REPAINT = {"t_T": 250, "jump_length": 10, "jump_n_sample": 10}


@dataclass(frozen=True)
class Row:
    key: str
    runtime: str
    precision: str
    what: str


ROWS = (
    Row("eager", "PyTorch", "fp32", "eager (the reference)"),
    Row("torch_compile", "PyTorch", "fp32", "torch.compile (inductor) of the eager model"),
    Row("ort_fp32", "ONNX Runtime", "fp32", "fxpass ONNX"),
    Row("ort_int8", "ONNX Runtime", "int8", "fxpass int8 (fxpass.precision.quantize_int8)"),
    Row("ort_int8_default", "ONNX Runtime", "int8", "ORT quantize_static on the fxpass ONNX (naive baseline)"),
    Row("openvino_fp32", "OpenVINO", "fp32", "fxpass ONNX"),
    Row("openvino_bf16", "OpenVINO", "bf16", "fxpass ONNX, INFERENCE_PRECISION_HINT bf16"),
    Row("openvino_int8", "OpenVINO", "int8", "fxpass int8 QDQ ONNX"),
    Row("nncf_int8", "OpenVINO", "int8", "NNCF default nncf.quantize (OpenVINO baseline)"),
)
ROW_KEYS = tuple(r.key for r in ROWS)
#: runtimes --repaint-full can loop a sampler over (a denoiser on numpy arrays, no torch in the loop)
REPAINT_RUNTIMES = ("ONNX Runtime", "OpenVINO")
REPAINT_ROWS = tuple(r.key for r in ROWS if r.runtime in REPAINT_RUNTIMES)


def parse_rows(text: str | None) -> tuple[str, ...]:
    """``--precision-rows a,b``: the rows to build, in :data:`ROWS` order (eager, the reference, always)."""
    if not text:
        return ROW_KEYS
    asked = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in asked if k not in ROW_KEYS]
    if unknown:
        raise ValueError(f"unknown precision rows {', '.join(unknown)} (choose from {', '.join(ROW_KEYS)})")
    return tuple(k for k in ROW_KEYS if k == "eager" or k in asked)


# ---- which row --repaint-full runs -----------------------------------------------------------------
def pick_repaint_row(rows: list[dict[str, Any]], budget: float = GATE_BUDGET) -> tuple[str | None, str]:
    """The fastest row (per-step median on the bench config) of ONNX Runtime or OpenVINO whose eps-MSE
    stays within ``1 + budget`` of float32's at every step (its "gate"); (key, why) or (None, why)."""
    timed = [r for r in rows if r.get("runtime") in REPAINT_RUNTIMES and "median_s" in r.get("latency", {})]
    if not timed:
        return None, "no ONNX Runtime or OpenVINO row was timed"
    gated = [r for r in timed if r.get("fidelity", {}).get("max_ratio") is not None
             and np.isfinite(r["fidelity"]["max_ratio"]) and r["fidelity"]["max_ratio"] <= 1.0 + budget]
    if not gated:
        return None, f"no timed row keeps its eps-MSE within {1 + budget:g}× float32's"
    best = min(gated, key=lambda r: r["latency"]["median_s"])
    return best["key"], (f"fastest of {len(gated)} rows within the eps-MSE gate ({1 + budget:g}× float32's at "
                         f"every step on the digits reference)")


def run_repaint_full(variant: Variant, cfg, *, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """A whole RePaint run at the paper setting (``REPAINT``) through ``fxpass.sampler.sample_loop``."""
    from fxpass.diffusion import Diffusion
    from fxpass.sampler import (
        GeneratorNoise,
        jump_model_calls,
        jump_schedule,
        sample_loop,
    )

    diffusion = Diffusion.from_config(cfg)
    t_T = min(REPAINT["t_T"], diffusion.num_steps)
    jl, jn = REPAINT["jump_length"], REPAINT["jump_n_sample"]
    times = jump_schedule(t_T, jl, jn)
    calls = jump_model_calls(t_T, jl, jn)
    size = int(cfg.image_size)
    rng = np.random.default_rng(seed)
    gt = np.clip(rng.standard_normal((1, 3, size, size), dtype=np.float32) * 0.5, -1, 1)
    mask = np.zeros((1, 1, size, size), dtype=np.float32)
    mask[..., : size // 2] = 1.0  # left half known
    model_s = [0.0]

    def model(x, t_index):
        start = time.perf_counter()
        out = variant.step(np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(t_index, dtype=np.int64))
        model_s[0] += time.perf_counter() - start
        return np.asarray(out, dtype=np.float32)

    def on_step(done, total):
        if done % 100 == 0 or done == total:
            log(f"precision: repaint-full {done}/{total} model calls ({time.perf_counter() - start:.0f} s)")

    start = time.perf_counter()
    out = sample_loop(model, diffusion, times, (1, 3, size, size), noise=GeneratorNoise(seed), gt=gt, mask=mask,
                      on_step=on_step)
    wall = time.perf_counter() - start
    return {"t_T": t_T, "jump_length": jl, "jump_n_sample": jn, "model_calls": calls, "wall_s": wall,
            "model_s": model_s[0], "sampler_s": wall - model_s[0], "per_call_s": wall / calls,
            "finite": bool(np.isfinite(out).all())}


# ---- the section ---------------------------------------------------------------------------------
def run_precision(setup, opts, *, proto=None, load: LoadSampler | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every row: fidelity on the digits reference, then latency on ``setup``'s config (and the RePaint run)."""
    keys = parse_rows(opts.precision_rows)
    threads = opts.threads or os.cpu_count() or 1
    out: dict[str, Any] = {
        "rows_asked": list(keys), "threads": threads, "gate_budget": GATE_BUDGET,
        "latency_config": {"batch": 1, "image_size": setup.cfg.image_size, "t_index": setup.t_index,
                           "weights": f"seeded random (fxpass.checkpoint.init_model, seed {opts.seed})"},
        "baseline_calibration": f"{BASELINE_FEEDS} random inputs: x ~ N(0, 1), t_index evenly spaced",
    }
    rows = {r.key: {"key": r.key, "runtime": r.runtime, "precision": r.precision, "what": r.what} for r in ROWS}
    out["fxpass_int8"] = {}
    for key in ROW_KEYS:
        if key not in keys:
            rows[key]["latency"] = rows[key]["fidelity"] = {"skipped": "not in --precision-rows"}
    with tempfile.TemporaryDirectory(prefix="fxpass-bench-precision-") as tmp:
        section = _Section(opts, keys, threads, Path(tmp), load, log, out, rows)
        section.fidelity()
        built = section.latency(setup, proto)
        out["rows"] = [rows[k] for k in ROW_KEYS]
        section.repaint(setup, built)
        del built
    return out


@dataclass
class _Section:
    """One run of the section: what its parts share, the results being filled and their rows by key."""

    opts: Any
    keys: tuple[str, ...]
    threads: int
    workdir: Path
    load: LoadSampler | None
    log: Callable[[str], None]
    out: dict[str, Any]
    rows: dict[str, dict[str, Any]]

    def sample(self, where: str) -> None:
        if self.load:
            self.load.sample(where)

    def fidelity(self) -> None:
        """eps-MSE along t of every row on the digits reference, into ``out["fidelity"]`` and each row."""
        opts, out = self.opts, self.out
        self.log(f"precision: digits reference: lower {DIGITS_CHECKPOINT.name} ...")
        try:
            digits = digits_subject(self.workdir, self.threads, opts.seed)
            fidelity = run_fidelity(self.keys, digits, opts.precision_images, self.log)
            first = fidelity["first_image"]
            out["fidelity"] = {"model": "fxpass/reference/digits.pt", "config": "fxpass/reference/digits.yml",
                               "images": opts.precision_images, "heldout": "fxpass/reference/heldout",
                               "image_range": [first, first + opts.precision_images],
                               "int8_calibration": "fxpass/reference/heldout (its first images, before image_range)",
                               "steps": len(digits.model_timesteps), "seed": opts.seed, "eps_s": fidelity["eps_s"],
                               "per_t": fidelity["per_t"]}
            for key, value in fidelity["rows"].items():
                self.rows[key]["fidelity"] = value
            if "fxpass_int8_info" in digits.cache:
                out["fxpass_int8"]["digits"] = digits.cache["fxpass_int8_info"]
            del digits
        except Exception as exc:
            out["fidelity"] = {"error": short_error(exc)}
            for key in self.keys:
                self.rows[key]["fidelity"] = {"error": f"digits reference: {short_error(exc)}"}
        self.sample("after precision fidelity")

    def latency(self, setup, proto) -> dict[str, Variant]:
        """Every row built on the bench config and timed, interleaved with eager; the rows built."""
        try:
            if proto is None:
                from fxpass.pipeline import lower_with_report

                self.log("precision: lower the bench config with fxpass ...")
                proto = lower_with_report(setup.model, config=setup.cfg, verify=False).model
            subject = Subject("bench", setup.model, proto, setup.cfg, list(setup.seen), self.workdir, self.threads,
                              self.opts.seed)
            built, problems = build_all(self.keys, subject, self.log)
            if "fxpass_int8_info" in subject.cache:
                self.out["fxpass_int8"]["bench"] = subject.cache["fxpass_int8_info"]
        except Exception as exc:
            built, problems = {}, {key: {"error": short_error(exc)} for key in self.keys}
        self.sample("after precision builds")
        self._time(setup, built, problems)
        return built

    def _time(self, setup, built: dict[str, Variant], problems: dict[str, dict]) -> None:
        rows, opts = self.rows, self.opts
        x = setup.inputs["x"].numpy()
        t_index = np.array([setup.t_index], dtype=np.int64)
        ref = None
        contenders = {}
        for key, variant in built.items():
            try:
                got = np.asarray(variant.step(x, t_index), dtype=np.float64)
                if key == "eager":
                    ref = got
                contenders[key] = (lambda v=variant: v.step(x, t_index))
                rows[key]["latency"] = {"output": got}
            except Exception as exc:
                problems[key] = {"error": short_error(exc)}
        for key, problem in problems.items():
            rows[key]["latency"] = problem
        if not contenders:
            return
        self.log(f"precision: {', '.join(contenders)}: {opts.runs} timed runs each, interleaved ...")
        try:
            timings = measure_interleaved(contenders, runs=opts.runs, warmup=opts.warmup)
        except Exception as exc:  # one contender failed mid-run: no timing is comparable
            timings = {}
            for key in contenders:
                rows[key]["latency"] = {"error": f"interleaved timing: {short_error(exc)}"}
        eager = timings.get("eager", {}).get("median_s")
        for key, timing in timings.items():
            got = rows[key]["latency"].pop("output")
            entry = {**timing, "ratio_vs_eager": timing["median_s"] / eager if eager else None,
                     "build": built[key].build}
            if ref is not None and got.shape == ref.shape:
                err = float(np.max(np.abs(got - ref)))
                entry["max_rel_to_scale_vs_eager"] = err / (float(np.max(np.abs(ref))) or 1.0)
            rows[key]["latency"] = entry
        self.sample("after precision timings")

    def repaint(self, setup, built: dict[str, Variant]) -> None:
        """A whole RePaint run on the row ``--repaint-full`` names (or picks), into ``out["repaint_full"]``."""
        opts, out = self.opts, self.out
        if not opts.repaint_full:
            out["repaint_full"] = {"skipped": "off by default (--repaint-full)"}
            return
        key, why = (opts.repaint_full, "chosen with --repaint-full") if opts.repaint_full != "auto" else \
            pick_repaint_row(out["rows"])
        if key is None:
            out["repaint_full"] = {"skipped": why}
        elif key not in built or self.rows[key]["latency"].get("median_s") is None:
            out["repaint_full"] = {"row": key, "error": f"row {key} was not built and timed here"}
        else:
            self.log(f"precision: repaint-full on {key} ({why}) ...")
            try:
                out["repaint_full"] = {"row": key, "why": why,
                                       **run_repaint_full(built[key], setup.cfg, seed=opts.seed, log=self.log)}
            except Exception as exc:
                out["repaint_full"] = {"row": key, "error": short_error(exc)}
            self.sample("after repaint-full")
