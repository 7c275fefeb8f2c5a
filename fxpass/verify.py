"""Verification: one seeded input source, the reference runner, and every numeric check fxpass makes.

All comparisons go through Polygraphy (``targets.compare``): ``fxpass lower``'s gate
(:func:`check_against_eager`, :func:`check_step_against_numpy`), ``fxpass check`` across runtimes and
golden sets (:func:`check_targets`) and the golden writer use :func:`seeded_feeds`, which draws every
input of the ONNX graph from one ``numpy.random.default_rng(seed)`` in the graph's input order.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FxpassError, first_line

REFERENCE_NAME = "torch-fp32"
TARGETS = ("torch", "ort", "trt", "openvino", "openvino-bf16")
EXIT_FAILED = 1
EXIT_UNAVAILABLE = 3
#: the gate's full-network comparison: the ends, the middle and this many seeded schedule positions
GATE_SAMPLED_STEPS = 2
#: batch sizes the gate adds when the batch dimension is dynamic (with mixed t_index values)
DYNAMIC_BATCHES = (2, 3)


# ---- inputs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype name and shape (-1 for a symbolic dimension)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


def input_specs(model) -> list[InputSpec]:
    """The non-initializer inputs of an ``onnx.ModelProto`` or an :class:`~fxpass.metadata.OnnxInfo`."""
    from .metadata import graph_inputs

    inputs = model.inputs if hasattr(model, "inputs") else graph_inputs(model)
    return [InputSpec(n, d, tuple(s)) for n, (d, s) in inputs.items()]


@dataclass
class Feeds:
    feeds: list[dict]
    labels: list[dict]  # per feed: t_index / timestep / model_timestep (or input number in fixed mode)


def seeded_feeds(specs: Sequence[InputSpec], *, seed: int, timesteps: Sequence, model_timesteps: Sequence,
                 t_indices: Sequence[int] | Sequence[Sequence[int]] | None = None, count: int = 2,
                 batch: int | None = None, num_classes: int = 1000) -> Feeds:
    """Seeded feeds: one per entry of ``t_indices`` (table/step) or ``count`` of them (fixed mode).

    An entry of ``t_indices`` is an int (every row of the batch at that index) or a sequence (one
    index per row: a mixed batch).  Float inputs are standard normal, ``t_index`` is the index,
    other integer inputs (class labels) are uniform in ``0..num_classes-1``.  Draws follow the
    graph's input order, per feed.  ``batch`` defaults to the model's static batch (else 1).
    """
    rng = np.random.default_rng(seed)
    by_name = {s.name: s for s in specs}
    static_batch = by_name["x"].shape[0] if "x" in by_name and by_name["x"].shape else -1
    items: list = list(t_indices) if t_indices is not None else list(range(count))
    feeds, labels = [], []
    for k, item in enumerate(items):
        if t_indices is not None:
            rows = [int(i) for i in item] if isinstance(item, (list, tuple, np.ndarray)) else None
            n = len(rows) if rows else (batch or (static_batch if static_batch > 0 else 1))
            index = np.asarray(rows if rows else [int(item)] * n, dtype=np.int64)
            label = {"t_index": int(index[0]), "timestep": timesteps[int(index[0])],
                     "model_timestep": model_timesteps[int(index[0])]}
            if rows and len(set(rows)) > 1:
                label["t_indices"] = rows
        else:
            n = batch or (static_batch if static_batch > 0 else 1)
            index = None
            label = {"input": k, "timestep": timesteps[0], "model_timestep": model_timesteps[0]}
        if n != 1:
            label["batch"] = n
        feed = {}
        for spec in specs:
            shape = tuple(n if i == 0 else (1 if d < 0 else d) for i, d in enumerate(spec.shape))
            if spec.name == "t_index":
                feed[spec.name] = index if index is not None else np.zeros(shape, np.int64)
            elif spec.dtype.startswith("float") or spec.dtype == "bfloat16":
                feed[spec.name] = rng.standard_normal(shape, dtype=np.float32).astype(
                    spec.dtype if spec.dtype in ("float16", "float64") else np.float32)
            else:
                feed[spec.name] = rng.integers(0, num_classes, size=shape, dtype=np.int64).astype(spec.dtype)
        feeds.append(feed)
        labels.append(label)
    return Feeds(feeds, labels)


def spread(n: int, k: int = 5) -> list[int]:
    """``k`` t_index values spread evenly over ``0..n-1`` (both ends included)."""
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n, k))})


def gate_t_indices(n: int, seed: int, sampled: int = GATE_SAMPLED_STEPS) -> list[int]:
    """The gate's schedule positions: first, middle, last and ``sampled`` seeded others."""
    chosen = {0, n // 2, n - 1}
    others = [i for i in range(n) if i not in chosen]
    if others:
        rng = np.random.default_rng(seed)
        chosen |= {int(i) for i in rng.choice(others, size=min(sampled, len(others)), replace=False)}
    return sorted(chosen)


def mixed_batches(n: int, seed: int, sizes: Sequence[int] = DYNAMIC_BATCHES) -> list[list[int]]:
    """For a dynamic batch: one feed per size, its rows at different seeded t_index values."""
    rng = np.random.default_rng(seed + 1)
    return [[int(i) for i in rng.choice(n, size=b, replace=n < b)] for b in sizes]


def num_classes_of(model) -> int:
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else 1000


# ---- the reference ----------------------------------------------------------------------------------
def reference_runner(model, *, mode: str, model_timesteps: Sequence, image_size: int | None = None,
                     specs: Sequence[InputSpec] = (), name: str = REFERENCE_NAME):
    """The eager float32 model as a Polygraphy runner, ``t_index`` mapped to the model's timesteps;
    inputs of ``specs`` other than x and t_index are passed to the model by name."""
    from targets.torch_ref import TorchReferenceRunner

    extra = [(s.name, s.dtype, s.shape) for s in specs if s.name not in ("x", "t_index")]
    if mode == "fixed":
        runner = TorchReferenceRunner(model, fixed_timestep=model_timesteps[0], image_size=image_size, name=name,
                                      extra_inputs=extra)
    else:
        runner = TorchReferenceRunner(model, timesteps=list(model_timesteps), image_size=image_size, name=name,
                                      extra_inputs=extra)
    return _x_as_in_graph(runner, specs)


def _x_as_in_graph(runner, specs: Sequence[InputSpec]):
    """The runner declares ``x`` as the graph has it (any channel count and rank: a 5-channel or a 3-D
    model), not as fxpass's own 3-channel U-Net takes it."""
    x = next((s for s in specs if s.name == "x"), None)
    if x is None or len(x.shape) < 2:
        return runner
    declared = runner.get_input_metadata_impl

    def get_input_metadata_impl():
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for key, value in declared().items():
            shape = (-1, *x.shape[1:]) if key == "x" else value.shape
            meta.add(key, value.dtype, shape)
        return meta

    runner.get_input_metadata_impl = get_input_metadata_impl
    return runner


def _summary(pair, ort_runs, tolerance: tuple[float, float]) -> dict[str, Any]:
    """The numbers a check reports: worst errors, per-input errors, ORT latency (median after the first run)."""
    runtimes = [r.runtime for r in ort_runs]
    out = {
        "passed": pair.passed,
        "max_abs": pair.max_abs,
        "max_rel_to_scale": pair.max_rel_to_scale,
        "tolerance": {"atol_scale": tolerance[0], "rtol": tolerance[1]},
        "per_input": pair.per_iteration,
        "ort_latency_s": float(np.median(runtimes[1:] if len(runtimes) > 1 else runtimes)),
    }
    nonfinite = getattr(pair, "nonfinite", None)
    if nonfinite:
        out["nonfinite"] = nonfinite
    return out


def _gate_items(meta, seed: int, t_indices: Sequence[int] | None, dynamic_batch: bool) -> list:
    n = len(meta.timesteps)
    items: list = list(t_indices) if t_indices is not None else gate_t_indices(n, seed)
    if dynamic_batch:
        items += mixed_batches(n, seed)
    return items


def check_against_eager(proto, model, *, config=None, t_indices: Sequence[int] | None = None, seed: int = 1234,
                        tolerance: tuple[float, float] = (1e-4, 0.0), runtime: str = "ort") -> dict[str, Any]:
    """ONNX Runtime (CPU) against the eager float32 model on seeded inputs, through Polygraphy;
    ``runtime="openvino-bf16"`` runs the model on OpenVINO at bf16 inference precision instead.

    Table mode: one input per t_index (default: first, middle, last and seeded others; with a
    dynamic batch also batches of 2 and 3 at mixed t_index); fixed mode: two seeded inputs.
    Returns worst errors, per-input errors, ORT latency and pass/fail.
    """
    from targets.compare import compare, run_runners
    from targets.ort import ort_runner

    from . import metadata

    meta = metadata.parse(metadata.read_props(proto), "lowered model")
    if meta.mode == "step":
        return check_step_against_numpy(proto, model, config=config, t_indices=t_indices, seed=seed,
                                        tolerance=tolerance)
    specs = input_specs(proto)
    dynamic = specs[0].shape[0] < 0
    items = _gate_items(meta, seed, t_indices, dynamic) if meta.mode == "table" else None
    feeds = seeded_feeds(specs, seed=seed, timesteps=meta.timesteps, model_timesteps=meta.model_timesteps,
                         t_indices=items, count=2, num_classes=num_classes_of(model))
    if meta.mode == "fixed" and dynamic:  # fixed mode: the extra feeds at batch 2 and 3
        extra = [seeded_feeds(specs, seed=seed + b, timesteps=meta.timesteps, model_timesteps=meta.model_timesteps,
                              count=1, batch=b, num_classes=num_classes_of(model)) for b in DYNAMIC_BATCHES]
        feeds = Feeds(feeds.feeds + [f.feeds[0] for f in extra], feeds.labels + [f.labels[0] for f in extra])
    image_size = config.image_size if config is not None else None
    reference = reference_runner(model, mode=meta.mode, model_timesteps=meta.model_timesteps, image_size=image_size,
                                 specs=specs)
    if runtime == "openvino-bf16":  # OpenVINO reads a file: the proto goes to a temporary one
        from surgery.modelio import save_model
        from targets.openvino import openvino_runner

        with tempfile.TemporaryDirectory(prefix="fxpass-verify-") as tmp:
            path = Path(tmp) / "model.onnx"
            save_model(proto, path)
            runner = openvino_runner(str(path), precision="bf16")
            results = run_runners([reference, runner], feeds.feeds)
    else:
        runner = ort_runner(proto, cuda=False, name="onnxrt-cpu")
        results = run_runners([reference, runner], feeds.feeds)
    pair = compare(results, reference=REFERENCE_NAME, atol_scale=tolerance[0], rtol=tolerance[1],
                   meta=feeds.labels)[0]
    summary = _summary(pair, results[runner.name], tolerance)
    summary["runtime"] = runner.name
    return summary


def check_step_against_numpy(proto, model, *, config, t_indices: Sequence[int] | None = None, seed: int = 1234,
                             tolerance: tuple[float, float] = (1e-4, 0.0)) -> dict[str, Any]:
    """A step graph on ONNX Runtime against the eager model + the NumPy sampler's posterior (Polygraphy)."""
    from targets.compare import compare, run_runners
    from targets.ort import ort_runner
    from targets.step_ref import NumpyStepRunner

    from . import metadata
    from .diffusion import Diffusion

    meta = metadata.parse(metadata.read_props(proto), "lowered model", require=("step",))
    specs = input_specs(proto)
    items = _gate_items(meta, seed, t_indices, specs[0].shape[0] < 0)
    feeds = seeded_feeds(specs, seed=seed, timesteps=meta.timesteps, model_timesteps=meta.model_timesteps,
                         t_indices=items, num_classes=num_classes_of(model))
    diffusion = Diffusion.from_config(config.to_dict())
    reference = NumpyStepRunner(model.eval(), diffusion, meta.model_timesteps)
    runner = ort_runner(proto, cuda=False, name="onnxrt-cpu")
    results = run_runners([reference, runner], feeds.feeds)

    def conditioning(iteration: int, output: str) -> float:
        # pred_xstart = sqrt(1/abar) x - sqrt(1/abar - 1) eps multiplies the U-Net's float32 error
        if output != "pred_xstart":
            return 1.0
        rows = np.asarray(feeds.feeds[iteration]["t_index"]).ravel()
        return float(max(diffusion.sqrt_recipm1_alphas_cumprod[int(i)] for i in rows))

    pair = compare(results, reference="numpy-step", atol_scale=tolerance[0], rtol=tolerance[1], meta=feeds.labels,
                   conditioning=conditioning)[0]
    return {**_summary(pair, results["onnxrt-cpu"], tolerance), "reference": "eager model + NumPy posterior"}


# ---- fxpass check: several runtimes and golden sets -----------------------------------------------
@dataclass
class Row:
    """One line of the check's table."""

    reference: str
    target: str
    status: str  # "pass", "FAIL", "unavailable", "error"
    detail: str = ""
    inputs: int = 0
    max_abs: float | None = None
    max_rel: float | None = None
    tolerance: tuple[float, float] | None = None
    per_iteration: list = field(default_factory=list)


def parse_targets(text: str | None) -> list[str]:
    items = [t.strip().lower() for t in (text or "").split(",") if t.strip()]
    if not items:
        raise FxpassError(f"--targets {text!r}: give one or more of {', '.join(TARGETS)}")
    aliases = {"onnxrt": "ort", "onnxruntime": "ort", "tensorrt": "trt", "pytorch": "torch", "ov": "openvino",
               "openvino-f32": "openvino", "openvino-fp32": "openvino", "ov-bf16": "openvino-bf16"}
    out: list[str] = []
    for item in items:
        item = aliases.get(item, item)
        if item not in TARGETS:
            raise FxpassError(f"--targets {text}: unknown target '{item}' (choose from {', '.join(TARGETS)})")
        if item not in out:
            out.append(item)
    return out


def parse_tolerance(text: str) -> tuple[float, float]:
    from targets.compare import parse_tolerance as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise FxpassError(f"--tolerance: {exc}") from None


def _timing_cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fxpass"
    return base / "trt-timing.cache"


def build_runners(targets: Sequence[str], path: Path, *, fp16: bool) -> tuple[list, dict[str, str]]:
    """Polygraphy runners for the runtime targets (not torch); unavailable ones as {name: reason}."""
    runners: list = []
    unavailable: dict[str, str] = {}
    if "ort" in targets:
        from targets.ort import ort_runner

        runners.append(ort_runner(str(path), cuda=None))
    if "trt" in targets:
        from targets.trt import TrtSettings, trt_runner, trt_unavailable_reason

        reason = trt_unavailable_reason()
        if reason:
            unavailable["tensorrt"] = reason
        else:
            settings = TrtSettings(fp16=fp16, tf32=fp16, timing_cache=_timing_cache_path())
            _timing_cache_path().parent.mkdir(parents=True, exist_ok=True)
            runners.append(trt_runner(str(path), settings))
    precisions = [p for t, p in (("openvino", "f32"), ("openvino-bf16", "bf16")) if t in targets]
    if precisions:
        from targets.openvino import openvino_runner, openvino_unavailable_reason, runner_name

        for precision in precisions:
            reason = openvino_unavailable_reason(precision)
            if reason:
                unavailable[runner_name(precision)] = reason
            else:  # runner.tolerance: what its outputs should be compared at (bf16 looser than f32)
                runners.append(openvino_runner(str(path), precision=precision))
    return runners, unavailable


def run_each(runners: list, feeds: list[dict]):
    """Run each runner on its own (one failing runner does not lose the others' results).

    Returns (RunResults of those that ran, {runner name: error line})."""
    from polygraphy.comparator import RunResults

    from targets.compare import run_runners

    merged, errors = RunResults(), {}
    for runner in runners:
        try:
            results = run_runners([runner], feeds)
        except Exception as exc:  # Polygraphy reports runner failures as its own exception type
            errors[runner.name] = first_line(exc)
            continue
        for name, iterations in results.items():
            merged[name] = iterations
    return merged, errors


def runner_tolerances(runners, tolerance: tuple[float, float] | None,
                      default: tuple[float, float]) -> dict[str, tuple[float, float]]:
    """The tolerance each runner's rows are checked at: ``tolerance`` (``--tolerance``) when given, else
    the looser of ``default`` and the runner's own ``tolerance`` (OpenVINO bf16's), else ``default``."""
    out = {}
    for runner in runners:
        own = getattr(runner, "tolerance", None)
        out[runner.name] = tolerance or (tuple(max(a, b) for a, b in zip(default, own)) if own else default)
    return out


def compare_rows(results, reference: str, tol: tuple[float, float], labels: list[dict],
                 ref_label: str | None = None, tolerances: dict[str, tuple[float, float]] | None = None) -> list[Row]:
    """Rows of every runner against ``reference`` at ``tol``, or at ``tolerances[name]`` where given."""
    from polygraphy.comparator import RunResults

    from targets.compare import compare

    if tolerances:  # one comparison per runner, each at its own tolerance, in the results' order
        rows = []
        for name, runs in results.items():
            if name != reference:
                pair = RunResults([(reference, results[reference]), (name, runs)])
                rows += compare_rows(pair, reference, tolerances.get(name, tol), labels, ref_label)
        return rows
    rows = []
    for pair in compare(results, reference=reference, atol_scale=tol[0], rtol=tol[1], meta=labels):
        detail = getattr(pair, "nonfinite", None) or ""
        rows.append(Row(ref_label or reference, pair.target, "pass" if pair.passed else "FAIL", detail,
                        len(labels), pair.max_abs, pair.max_rel_to_scale, tol, pair.per_iteration))
    return rows


def default_tolerance(precision: str) -> tuple[float, float]:
    from targets.compare import TOLERANCES

    return TOLERANCES.get(precision, TOLERANCES["fp32"])


@dataclass
class CheckReport:
    rows: list[Row]
    torch_rows: list[Row]
    tolerance: tuple[float, float] | None

    @property
    def failed(self) -> bool:
        return any(r.status in ("FAIL", "error") for r in self.rows)

    @property
    def unavailable(self) -> bool:
        return any(r.status == "unavailable" for r in self.rows)

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.failed else (EXIT_UNAVAILABLE if self.unavailable else 0)


def check_targets(info, *, targets: Sequence[str], model=None, model_label: str = "model", golden=None,
                  tolerance: tuple[float, float] | None = None, seed: int = 0, t_indices: Sequence[int] | None = None,
                  fp16_build: bool = False, progress=None) -> CheckReport:
    """``fxpass check``: the runtimes against the eager model (``model``) and/or a golden set.

    ``golden`` is a :class:`fxpass.golden.GoldenSet`; ``t_indices`` default to five spread over
    the schedule.
    """
    runners, unavailable = build_runners(targets, info.path, fp16=fp16_build)
    rows: list[Row] = []
    torch_rows: list[Row] = []
    if "torch" in targets:
        n = len(info.timesteps)
        items = (list(t_indices) if t_indices is not None else spread(n)) if info.mode == "table" else None
        feeds = seeded_feeds(input_specs(info), seed=seed, timesteps=info.timesteps,
                             model_timesteps=info.model_timesteps, t_indices=items, count=3,
                             num_classes=num_classes_of(model))
        if progress:
            progress(f"running {len(feeds.feeds)} seeded inputs on {REFERENCE_NAME}"
                     + "".join(f", {r.name}" for r in runners) + " …")
        reference = reference_runner(model, mode=info.mode, model_timesteps=info.model_timesteps,
                                     image_size=info.inputs["x"][1][-1], specs=input_specs(info))
        results, errors = run_each([reference, *runners], feeds.feeds)
        if REFERENCE_NAME in errors:
            raise FxpassError(f"{model_label}: the PyTorch reference failed on {info.path.name}'s inputs "
                              f"({errors[REFERENCE_NAME]})")
        tol = tolerance or default_tolerance(info.precision)
        torch_rows = compare_rows(results, REFERENCE_NAME, tol, feeds.labels,
                                  tolerances=runner_tolerances(runners, tolerance, tol))
        rows += torch_rows
        rows += [Row(REFERENCE_NAME, name, "error", why) for name, why in errors.items()]
    if golden is not None:
        from .golden import golden_labels

        labels = golden_labels(golden, info)
        if not runners and not unavailable:
            raise FxpassError("--golden: compares ONNX Runtime or TensorRT with the golden outputs; "
                              "add ort or trt to --targets")
        combined = type(golden.outputs)()
        combined["golden"] = golden.outputs[0][1]
        results, errors = run_each(runners, golden.feeds)
        for name, iterations in results.items():
            combined[name] = iterations
        tol = tolerance or golden.tolerance(info.precision)
        rows += compare_rows(combined, "golden", tol, labels, tolerances=runner_tolerances(runners, tolerance, tol))
        rows += [Row("golden", name, "error", why) for name, why in errors.items()]
    for name, reason in unavailable.items():
        rows.append(Row("—", name, "unavailable", reason))
    return CheckReport(rows, torch_rows, tolerance)
