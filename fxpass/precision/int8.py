"""``--precision int8``: static W8A8 in ONNX's QDQ form, made by ONNX Runtime's quantization tooling.

What fxpass adds to ``onnxruntime.quantization.quantize_static`` (which does the quantizing):

* calibration over the whole schedule (:mod:`fxpass.precision.calibration`), computed once and cached
  (ORT's ``calibration_cache_path``), so that every variant the plan search tries reuses the ranges;
* the precision plan (:mod:`fxpass.precision.plan`): the layers kept in float are the fewest found
  whose int8 rest keeps the eps-MSE ratio to float32 within ``error_budget`` at every evaluated step;
* a gate: the written model's ratio is measured on an evaluation set kept apart from calibration,
  and a model over budget is refused (a reused plan included).

Choices measured on the trained digits reference (see docs/precision.md): per-channel int8 weights, uint8
activations (ORT 1.32 rejects the int8-activation model: its Softmax output gets a uint8 zero point),
MinMax ranges, Conv and MatMul quantized.  The fully quantized model's eps-MSE was 6.8x float32's at
t_index 0 and 1.06-1.18x elsewhere; the input convolution alone accounts for most of it: at small t
the noise the model must find is far below one int8 step of an input range calibrated over all t.
"""

from __future__ import annotations

import logging
import platform
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .. import metadata
from ..errors import FxpassError
from ..inputs import spread
from . import calibration
from .cost import layer_costs
from .layers import QUANTIZED_OPS, fingerprint, layers_of
from .plan import Measured, PrecisionPlan, search

REDUCE_RANGE = ("auto", "on", "off")
#: CPU flags of the x86 integer dot-product instructions ONNX Runtime's u8s8 kernels use without saturating
_VNNI = re.compile(r"\b(avx512_vnni|avx_vnni|amx_int8)\b")
EVAL_STEPS = 5  # evaluation positions spread over the schedule (first and last included)
PROBE_STEPS = 3  # positions a sensitivity probe is scored at


@dataclass
class Int8Options:
    """``calibration_data``: a directory of images; ``self_calibration``: calibrate on the model's own
    trajectories instead (one of the two is required: nothing is judged on data nobody chose);
    ``calibration_steps`` schedule positions x ``calibration_samples`` images or trajectories;
    ``eval_samples`` images (or trajectories' results) the plan is judged on, apart from calibration;
    ``error_budget``: the eps-MSE ratio to float32 may reach 1 + budget at any evaluated step;
    ``plan``: a precision plan file (or a report holding one) to reuse instead of searching;
    ``reduce_range``: "on" quantizes weights to 7 bits (ORT's ``reduce_range``), "off" to 8, "auto"
    (default) to 7 where this CPU needs it (:func:`weights_saturate_here`)."""

    calibration_data: str | Path | None = None
    calibration_steps: int = 8
    calibration_samples: int = 4
    eval_samples: int = 4
    error_budget: float = 0.05
    plan: str | Path | None = None
    seed: int = 0
    threads: int | None = None
    reduce_range: str = "auto"
    self_calibration: bool = False

    def check_data_source(self) -> None:
        """One of --calibration-data and --calibrate-on-samples, never neither (nor both)."""
        if self.calibration_data is None and not self.self_calibration:
            raise FxpassError("--precision int8 needs images to calibrate on and to judge its plan by: "
                              "--calibration-data DIR (images like the model's inputs), or --calibrate-on-samples "
                              "for the model's own samples (smoother than real images: they hide low-noise error)")
        if self.calibration_data is not None and self.self_calibration:
            raise FxpassError("--calibration-data and --calibrate-on-samples: give one of them")

    def check(self) -> None:
        for name in ("calibration_steps", "calibration_samples", "eval_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000:
                raise FxpassError(f"--{name.replace('_', '-')} {value!r}: expected a whole number from 1 to 10000")
        if self.reduce_range not in REDUCE_RANGE:
            raise FxpassError(f"--reduce-range {self.reduce_range!r}: expected {', '.join(REDUCE_RANGE)}")
        if not (isinstance(self.error_budget, (int, float)) and 0 < self.error_budget < 100):
            raise FxpassError(f"--error-budget {self.error_budget!r}: expected a number above 0 (0.05 is 5%)")


def weights_saturate_here(cpuinfo: str | None = None) -> bool:
    """True on an x86 CPU without VNNI (or whose features cannot be read): there ONNX Runtime's u8s8
    kernels (AVX2 ``vpmaddubsw``) add pairs of uint8 x int8 products into int16 and saturate, and
    8-bit weights give wrong results.  ORT's remedy is 7-bit weights (``reduce_range``).  Measured on
    the tiny test config (AVX2 EPYC): 0.29·max|ref| from float32 with 8-bit weights, 0.09 with 7-bit,
    where ORT's unfused QDQ reference gives 0.10 and 0.08.  ``cpuinfo``: /proc/cpuinfo's text (tests)."""
    if cpuinfo is None:
        if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
            return False  # ARM's dot-product kernels do not saturate
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            return True  # an x86 CPU whose features are unknown: assume the saturating kernels
    return _VNNI.search(cpuinfo) is None


def resolve_reduce_range(choice: str) -> bool:
    """``Int8Options.reduce_range`` as ORT's flag."""
    return weights_saturate_here() if choice == "auto" else choice == "on"


class _Sessions:
    """ONNX Runtime CPU sessions over model files, one output (the first) per feed."""

    def __init__(self, threads: int | None):
        import onnxruntime as ort

        self.options = ort.SessionOptions()
        self.options.log_severity_level = 3
        if threads:
            self.options.intra_op_num_threads = threads
            self.options.inter_op_num_threads = 1

    def runner(self, path: Path) -> Callable[[dict], np.ndarray]:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), sess_options=self.options, providers=["CPUExecutionProvider"])
        first = session.get_outputs()[0].name
        return lambda feed: session.run([first], feed)[0]


