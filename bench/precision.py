"""The precision section: every runtime × precision on the CPU, its speed and what it costs in accuracy.

Each row (:data:`ROWS`) is built twice, the same way:

- **latency** from the bench's config (CAMUS by default: seeded random weights, the model and inputs of
  :func:`bench.cpu.make_setup`), one denoising step at batch 1, timed in alternating rounds together
  with eager PyTorch (:func:`bench.harness.measure_interleaved`) and reported as a ratio to it;
- **fidelity** from the *trained* digits reference (``fxpass/reference/digits.pt``, lowered with fxpass
  here): eps-MSE at every step of its 50-step schedule on held-out images against the eager float32
  model (:func:`fxpass.fidelity.eps_mse_along_t`), the worst ratio over t and where.  Random weights say
  nothing about how a trained network's activations survive int8 or bf16; the digits model does.

fxpass's own int8 (``fxpass.precision.quantize_int8``, default options) calibrates and measures its plan on
the first held-out digits (``calibration_data=heldout/``, as the project's reference tests run it); the
eps-MSE is measured on the images after those.  On the bench config there are no images of its size: it
calibrates on the model's own trajectories, and with random weights its plan says nothing either.

A row that cannot be built on this machine (OpenVINO or nncf not installed, a CPU without bf16,
fxpass's int8 API missing) records ``{"unavailable": reason}``; one that fails ``{"error": ...}``;
neither ever shows a number.

The baselines are built as a user would without fxpass's int8: ONNX Runtime's ``quantize_static`` (QDQ,
per-channel, Conv+MatMul, :data:`BASELINE_FEEDS` random inputs; activations QUInt8, because the
default QInt8 makes ONNX Runtime 1.32 refuse the file at load: the Softmax output's QuantizeLinear
gets a uint8 zero point with an int8 output type) and NNCF's ``nncf.quantize`` at default parameters
on the same feeds.  ``--repaint-full`` times a whole RePaint run at the paper setting on the fastest
row within the fidelity budget.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .harness import LoadSampler, measure_interleaved, ort_session, short_error

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "fxpass" / "reference"
DIGITS_CHECKPOINT = REFERENCE_DIR / "digits.pt"
DIGITS_CONFIG = REFERENCE_DIR / "digits.yml"
HELDOUT_DIR = REFERENCE_DIR / "heldout"
#: random calibration inputs of the two baselines (ORT quantize_static, NNCF): x ~ N(0, 1), t_index spread
BASELINE_FEEDS = 8
#: a row is "gated" (fit for --repaint-full's automatic choice) when its eps-MSE stays within this
#: fraction of float32's at every step (fxpass.precision.Int8Options' default error_budget)
GATE_BUDGET = 0.05
#: RePaint's paper setting: 250 steps, jumps of 10, 10 resamplings (2,410 model calls)
REPAINT = {"t_T": 250, "jump_length": 10, "jump_n_sample": 10}
NNCF_HINT = "pip install 'fxpass[bench]'"


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


class Unavailable(Exception):
    """This row cannot be built on this machine (the message says why); not a failure."""


def parse_rows(text: str | None) -> tuple[str, ...]:
    """``--precision-rows a,b``: the rows to build, in :data:`ROWS` order (eager, the reference, always)."""
    if not text:
        return ROW_KEYS
    asked = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in asked if k not in ROW_KEYS]
    if unknown:
        raise ValueError(f"unknown precision rows {', '.join(unknown)} (choose from {', '.join(ROW_KEYS)})")
    return tuple(k for k in ROW_KEYS if k == "eager" or k in asked)


# ---- what the rows are built from ---------------------------------------------------------------
@dataclass
class Subject:
    """One model the rows are built from: the eager module, its fxpass fp32 ONNX, config and schedule."""

    name: str
    model: torch.nn.Module
    proto: Any  # onnx.ModelProto, fp32, table mode, static batch 1
    cfg: Any
    model_timesteps: list  # what the U-Net sees per t_index
    workdir: Path
    threads: int
    seed: int = 0
    calibration_data: Path | None = None  # images fxpass's int8 calibrates on (None: the model's own trajectories)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.cfg.image_size)


@dataclass
class Variant:
    """A built row: ``step(x, t_index)`` on float32 [1, 3, H, W] and int64 [1], and how it was built."""

    step: Callable[[np.ndarray, np.ndarray], np.ndarray]
    build: dict[str, Any]
    batched: bool = False  # step takes any batch (eager PyTorch)

    def denoiser(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """``fn(x, t_index)`` over any batch: whole for a batched row, else one image at a time (the ONNX
        files have a static batch of 1)."""
        if self.batched:
            return self.step

        def fn(x: np.ndarray, t_index: np.ndarray) -> np.ndarray:
            return np.concatenate([np.asarray(self.step(x[i:i + 1], t_index[i:i + 1]), dtype=np.float32)
                                   for i in range(x.shape[0])])
        return fn


def baseline_feeds(image_size: int, steps: int, *, count: int = BASELINE_FEEDS, seed: int = 0) -> list[dict]:
    """The baselines' calibration inputs: x ~ N(0, 1) (seeded), t_index evenly spaced over the schedule."""
    rng = np.random.default_rng(seed)
    indices = np.linspace(0, steps - 1, count).round().astype(np.int64)
    return [{"x": rng.standard_normal((1, 3, image_size, image_size), dtype=np.float32),
             "t_index": np.array([i], dtype=np.int64)} for i in indices]


