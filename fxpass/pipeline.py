"""The lowering pipeline: capture → fx passes → export → surgery (→ fp16), and its check against PyTorch."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch

from .config import ModelConfig
from .errors import FxpassError
from .export import DEFAULT_OPSET, check_opset, export, get_metadata
from .schedule import model_timesteps, respaced


@dataclass
class Lowered:
    """The lowered model and what the pipeline measured on the way."""

    model: onnx.ModelProto
    mode: str  # "table" or "fixed"
    timesteps: list  # schedule (original timesteps) in table mode, [T] in fixed mode
    model_timesteps: list  # what the U-Net sees (rescaled when rescale_timesteps)
    stages: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def schedule_for(config: ModelConfig, timesteps: str | int | Sequence[int] | None = "respaced") -> tuple[str, list, list]:
    """(mode, original timesteps, model timesteps) for a ``--timesteps`` value."""
    if timesteps is None or timesteps == "respaced":
        kept = respaced(config.diffusion_steps, config.timestep_respacing)
        return "table", kept, model_timesteps(config.diffusion_steps, kept, config.rescale_timesteps)
    if isinstance(timesteps, str):
        try:
            timesteps = int(timesteps)
        except ValueError:
            raise FxpassError(f"--timesteps {timesteps}: expected 'respaced' or an integer timestep") from None
    if isinstance(timesteps, int):
        if not 0 <= timesteps < config.diffusion_steps:
            raise FxpassError(f"--timesteps {timesteps}: must be in 0..{config.diffusion_steps - 1}")
        return "fixed", [timesteps], model_timesteps(config.diffusion_steps, [timesteps], config.rescale_timesteps)
    kept = [int(t) for t in timesteps]
    return "table", kept, model_timesteps(config.diffusion_steps, kept, config.rescale_timesteps)


def example_inputs_for(config: ModelConfig, first_timestep, seed: int = 0, batch: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = {"x": torch.randn(batch, 3, config.image_size, config.image_size, generator=gen)}
    dtype = torch.float32 if isinstance(first_timestep, float) and not float(first_timestep).is_integer() else torch.int64
    inputs["timesteps"] = torch.full((batch,), first_timestep, dtype=dtype)
    if config.class_cond:
        inputs["y"] = torch.zeros(batch, dtype=torch.int64)
    return inputs


@contextmanager
def _stage(stages: dict, name: str, progress: Callable[[str, str], None] | None):
    if progress:
        progress(name, "start")
    start = time.perf_counter()
    yield
    stages[name] = time.perf_counter() - start
    if progress:
        progress(name, f"{stages[name]:.1f} s")


def lower_with_report(
    model: torch.nn.Module,
    example_inputs: dict[str, torch.Tensor] | Sequence[torch.Tensor] | None = None,
    *,
    config: ModelConfig | None = None,
    timesteps: str | int | Sequence[int] | None = "respaced",
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    simplifier: str | None = "onnxslim",
    progress: Callable[[str, str], None] | None = None,
    step_graph: bool = False,
    group_norm: str = "auto",
) -> Lowered:
    """Lower ``model`` and keep the stage times, node counts and pass counts."""
    from . import __version__
    from .capture import capture
    from .passes import rewrite

    check_opset(opset)
    if precision not in ("fp32", "fp16"):
        raise FxpassError(f"--precision {precision}: expected fp32 or fp16")
    if group_norm not in ("auto", "keep"):
        raise FxpassError(f"--group-norm {group_norm}: expected auto or keep")
    if config is None:
        if isinstance(timesteps, (str, type(None))):
            raise FxpassError("lower: without a config, give timesteps as an int or a sequence")
        mode = "fixed" if isinstance(timesteps, int) else "table"
        kept = [timesteps] if mode == "fixed" else list(timesteps)
        seen = list(kept)
    else:
        mode, kept, seen = schedule_for(config, timesteps)
    if step_graph and (config is None or mode != "table"):
        raise FxpassError("--step-graph needs a config and the respaced schedule (table mode)")
    if example_inputs is None:
        if config is None:
            raise FxpassError("lower: give example_inputs or a config")
        example_inputs = example_inputs_for(config, seen[-1])

    stages: dict[str, float] = {}
    report: dict[str, Any] = {"fxpass_version": __version__, "opset": opset, "precision": precision, "mode": mode}
    model = model.eval()
    with _stage(stages, "capture", progress):
        gm = capture(model, example_inputs)
    report["fx_nodes_captured"] = len(gm.graph.nodes)
    with _stage(stages, "passes", progress):
        gm = rewrite(gm, timesteps=seen[0] if mode == "fixed" else seen)
    report["fx_nodes_rewritten"] = len(gm.graph.nodes)
    report["fx_rewrites"] = dict(gm.meta.get("fxpass_rewrites", {}))
    leftover = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._assert]
    if leftover:
        raise FxpassError(f"lower: asserts/guards left after the passes (data-dependent): {', '.join(leftover[:3])}")

    metadata: dict[str, Any] = {"fxpass.mode": mode, "fxpass.timesteps": kept}
    if mode == "table":
        metadata["fxpass.model_timesteps"] = seen
    if config is not None:
        metadata["fxpass.config"] = config.to_dict()
    with _stage(stages, "export", progress):
        if step_graph:
            from .step_graph import STEP_OUTPUTS, DenoisingStep

            inputs = dict(gm.meta["fxpass_example_inputs"])
            x = inputs["x"]
            step_inputs = {"x": x, "t_index": inputs["t_index"], "noise": torch.zeros_like(x)}
            if "y" in inputs:
                step_inputs["y"] = inputs["y"]
            metadata["fxpass.mode"] = "step"
            proto = export(DenoisingStep(gm, config).eval(), step_inputs, opset=opset, dynamic_batch=dynamic_batch,
                           metadata=metadata, output_names=STEP_OUTPUTS)
        else:
            proto = export(gm, opset=opset, dynamic_batch=dynamic_batch, metadata=metadata)
    report["onnx_nodes_exported"] = len(proto.graph.node)

    import surgery

    with _stage(stages, "surgery", progress):
        proto, surgery_report = surgery.simplify(proto, opset=opset, simplifier=simplifier, group_norm=group_norm)
    report["surgery"] = surgery_report
    report["onnx_nodes"] = len(proto.graph.node)
    if precision == "fp16":
        import onnx_graphsurgeon as gs

        from surgery.convert_precision import convert_precision

        from .export import set_metadata

        with _stage(stages, "fp16", progress):
            props = get_metadata(proto)
            graph, converted = convert_precision(gs.import_onnx(proto))
            proto = gs.export_onnx(graph)
            set_metadata(proto, {**props, "fxpass.precision": "fp16"})
        report["fp16_nodes"] = converted
        report["onnx_nodes"] = len(proto.graph.node)
    report["stages_s"] = stages
    return Lowered(proto, mode, kept, seen, stages, report)


def lower(
    model: torch.nn.Module,
    example_inputs: dict[str, torch.Tensor] | Sequence[torch.Tensor] | None = None,
    *,
    timesteps: str | int | Sequence[int] | None = "respaced",
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    config: ModelConfig | None = None,
    simplifier: str | None = "onnxslim",
    step_graph: bool = False,
    group_norm: str = "auto",
) -> onnx.ModelProto:
    """Lower a guided-diffusion / RePaint U-Net (ours or a user's class) to an ONNX ModelProto.

    ``timesteps``: ``"respaced"`` (the config's schedule, needs ``config``), a sequence of timesteps
    (table mode: inputs ``x``, ``t_index``) or an int (fixed mode: input ``x``).  ``example_inputs``
    default to a seeded ``x`` of the config's size and the last schedule entry.  ``step_graph``
    exports one whole denoising step instead (inputs ``x``, ``t_index``, ``noise``; outputs ``x_prev``,
    ``pred_xstart``; see :mod:`fxpass.step_graph`).  ``group_norm="keep"`` keeps every GroupNorm as
    one ``GroupNormalization`` node; the default "auto" expands the large ones into a
    ``LayerNormalization`` form that ONNX Runtime's CPU provider runs about twice as fast.
    """
    return lower_with_report(
        model, example_inputs, config=config, timesteps=timesteps, precision=precision, opset=opset,
        dynamic_batch=dynamic_batch, simplifier=simplifier, step_graph=step_graph, group_norm=group_norm,
    ).model


def check_against_eager(
    proto: onnx.ModelProto,
    model: torch.nn.Module,
    *,
    config: ModelConfig,
    t_indices: Sequence[int] | None = None,
    seed: int = 1234,
    tolerance: tuple[float, float] = (1e-4, 0.0),
) -> dict[str, Any]:
    """ONNX Runtime (CPU) against the eager float32 model on seeded inputs, through Polygraphy.

    Table mode: one input per t_index (default: first, middle, last of the schedule); fixed mode:
    two seeded inputs.  Returns worst errors, per-t_index errors, ORT latency and pass/fail.
    """
    from targets.compare import compare, run_runners
    from targets.ort import ort_runner
    from targets.torch_ref import TorchReferenceRunner

    meta = get_metadata(proto)
    mode = meta.get("fxpass.mode", "table")
    if mode == "step":
        return check_step_against_numpy(proto, model, config=config, t_indices=t_indices, seed=seed,
                                        tolerance=tolerance)

    kept = json.loads(meta["fxpass.timesteps"])
    seen = json.loads(meta.get("fxpass.model_timesteps", json.dumps(kept)))
    rng = np.random.default_rng(seed)
    feeds, labels = [], []
    input_names = {i.name for i in proto.graph.input}
    if mode == "table":
        if t_indices is None:
            t_indices = sorted({0, len(kept) // 2, len(kept) - 1})
        for i in t_indices:
            feeds.append(_seeded_feed(rng, config.image_size, input_names, t_index=i))
            labels.append({"t_index": int(i), "timestep": kept[i]})
        reference = TorchReferenceRunner(model, timesteps=seen, image_size=config.image_size, name="torch-fp32")
    else:
        for _ in range(2):
            feeds.append(_seeded_feed(rng, config.image_size, input_names))
            labels.append({"timestep": kept[0]})
        reference = TorchReferenceRunner(model, fixed_timestep=seen[0], image_size=config.image_size,
                                         name="torch-fp32")
    runner = ort_runner(proto, cuda=False, name="onnxrt-cpu")
    results = run_runners([reference, runner], feeds)
    pair = compare(results, reference="torch-fp32", atol_scale=tolerance[0], rtol=tolerance[1], meta=labels)[0]
    return _check_summary(pair, results["onnxrt-cpu"], tolerance)


def check_step_against_numpy(
    proto: onnx.ModelProto,
    model: torch.nn.Module,
    *,
    config: ModelConfig,
    t_indices: Sequence[int] | None = None,
    seed: int = 1234,
    tolerance: tuple[float, float] = (1e-4, 0.0),
) -> dict[str, Any]:
    """A step graph on ONNX Runtime against the eager model + the NumPy sampler's posterior (Polygraphy)."""
    from targets.compare import compare, run_runners
    from targets.ort import ort_runner
    from targets.step_ref import NumpyStepRunner

    from .sampler import Diffusion

    mode, kept, seen = schedule_for(config, "respaced")
    if t_indices is None:
        t_indices = sorted({0, len(kept) // 2, len(kept) - 1})
    rng = np.random.default_rng(seed)
    feeds, labels = [], []
    input_names = {i.name for i in proto.graph.input}
    for i in t_indices:
        feeds.append(_seeded_feed(rng, config.image_size, input_names, t_index=i, noise=True))
        labels.append({"t_index": int(i), "timestep": kept[i]})
    diffusion = Diffusion.from_config(config.to_dict())
    reference = NumpyStepRunner(model.eval(), diffusion, seen)
    runner = ort_runner(proto, cuda=False, name="onnxrt-cpu")
    results = run_runners([reference, runner], feeds)

    def conditioning(iteration: int, output: str) -> float:
        # pred_xstart = sqrt(1/abar) x - sqrt(1/abar - 1) eps multiplies the U-Net's float32 error
        return float(diffusion.sqrt_recipm1_alphas_cumprod[t_indices[iteration]]) if output == "pred_xstart" else 1.0

    pair = compare(results, reference="numpy-step", atol_scale=tolerance[0], rtol=tolerance[1], meta=labels,
                   conditioning=conditioning)[0]
    return {**_check_summary(pair, results["onnxrt-cpu"], tolerance), "reference": "eager model + NumPy posterior"}


def _seeded_feed(rng: np.random.Generator, size: int, input_names: set[str], *, t_index: int | None = None,
                 noise: bool = False) -> dict[str, np.ndarray]:
    """One batch-1 check input drawn from ``rng`` in a fixed order: x, then noise, then y (if an input)."""
    shape = (1, 3, size, size)
    feed = {"x": rng.standard_normal(shape, dtype=np.float32)}
    if t_index is not None:
        feed["t_index"] = np.array([t_index], dtype=np.int64)
    if noise:
        feed["noise"] = rng.standard_normal(shape, dtype=np.float32)
    if "y" in input_names:
        feed["y"] = np.array([int(rng.integers(0, 1000))], dtype=np.int64)
    return feed


def _check_summary(pair, ort_runs, tolerance: tuple[float, float]) -> dict[str, Any]:
    """The numbers a check reports: worst errors, per-input errors, ORT latency (median after the first run)."""
    runtimes = [r.runtime for r in ort_runs]
    return {
        "passed": pair.passed,
        "max_abs": pair.max_abs,
        "max_rel_to_scale": pair.max_rel_to_scale,
        "tolerance": {"atol_scale": tolerance[0], "rtol": tolerance[1]},
        "per_input": pair.per_iteration,
        "ort_latency_s": float(np.median(runtimes[1:] if len(runtimes) > 1 else runtimes)),
    }