class _Reader:
    """Calibration feeds as ORT's ``CalibrationDataReader``."""

    def __init__(self, feeds: Sequence[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


@contextmanager
def _quiet():
    """ORT's quantizer logs advice on the root logger for every call."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class _Quantizer:
    """``quantize_static`` over one float32 file with ranges calibrated once (ORT's calibration cache)."""

    def __init__(self, fp32: Path, workdir: Path, reduce_range: bool = False):
        self.fp32, self.workdir, self.reduce_range = fp32, workdir, reduce_range
        self.cache = workdir / "calibration.json"
        self.count = 0

    def quantize(self, *, include: Sequence[str] | None = None, exclude: Sequence[str] = (),
                 feeds: Sequence[dict] | None = None) -> Path:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(_Reader, CalibrationDataReader):
            pass

        self.count += 1
        out = self.workdir / f"int8-{self.count}.onnx"
        with _quiet():
            quantize_static(str(self.fp32), str(out), Reader(feeds) if feeds is not None else None,
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
                            nodes_to_quantize=list(include) if include is not None else None,
                            nodes_to_exclude=list(exclude), calibration_cache_path=str(self.cache),
                            reduce_range=self.reduce_range)
        return out


class _Scorer:
    """eps-MSE ratio to float32 per t_index of a variant, on a fixed sample set.

    A step's damage is its ratio of mean eps-MSEs minus 1, plus the standard error of the per-sample
    ratios there: a plan judged on a few images must hold on others (on the digits reference, 4
    evaluation images put the fully planned model at 1.0495 at t_index 0 where 64 others gave 1.059)."""

    def __init__(self, samples: list[calibration.Sample], reference: Callable[[dict], np.ndarray], channels: int):
        self.samples, self.channels = samples, channels
        self.reference = self._mse(reference)

    def _mse(self, run) -> list[float]:
        out = []
        for s in self.samples:
            pred = np.asarray(run(s.feed), dtype=np.float64)[:, :self.channels]
            out.append(float(np.mean((pred - s.eps) ** 2)))
        return out

    def measure(self, run) -> Measured:
        mse = self._mse(run)
        rows = []
        for t in sorted({s.t_index for s in self.samples}):
            at = [k for k, s in enumerate(self.samples) if s.t_index == t]
            ref, got = np.array([self.reference[k] for k in at]), np.array([mse[k] for k in at])
            ratio = float(got.mean() / ref.mean()) if ref.mean() > 0 else float("inf")
            each = got / np.where(ref > 0, ref, np.inf)
            sem = float(each.std(ddof=1) / np.sqrt(len(at))) if len(at) > 1 else 0.0
            rows.append({"t_index": t, "ratio": ratio, "sem": sem})
        damages = [r["ratio"] - 1.0 + r["sem"] if np.isfinite(r["ratio"]) else float("inf") for r in rows]
        worst = int(np.argmax(damages))
        return Measured(damages[worst], rows[worst]["t_index"], rows)


def _sets(proto, diffusion, options: Int8Options, run_fp32, num_classes: int):
    """(calibration feeds, evaluation samples, description) over the schedule."""
    from ..inputs import input_specs

    specs = {s.name: s for s in input_specs(proto)}
    if set(specs) < {"x", "t_index"}:
        raise FxpassError("--precision int8 needs a table-mode model (inputs x and t_index)")
    x_shape = (1, *(1 if d < 0 else d for d in specs["x"].shape[1:]))  # batch 1 feeds
    n = diffusion.num_steps
    steps = spread(n, options.calibration_steps)  # the whole schedule, both ends included
    eval_steps = spread(n, EVAL_STEPS)
    k, e = options.calibration_samples, options.eval_samples
    extras = calibration.extra_inputs(list(specs.values()), k + e, options.seed, num_classes)
    if options.calibration_data is not None:
        from ..images import image_files, load_image_dir

        if x_shape[1] != 3:
            raise FxpassError(f"--calibration-data {options.calibration_data}: images are RGB but the model's "
                              f"x has {x_shape[1]} channels; calibrate on the model's own trajectories instead "
                              "(omit --calibration-data)")
        found = len(image_files(options.calibration_data))
        if found < k + e:
            raise FxpassError(f"{options.calibration_data}: {found} images; int8 needs {k + e} ({k} to calibrate, "
                              f"{e} to evaluate: --calibration-samples, --eval-samples)")
        images = load_image_dir(options.calibration_data, x_shape[-1], k + e)
        feeds = [s.feed for s in calibration.noised(images[:k], diffusion, steps, extras[:k], options.seed)]
        x0_eval = images[k:k + e]
        source = {"data": str(options.calibration_data)}
    else:
        feeds, _ = calibration.trajectories(run_fp32, diffusion, steps, x_shape, extras[:k], options.seed)
        _, x0_eval = calibration.trajectories(run_fp32, diffusion, steps, x_shape, extras[k:], options.seed + 1)
        source = {"data": None, "trajectories": "DDIM (eta 0) from seeded noise"}
    samples = calibration.noised(x0_eval, diffusion, eval_steps, extras[k:], options.seed + 2)
    about = {**source, "steps": steps, "samples": k, "feeds": len(feeds), "eval_steps": eval_steps,
             "eval_samples": e}
    return feeds, samples, about


def quantize_int8(proto: onnx.ModelProto, config=None, options: Int8Options | None = None, *,
                  progress: Callable[[str], None] | None = None,
                  num_classes: int = 1000) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The int8 QDQ model of a table-mode float32 ``proto`` and what was measured (``info["plan"]``).

    ``config`` defaults to the one in the model's metadata (the schedule comes from it)."""
    from surgery.modelio import save_model

    from ..diffusion import Diffusion

    options = options or Int8Options()
    options.check()
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    props = metadata.read_props(proto)
    meta = metadata.parse(props, "int8 input", require=("table",))
    if meta.precision != "fp32":  # int8 of an int8 (or float16) graph would quantize the quantized
        raise FxpassError(f"--precision int8: the model is {meta.precision} already; int8 starts from float32")
    options.check_data_source()
    cfg = meta.config if config is None else (config.to_dict() if hasattr(config, "to_dict") else config)
    if cfg is None:
        raise FxpassError("--precision int8 needs the model's config (its noise schedule)")
    diffusion = Diffusion.from_config(cfg)
    layers = layers_of(proto)
    if not layers:
        raise FxpassError("--precision int8: the model has no Conv or MatMul layers to quantize")
    plan_in = PrecisionPlan.load(options.plan) if options.plan is not None else None
    graph_print = fingerprint(layers)
    if plan_in is not None:
        plan_in.check_applies(layers, graph_print, str(options.plan))
    sessions = _Sessions(options.threads)
    with tempfile.TemporaryDirectory(prefix="fxpass-int8-") as tmp:
        workdir = Path(tmp)
        fp32 = workdir / "fp32.onnx"
        save_model(proto, fp32)
        run_fp32 = sessions.runner(fp32)
        say("calibration sets")
        feeds, samples, about = _sets(proto, diffusion, options, run_fp32, num_classes)
        reduce_range = resolve_reduce_range(options.reduce_range)
        quantizer = _Quantizer(fp32, workdir, reduce_range)
        say(f"calibrating on {len(feeds)} inputs")
        quantizer.quantize(feeds=feeds)  # the ranges, cached for every variant below
        scorer = _Scorer(samples, run_fp32, int(samples[0].eps.shape[1]))  # eps has x's channels
        probe_steps = set(spread(diffusion.num_steps, PROBE_STEPS))
        prober = _Scorer([s for s in samples[:len(about["eval_steps"])] if s.t_index in probe_steps],
                         run_fp32, scorer.channels)

        def evaluate(float_layers: list[str]) -> Measured:
            return scorer.measure(sessions.runner(quantizer.quantize(exclude=float_layers)))

        def probe(names: list[str]) -> float:
            return prober.measure(sessions.runner(quantizer.quantize(include=names))).damage

        say("measuring each layer's cost")
        costs = layer_costs(fp32, feeds[:4], [layer.name for layer in layers], threads=options.threads or 1)
        if plan_in is not None:
            float_layers, records = list(plan_in.float_layers), list(plan_in.sensitivity)
            measured = evaluate(float_layers)
        else:
            float_layers, records, measured = search(layers, probe, evaluate, options.error_budget, progress=say,
                                                     cost=costs)
        if not measured.damage <= options.error_budget:
            raise FxpassError(f"{options.plan}: int8 with this precision plan has eps-MSE "
                              f"{1 + measured.damage:.4g}x float32's at t_index {measured.t_index} (budget "
                              f"{1 + options.error_budget:g}x); make a new plan or raise --error-budget",
                              exit_code=1)
        final = quantizer.quantize(exclude=float_layers)
        quantized = onnx.load(str(final))
    metadata.write_props(quantized, {**props, metadata.PRECISION: "int8"})
    plan = PrecisionPlan(float_layers, float(options.error_budget), graph_print, len(layers),
                         {"damage": measured.damage, "t_index": measured.t_index, "ratios": measured.ratios,
                          "float_cost_share": _cost_share(costs, float_layers)}, records, about)
    info = {"plan": plan.to_dict(), "plan_lines": _plan_lines(plan, layers, options, reduce_range),
            "reused_plan": plan_in is not None, "weight_bits": 7 if reduce_range else 8,
            "reduce_range": options.reduce_range, "variants_tried": quantizer.count,
            "layer_costs": {"float32_s_per_call": sum(costs.values()), "how": "ONNX Runtime profiler, graph "
                            "optimizations off, per node, mean of 3 calls (relative costs for the plan, not the "
                            "optimized latency)"},
            "seconds": time.perf_counter() - started}
    return quantized, info


def _cost_share(costs: dict[str, float], float_layers: Sequence[str]) -> float | None:
    total = sum(costs.values())
    return sum(costs.get(n, 0.0) for n in float_layers) / total if total > 0 else None


def _plan_lines(plan: PrecisionPlan, layers, options: Int8Options, reduce_range: bool) -> list[str]:
    lines = plan.describe(layers)
    lines.insert(1, "weights 7-bit (reduce_range: x86 without VNNI saturates 8-bit weights in ONNX Runtime)"
                 if reduce_range else "weights 8-bit: on an x86 CPU without VNNI ONNX Runtime saturates them; "
                 "--reduce-range on for such targets")
    if options.calibration_data is None:
        lines.insert(1, f"calibrated on {options.calibration_steps} x {options.calibration_samples} and judged on "
                        f"{options.eval_samples} of the model's own samples (--calibrate-on-samples), not on "
                        "images: the eps-MSE ratio below is measured on those samples")
    return lines

