"""How each row of the precision section is built: a :class:`Variant` (a ``step(x, t_index)`` and how it
was made) from a :class:`Subject` (a model, its fxpass fp32 ONNX, config and schedule).

A row that this machine cannot build (OpenVINO or nncf not installed, a CPU without bf16, fxpass's
int8 API missing) raises :class:`Unavailable`; :func:`build_all` records it as ``{"unavailable": why}``
and any other failure as ``{"error": ...}``.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .harness import ort_session, short_error
from .precision_baselines import NNCF_HINT, baseline_feeds, nncf_quantize, ort_quantize_static


class Unavailable(Exception):
    """This row cannot be built on this machine (the message says why); not a failure."""


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


def _onnx_file(subject: Subject, name: str, proto) -> Path:
    import onnx

    path = subject.workdir / f"{subject.name}-{name}.onnx"
    if not path.exists():
        onnx.save(proto, str(path))
    return path


# ---- runtimes: a step function per runtime ---------------------------------------------------------
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


# ---- int8: fxpass's own, and the baselines ----------------------------------------------------------
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

        options = Int8Options(calibration_data=subject.calibration_data, seed=subject.seed, threads=subject.threads,
                              self_calibration=subject.calibration_data is None)
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


def _subject_feeds(subject: Subject) -> list[dict]:
    return baseline_feeds(subject.image_size, len(subject.model_timesteps), seed=subject.seed)


def _ort_default_int8(subject: Subject) -> tuple[Path, dict[str, Any]]:
    """The naive ONNX Runtime baseline on the subject's fp32 ONNX: (QDQ file, build info)."""
    out = subject.workdir / f"{subject.name}-int8-ort-default.onnx"
    return out, ort_quantize_static(_onnx_file(subject, "fp32", subject.proto), out, _subject_feeds(subject))


def _nncf_variant(subject: Subject) -> Variant:
    if importlib.util.find_spec("nncf") is None:
        raise Unavailable(f"nncf is not installed ({NNCF_HINT})")
    quantized, build = nncf_quantize(_onnx_file(subject, "fp32", subject.proto), _subject_feeds(subject))
    compiled, info = _openvino_compile(quantized, "f32", subject.threads)
    return Variant(_openvino_step(compiled), {**build, **info})


# ---- a row, and every row ---------------------------------------------------------------------------
def _torch_compile_variant(subject: Subject) -> Variant:
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


def _openvino_variant(key: str, subject: Subject, log: Callable[[str], None]) -> Variant:
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


def build_variant(key: str, subject: Subject, log: Callable[[str], None] = print) -> Variant:
    """Build row ``key`` from ``subject``; :class:`Unavailable` where this machine cannot."""
    if key == "eager":
        return Variant(_torch_step(subject.model, subject.model_timesteps), {}, batched=True)
    if key == "torch_compile":
        return _torch_compile_variant(subject)
    if key == "ort_fp32":
        return Variant(_ort_step(ort_session(subject.proto, subject.threads)), {})
    if key == "ort_int8":
        path, build = _fxpass_int8(subject, log)
        return Variant(_ort_step(ort_session(path, subject.threads)), build)
    if key == "ort_int8_default":
        path, build = _ort_default_int8(subject)
        return Variant(_ort_step(ort_session(path, subject.threads)), build)
    if key in ("openvino_fp32", "openvino_bf16", "openvino_int8", "nncf_int8"):
        return _openvino_variant(key, subject, log)
    raise ValueError(f"unknown precision row {key!r}")


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