def _onnx_file(subject: Subject, name: str, proto) -> Path:
    import onnx

    path = subject.workdir / f"{subject.name}-{name}.onnx"
    if not path.exists():
        onnx.save(proto, str(path))
    return path


def _torch_step(model, model_timesteps: list) -> Callable:
    timesteps = torch.as_tensor(list(model_timesteps))

    def step(x: np.ndarray, t_index: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            return model(xt, timesteps[torch.from_numpy(np.asarray(t_index, dtype=np.int64))]).numpy()
    return step


def _ort_step(session) -> Callable:
    def step(x: np.ndarray, t_index: np.ndarray) -> np.ndarray:
        return session.run(None, {"x": x, "t_index": t_index})[0]
    return step


def _openvino_reason(precision: str) -> str | None:
    from targets.openvino import openvino_unavailable_reason

    return openvino_unavailable_reason(precision)


def _openvino_compile(model, precision: str, threads: int) -> tuple[Any, dict[str, Any]]:
    """Compile an ONNX path or ``openvino.Model`` for the CPU at ``precision`` (f32 or bf16), LATENCY hint;
    refuses a compiled model whose precision is not the one asked (a CPU that silently falls back)."""
    import openvino as ov

    core = ov.Core()
    if isinstance(model, (str, os.PathLike)):
        model = core.read_model(os.fspath(model))
    props = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": int(threads),
             "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(model, "CPU", props)
    got = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    if {"f32": "float32", "bf16": "bfloat16"}[precision] not in got and precision not in got:
        raise RuntimeError(f"OpenVINO compiled at {got}, not {precision}")
    return compiled, {"openvino": ov.get_version().split("-")[0], "properties": props,
                      "runtime_precisions": _runtime_precisions(compiled)}


def _runtime_precisions(compiled) -> dict[str, int]:
    """How many layers of the compiled (executed) graph run at each precision: int8 rows show i8/u8."""
    try:
        counts = Counter(str(op.get_rt_info()["runtimePrecision"].astype(str))
                         for op in compiled.get_runtime_model().get_ordered_ops())
    except Exception:  # the execution graph's rt_info is not a stable API
        return {}
    return dict(counts.most_common())


def _openvino_step(compiled) -> Callable:
    request = compiled.create_infer_request()
    out = compiled.output(0)

    def step(x: np.ndarray, t_index: np.ndarray) -> np.ndarray:
        return request.infer({"x": x, "t_index": t_index})[out]
    return step


def _fxpass_int8(subject: Subject, log: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """fxpass's own int8 (``fxpass.precision.quantize_int8``), once per subject; (QDQ file, build info)."""
    if "fxpass_int8" in subject.cache:
        cached = subject.cache["fxpass_int8"]
        if isinstance(cached, BaseException):
            raise cached
        return cached
    try:
        if importlib.util.find_spec("fxpass.precision") is None:
            raise Unavailable("fxpass.precision (fxpass's int8 API) is not in this checkout")
        from fxpass.precision import Int8Options, quantize_int8

        options = Int8Options(calibration_data=subject.calibration_data, seed=subject.seed, threads=subject.threads)
        log(f"precision: {subject.name}: fxpass quantize_int8 (measures a precision plan; minutes on CAMUS) ...")
        start = time.perf_counter()
        proto_q, info = quantize_int8(subject.proto, subject.cfg, options,
                                      progress=lambda *a: log(f"precision: {subject.name}: int8 "
                                                              + " ".join(str(v) for v in a)))
        seconds = time.perf_counter() - start
        subject.cache["fxpass_int8_info"] = {
            "quantize_s": seconds, "options": _jsonable(getattr(options, "__dict__", None) or repr(options)),
            "plan": _jsonable(info.get("plan")), "info": _small_info(info)}
        build = {"quantize_s": seconds, "plan": f"precision.fxpass_int8.{subject.name}"}
        result = (_onnx_file(subject, "int8-fxpass", proto_q), build)
    except BaseException as exc:
        subject.cache["fxpass_int8"] = exc
        raise
    subject.cache["fxpass_int8"] = result
    return result


def _jsonable(value):
    import json

    try:
        json.dumps(value)
        return value
    except TypeError:
        return json.loads(json.dumps(value, default=str))


def _small_info(info: dict) -> dict:
    """quantize_int8's info without its plan (kept apart) and without anything bulky."""
    import json

    out = {}
    for k, v in info.items():
        if k == "plan":
            continue
        text = json.dumps(v, default=str)
        out[k] = _jsonable(v) if len(text) <= 20_000 else f"<{len(text):,} characters, left out>"
    return out


def _ort_default_int8(subject: Subject) -> tuple[Path, dict[str, Any]]:
    """The naive ONNX Runtime baseline: ``quantize_static`` QDQ, per-channel, U8S8, Conv+MatMul."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    feeds = baseline_feeds(subject.image_size, len(subject.model_timesteps), seed=subject.seed)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    fp32 = _onnx_file(subject, "fp32", subject.proto)
    out = subject.workdir / f"{subject.name}-int8-ort-default.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" warnings
    try:
        start = time.perf_counter()
        quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul"])
        seconds = time.perf_counter() - start
    finally:
        root.setLevel(level)
    return out, {"quantize_s": seconds, "calibration": f"{len(feeds)} random inputs (x ~ N(0, 1), t_index spread)",
                 "settings": "QDQ, per_channel=True, activation QUInt8, weight QInt8, Conv+MatMul, MinMax",
                 "note": "activation QUInt8: with the default QInt8 ONNX Runtime 1.32 refuses the file at load "
                         "(the Softmax output's QuantizeLinear gets a uint8 zero point with an int8 output type)"}


def build_variant(key: str, subject: Subject, log: Callable[[str], None] = print) -> Variant:
    """Build row ``key`` from ``subject``; :class:`Unavailable` where this machine cannot."""
    if key == "eager":
        return Variant(_torch_step(subject.model, subject.model_timesteps), {}, batched=True)
    if key == "torch_compile":
        from torch._dynamo.utils import counters

        # called at batch 1 everywhere, the eps-MSE too: a second batch size would cost a dynamic-shape
        # recompile (43 s on the digits model, more than its 1,600 batch-1 calls take)
        torch._dynamo.reset()  # a fresh compile: the same graph compiled earlier in the process would be reused
        compiled = torch.compile(copy.deepcopy(subject.model))
        step = _torch_step(compiled, subject.model_timesteps)
        x = np.zeros((1, 3, subject.image_size, subject.image_size), dtype=np.float32)
        graphs = counters["stats"]["unique_graphs"]
        dynamo_log = logging.getLogger("torch._dynamo")
        level = dynamo_log.level
        dynamo_log.setLevel(logging.ERROR)  # the graph break at the model's .item() check (two graphs, below)
        try:
            start = time.perf_counter()
            step(x, np.array([0], dtype=np.int64))  # compiles
            seconds = time.perf_counter() - start
        finally:
            dynamo_log.setLevel(level)
        return Variant(step, {"compile_s": seconds, "backend": "inductor", "mode": "default",
                              "graphs": counters["stats"]["unique_graphs"] - graphs})
    if key == "ort_fp32":
        return Variant(_ort_step(ort_session(subject.proto, subject.threads)), {})
    if key == "ort_int8":
        path, build = _fxpass_int8(subject, log)
        return Variant(_ort_step(ort_session(path, subject.threads)), build)
    if key == "ort_int8_default":
        path, build = _ort_default_int8(subject)
        return Variant(_ort_step(ort_session(path, subject.threads)), build)
    if key in ("openvino_fp32", "openvino_bf16", "openvino_int8", "nncf_int8"):
        precision = "bf16" if key == "openvino_bf16" else "f32"
        reason = _openvino_reason(precision)
        if reason:
            raise Unavailable(reason)
        if key == "openvino_int8":
            path, build = _fxpass_int8(subject, log)
            compiled, info = _openvino_compile(path, precision, subject.threads)
            return Variant(_openvino_step(compiled), {**build, **info})
        if key == "nncf_int8":
            return _nncf_variant(subject)
        compiled, info = _openvino_compile(_onnx_file(subject, "fp32", subject.proto), precision, subject.threads)
        return Variant(_openvino_step(compiled), info)
    raise ValueError(f"unknown precision row {key!r}")


def _nncf_variant(subject: Subject) -> Variant:
    if importlib.util.find_spec("nncf") is None:
        raise Unavailable(f"nncf is not installed ({NNCF_HINT})")
    import nncf
    import openvino as ov

    feeds = baseline_feeds(subject.image_size, len(subject.model_timesteps), seed=subject.seed)
    model = ov.Core().read_model(str(_onnx_file(subject, "fp32", subject.proto)))
    start = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(feeds))
    seconds = time.perf_counter() - start
    compiled, info = _openvino_compile(quantized, "f32", subject.threads)
    return Variant(_openvino_step(compiled), {"quantize_s": seconds, "nncf": nncf.__version__,
                                              "calibration": f"{len(feeds)} random inputs (x ~ N(0, 1), "
                                                             "t_index spread)",
                                              "settings": "nncf.quantize defaults", **info})


def build_all(keys, subject: Subject, log: Callable[[str], None]) -> tuple[dict[str, Variant], dict[str, dict]]:
    """(built rows, {key: {"unavailable"/"error": ...}} for the others)."""
    built: dict[str, Variant] = {}
    problems: dict[str, dict] = {}
    for key in keys:
        log(f"precision: {subject.name}: build {key} ...")
        start = time.perf_counter()
        try:
            variant = build_variant(key, subject, log)
            variant.build.setdefault("build_s", time.perf_counter() - start)
            built[key] = variant
        except Unavailable as exc:
            problems[key] = {"unavailable": str(exc)}
        except Exception as exc:
            problems[key] = {"error": short_error(exc)}
        if key in problems:
            log(f"precision: {subject.name}: {key}: " + "; ".join(f"{k}: {v}" for k, v in problems[key].items()))
    return built, problems


# ---- fidelity on the digits reference ------------------------------------------------------------
def digits_subject(workdir: Path, threads: int, seed: int = 0) -> Subject:
    from fxpass.checkpoint import load_model
    from fxpass.config import load_config
    from fxpass.pipeline import lower_with_report

    cfg = load_config(DIGITS_CONFIG)
    model = load_model(DIGITS_CHECKPOINT, config=cfg).float().eval()
    lowered = lower_with_report(model, config=cfg)
    return Subject("digits", model, lowered.model, cfg, list(lowered.model_timesteps), workdir, threads, seed,
                   calibration_data=HELDOUT_DIR)


def int8_images_used() -> int:
    """How many of the first held-out images fxpass's int8 reads (calibration + its plan's evaluation) with
    its default options: the eps-MSE is measured on the images after them."""
    try:
        from fxpass.precision import Int8Options

        options = Int8Options()
        return int(options.calibration_samples) + int(getattr(options, "eval_samples", 0))
    except Exception:  # not in this checkout, or another Int8Options: the count of the current defaults
        return 8


def run_fidelity(keys, subject: Subject, images: int, log: Callable[[str], None]) -> dict[str, Any]:
    """eps-MSE of every row vs the eager float32 model on ``images`` held-out digits, every step."""
    from fxpass.denoisers import TorchDenoiser
    from fxpass.diffusion import Diffusion
    from fxpass.fidelity import eps_mse_along_t, summarize
    from fxpass.images import load_image_dir

    skip = int8_images_used() if subject.calibration_data is not None else 0
    x0 = load_image_dir(HELDOUT_DIR, subject.image_size, skip + images)[skip:]
    diffusion = Diffusion.from_config(subject.cfg)
    built, problems = build_all([k for k in keys if k != "eager"], subject, log)
    failed: dict[str, str] = {}
    spent: dict[str, float] = {}

    def guarded(key: str, fn):
        def call(x, t_index):
            if key not in failed:
                start = time.perf_counter()
                try:
                    return fn(x, t_index)
                except Exception as exc:
                    failed[key] = short_error(exc)
                finally:
                    spent[key] = spent.get(key, 0.0) + time.perf_counter() - start
            return np.full((x.shape[0], diffusion.out_channels, *x.shape[2:]), np.nan, dtype=np.float32)
        return call

    denoisers = {"eager": TorchDenoiser(subject.model, diffusion, subject.model_timesteps)}
    denoisers.update({k: guarded(k, v.denoiser()) for k, v in built.items()})
    log(f"precision: digits eps-MSE: {len(denoisers) - 1} rows × {diffusion.num_steps} steps × {x0.shape[0]} images ...")
    start = time.perf_counter()
    rows = eps_mse_along_t(denoisers, x0, diffusion, reference="eager", seed=subject.seed,
                           progress=lambda done, total: log(f"precision: digits eps-MSE step {done}/{total}")
                           if done % 10 == 0 or done == total else None)
    seconds = time.perf_counter() - start
    summary = summarize(rows)
    out: dict[str, Any] = {"eager": {"reference": True, "mean_eps_mse": summary["mean_eps_mse"]["eager"]}}
    for key in keys:
        if key == "eager":
            continue
        if key in problems:
            out[key] = problems[key]
        elif key in failed:
            out[key] = {"error": failed[key], "build": built[key].build}
        else:
            out[key] = {**fidelity_stats(rows, key), "mean_eps_mse": summary["mean_eps_mse"][key],
                        "eval_s": spent.get(key), "build": built[key].build}
    return {"rows": out, "eps_s": seconds, "first_image": skip, "per_t": [{"t_index": r["t_index"], "timestep": r["timestep"],
                                                      "eps_mse": r["eps_mse"]} for r in rows]}


def fidelity_stats(rows: list[dict], key: str) -> dict[str, Any]:
    """A row's eps-MSE ratio to the reference over t: the worst (farthest from 1, as
    :func:`fxpass.fidelity.summarize` picks it), the largest and the mean, each with where."""
    ratios = [(r["ratio"][key], r["t_index"], r["timestep"]) for r in rows]
    worst = max(ratios, key=lambda v: abs(v[0] - 1.0))
    largest = max(ratios, key=lambda v: v[0])
    return {"worst_ratio": worst[0], "t_index": worst[1], "timestep": worst[2],
            "max_ratio": largest[0], "max_ratio_t_index": largest[1],
            "mean_ratio": float(np.mean([v[0] for v in ratios])), "steps": len(ratios)}


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
        # ---- fidelity: the digits reference --------------------------------------------------------
        log(f"precision: digits reference: lower {DIGITS_CHECKPOINT.name} ...")
        try:
            digits = digits_subject(Path(tmp), threads, opts.seed)
            fidelity = run_fidelity(keys, digits, opts.precision_images, log)
            first = fidelity["first_image"]
            out["fidelity"] = {"model": "fxpass/reference/digits.pt", "config": "fxpass/reference/digits.yml",
                               "images": opts.precision_images, "heldout": "fxpass/reference/heldout",
                               "image_range": [first, first + opts.precision_images],
                               "int8_calibration": "fxpass/reference/heldout (its first images, before image_range)",
                               "steps": len(digits.model_timesteps), "seed": opts.seed, "eps_s": fidelity["eps_s"],
                               "per_t": fidelity["per_t"]}
            for key, value in fidelity["rows"].items():
                rows[key]["fidelity"] = value
            if "fxpass_int8_info" in digits.cache:
                out["fxpass_int8"]["digits"] = digits.cache["fxpass_int8_info"]
            del digits
        except Exception as exc:
            out["fidelity"] = {"error": short_error(exc)}
            for key in keys:
                rows[key]["fidelity"] = {"error": f"digits reference: {short_error(exc)}"}
        if load:
            load.sample("after precision fidelity")

        # ---- latency: the bench config --------------------------------------------------------------
        try:
            if proto is None:
                from fxpass.pipeline import lower_with_report

                log("precision: lower the bench config with fxpass ...")
                proto = lower_with_report(setup.model, config=setup.cfg, verify=False).model
            subject = Subject("bench", setup.model, proto, setup.cfg, list(setup.seen), Path(tmp), threads, opts.seed)
            built, problems = build_all(keys, subject, log)
            if "fxpass_int8_info" in subject.cache:
                out["fxpass_int8"]["bench"] = subject.cache["fxpass_int8_info"]
        except Exception as exc:
            built, problems = {}, {key: {"error": short_error(exc)} for key in keys}
        if load:
            load.sample("after precision builds")
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
        if contenders:
            log(f"precision: {', '.join(contenders)}: {opts.runs} timed runs each, interleaved ...")
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
            if load:
                load.sample("after precision timings")
        out["rows"] = [rows[k] for k in ROW_KEYS]

        # ---- a whole RePaint run ------------------------------------------------------------------------
        if not opts.repaint_full:
            out["repaint_full"] = {"skipped": "off by default (--repaint-full)"}
        else:
            key, why = (opts.repaint_full, "chosen with --repaint-full") if opts.repaint_full != "auto" else \
                pick_repaint_row(out["rows"])
            if key is None:
                out["repaint_full"] = {"skipped": why}
            elif key not in built or rows[key]["latency"].get("median_s") is None:
                out["repaint_full"] = {"row": key, "error": f"row {key} was not built and timed here"}
            else:
                log(f"precision: repaint-full on {key} ({why}) ...")
                try:
                    out["repaint_full"] = {"row": key, "why": why,
                                           **run_repaint_full(built[key], setup.cfg, seed=opts.seed, log=log)}
                except Exception as exc:
                    out["repaint_full"] = {"row": key, "error": short_error(exc)}
                if load:
                    load.sample("after repaint-full")
        del built, contenders
    return out
