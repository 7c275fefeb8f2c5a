"""``fxpass check``: the runtimes against the eager model and golden sets, through Polygraphy.

:func:`check_targets` runs ONNX Runtime, TensorRT and OpenVINO (:func:`build_runners`) on seeded
inputs (:func:`fxpass.inputs.seeded_feeds`) against the eager float32 model (:func:`fxpass.gate.reference_runner`)
and/or a golden set's outputs, each runner on its own (:func:`run_each`), and tabulates the
comparisons (``targets.compare``) as :class:`Row` s of a :class:`CheckReport`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FxpassError, ort_reason
from .gate import REFERENCE_NAME, default_tolerance, reference_runner
from .inputs import input_specs, num_classes_of, seeded_feeds, spread

TARGETS = ("torch", "ort", "trt", "openvino", "openvino-bf16", "litert")
EXIT_FAILED = 1
EXIT_UNAVAILABLE = 3


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
    #: worst ||target - reference|| / ||reference|| over the inputs (each input's is in per_iteration)
    max_rel_l2: float | None = None


def parse_targets(text: str | None) -> list[str]:
    items = [t.strip().lower() for t in (text or "").split(",") if t.strip()]
    if not items:
        raise FxpassError(f"--targets {text!r}: give one or more of {', '.join(TARGETS)}")
    aliases = {"onnxrt": "ort", "onnxruntime": "ort", "tensorrt": "trt", "pytorch": "torch", "ov": "openvino",
               "openvino-f32": "openvino", "openvino-fp32": "openvino", "ov-bf16": "openvino-bf16",
               "tflite": "litert"}
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
    if "litert" in targets:
        from targets.litert import RUNNER_NAME, litert_runner, litert_unavailable_reason

        reason = litert_unavailable_reason()
        if reason:
            unavailable[RUNNER_NAME] = reason
        else:
            runners.append(litert_runner(path))
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
            errors[runner.name] = ort_reason(exc)  # ONNX Runtime's text without its code and location prefixes
            continue
        for name, iterations in results.items():
            merged[name] = iterations
    return merged, errors


def runner_tolerances(runners, tolerance: tuple[float, float] | None,
                      default: tuple[float, float], precision: str = "fp32") -> dict[str, tuple[float, float]]:
    """The tolerance each runner's rows are checked at: ``tolerance`` (``--tolerance``) when given, else
    the looser of ``default`` and the runner's own ``tolerance`` (OpenVINO bf16's), else ``default``; a
    bf16 file's float32 runs (ONNX Runtime, OpenVINO f32) at fp32's bound (:func:`fxpass.expected.row_tolerance`)."""
    from .expected import row_tolerance

    out = {}
    for runner in runners:
        own = getattr(runner, "tolerance", None)
        base = default_tolerance("fp32") if row_tolerance(precision, runner.name) != precision else default
        out[runner.name] = tolerance or (tuple(max(a, b) for a, b in zip(base, own)) if own else base)
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
        detail = getattr(pair, "nonfinite", None) or getattr(pair, "degenerate", None) or ""
        rows.append(Row(ref_label or reference, pair.target, "pass" if pair.passed else "FAIL", detail,
                        len(labels), pair.max_abs, pair.max_rel_to_scale, tol, pair.per_iteration, pair.max_rel_l2))
    return rows


@dataclass
class CheckReport:
    rows: list[Row]
    torch_rows: list[Row]
    tolerance: tuple[float, float] | None
    #: what the output must say beside the rows (a golden manifest's tolerance overridden or trusted)
    notes: list[str] = field(default_factory=list)

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
                  fp16_build: bool = False, progress=None, precision: str = "fp32",
                  trust_golden_tolerance: bool = False) -> CheckReport:
    """``fxpass check``: the runtimes against the eager model (``model``) and/or a golden set, at the
    bound of ``precision`` (what the user asked for: never the file's own label).

    ``golden`` is a :class:`fxpass.golden.GoldenSet`; ``t_indices`` default to five spread over
    the schedule.
    """
    runners, unavailable = build_runners(targets, info.path, fp16=fp16_build)
    notes: list[str] = []
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
        tol = tolerance or default_tolerance(precision)
        torch_rows = compare_rows(results, REFERENCE_NAME, tol, feeds.labels,
                                  tolerances=runner_tolerances(runners, tolerance, tol, precision))
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
        tol, note = (tolerance, None) if tolerance else golden.tolerance(precision, trust=trust_golden_tolerance)
        notes += [note] if note else []
        rows += compare_rows(combined, "golden", tol, labels,
                             tolerances=runner_tolerances(runners, tolerance, tol, precision))
        rows += [Row("golden", name, "error", why) for name, why in errors.items()]
    for name, reason in unavailable.items():
        rows.append(Row("—", name, "unavailable", reason))
    return CheckReport(rows, torch_rows, tolerance, notes)
