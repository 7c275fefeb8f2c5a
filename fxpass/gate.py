"""The lowering gate: the lowered model against the eager float32 model on seeded inputs, through Polygraphy.

``fxpass lower``'s gate (:func:`check_against_eager`, :func:`check_step_against_numpy`) compares ONNX
Runtime (or OpenVINO at bf16) with :func:`reference_runner`, the eager model as a Polygraphy runner,
on feeds from :func:`fxpass.inputs.seeded_feeds`; :func:`default_tolerance` is the tolerance of a
precision.  All comparisons go through Polygraphy (``targets.compare``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .inputs import (DYNAMIC_BATCHES, Feeds, InputSpec, gate_t_indices, input_specs, mixed_batches, num_classes_of,
                     seeded_feeds)

REFERENCE_NAME = "torch-fp32"


def reference_runner(model, *, mode: str, model_timesteps: Sequence, image_size: int | None = None,
                     specs: Sequence[InputSpec] = (), name: str = REFERENCE_NAME):
    """The eager float32 model as a Polygraphy runner, ``t_index`` mapped to the model's timesteps;
    inputs of ``specs`` other than x and t_index are passed to the model by name."""
    from targets.torch_ref import TorchReferenceRunner

    extra = [(s.name, s.dtype, s.shape) for s in specs if s.name not in ("x", "t_index")]
    if mode == "plain":  # a network with no timestep
        runner = TorchReferenceRunner(model, plain=True, image_size=image_size, name=name, extra_inputs=extra)
    elif mode == "fixed":
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
        "max_rel_l2": pair.max_rel_l2,
        "tolerance": {"atol_scale": tolerance[0], "rtol": tolerance[1]},
        "per_input": pair.per_iteration,
        "ort_latency_s": float(np.median(runtimes[1:] if len(runtimes) > 1 else runtimes)),
    }
    nonfinite = getattr(pair, "nonfinite", None)
    if nonfinite:
        out["nonfinite"] = nonfinite
    if getattr(pair, "degenerate", None):
        out["degenerate"] = pair.degenerate
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
                             tolerance: tuple[float, float] = (1e-4, 0.0), runner=None) -> dict[str, Any]:
    """A step graph on ONNX Runtime (or ``runner``, with ``proto`` the file's :class:`~fxpass.metadata.OnnxInfo`:
    a step-graph ``.tflite`` in LiteRT) against the eager model + the NumPy sampler's posterior (Polygraphy)."""
    from targets.compare import compare, run_runners
    from targets.ort import ort_runner
    from targets.step_ref import NumpyStepRunner

    from . import metadata
    from .diffusion import Diffusion

    if runner is None:
        meta = metadata.parse(metadata.read_props(proto), "lowered model", require=("step",))
        runner = ort_runner(proto, cuda=False, name="onnxrt-cpu")
    else:
        meta = proto.meta
    specs = input_specs(proto)
    items = _gate_items(meta, seed, t_indices, specs[0].shape[0] < 0)
    feeds = seeded_feeds(specs, seed=seed, timesteps=meta.timesteps, model_timesteps=meta.model_timesteps,
                         t_indices=items, num_classes=num_classes_of(model))
    diffusion = Diffusion.from_config(config.to_dict())
    import torch

    torch.nn.Module.train(model, False)  # never a method's return value the model may override
    reference = NumpyStepRunner(model, diffusion, meta.model_timesteps)
    results = run_runners([reference, runner], feeds.feeds)

    def conditioning(iteration: int, output: str) -> float:
        # pred_xstart = sqrt(1/abar) x - sqrt(1/abar - 1) eps multiplies the U-Net's float32 error
        if output != "pred_xstart":
            return 1.0
        rows = np.asarray(feeds.feeds[iteration]["t_index"]).ravel()
        return float(max(diffusion.sqrt_recipm1_alphas_cumprod[int(i)] for i in rows))

    pair = compare(results, reference="numpy-step", atol_scale=tolerance[0], rtol=tolerance[1], meta=feeds.labels,
                   conditioning=conditioning)[0]
    return {**_summary(pair, results[runner.name], tolerance), "reference": "eager model + NumPy posterior",
            "runtime": runner.name}


def default_tolerance(precision: str) -> tuple[float, float]:
    from targets.compare import TOLERANCES

    return TOLERANCES.get(precision, TOLERANCES["fp32"])
