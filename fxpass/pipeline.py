"""The lowering pipeline, one straight line; ``fxpass.lower()`` and ``fxpass lower`` both run it.

    request ─▶ load ─▶ capture ─▶ passes ─▶ export ─▶ surgery ─▶ precision ─▶ verify ─▶ cut ─▶ write

:func:`run` takes one :class:`~fxpass.request.LowerRequest` (the CLI builds it from its flags, the API
from its keywords) and hands it, with the run's state, to each stage of :data:`STAGES` in turn
(:mod:`fxpass.stages`); each is timed and reported, and a stage that does not apply to the request
(``load`` without a checkpoint, ``precision`` at fp32, ``verify`` when opted out, ``write`` without an
output, ``cut`` without ``--deep-cache``) is left out.  The whole request is recorded in the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import onnx
import torch

from . import metadata, stages
from .config import ModelConfig
from .errors import FxpassError
from .request import LowerRequest

Progress = Callable[[str, str], None]


class Stage(NamedTuple):
    name: str
    run: Callable[[stages.Lowering], None]
    #: whether the stage applies to this run (a stage that does not is left out of the report)
    applies: Callable[[stages.Lowering], bool] = lambda state: True


STAGES = (
    Stage("load", stages.load_stage, lambda s: s.request.source.checkpoint is not None and s.model is None),
    Stage("capture", stages.capture_stage),
    Stage("passes", stages.passes_stage),
    Stage("export", stages.export_stage),
    Stage("surgery", stages.surgery_stage),
    Stage("precision", stages.precision_stage, lambda s: s.request.rewrite.precision != "fp32"),
    Stage("verify", stages.verify_stage, lambda s: s.request.check.verify),
    Stage("cut", stages.cut_stage, lambda s: s.request.rewrite.deep_cache is not None),
    Stage("write", stages.write_stage, lambda s: s.output is not None),
)


@dataclass
class Lowered:
    """The lowered model and what the pipeline measured on the way."""

    model: onnx.ModelProto
    mode: str  # "table", "fixed" or "step"
    timesteps: list  # schedule (original timesteps) in table mode, [T] in fixed mode
    model_timesteps: list  # what the U-Net sees (rescaled when rescale_timesteps)
    stages: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] | None = None
    graph_module: Any = None  # the rewritten fx graph
    #: the module the ONNX was exported from (the rewritten graph, or the DenoisingStep around it with
    #: --step-graph) and its example inputs: what .pte / .mlpackage are made from
    source: Any = None
    source_inputs: dict[str, Any] | None = None
    request: LowerRequest | None = None
    #: the --deep-cache shallow graph (``model`` is then the full graph, with the ``cache`` output)
    shallow: onnx.ModelProto | None = None

    @property
    def step_graph(self) -> bool:
        return metadata.read_props(self.model).get(metadata.MODE) == "step"

    @property
    def passed(self) -> bool:
        return self.check is None or bool(self.check["passed"])


def example_inputs_for(config: ModelConfig, first_timestep, seed: int = 0, batch: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = {"x": torch.randn(batch, 3, config.image_size, config.image_size, generator=gen)}
    dtype = torch.float32 if isinstance(first_timestep, float) and not float(first_timestep).is_integer() else torch.int64
    inputs["timesteps"] = torch.full((batch,), first_timestep, dtype=dtype)
    if config.class_cond:
        inputs["y"] = torch.zeros(batch, dtype=torch.int64)
    return inputs


@contextmanager
def _timed(name: str, times: dict[str, float], progress: Progress | None):
    if progress:
        progress(name, "start")
    start = time.perf_counter()
    yield
    times[name] = time.perf_counter() - start
    if progress:
        progress(name, f"{times[name]:.1f} s")


def run(request: LowerRequest, model: torch.nn.Module | None = None,
        example_inputs: dict[str, torch.Tensor] | Sequence[torch.Tensor] | None = None, *,
        progress: Progress | None = None) -> Lowered:
    """Run every stage of :data:`STAGES` that applies to ``request`` and return the :class:`Lowered`.

    ``model``: the module to lower; without it, ``request.source.checkpoint`` is loaded (the load stage).
    Outputs are checked before any work (:func:`fxpass.fileio.plan_outputs`): none may be an input
    (the checkpoint, ``output.protected``) and an existing file is replaced only with ``force``.  A failing
    check raises (exit code 1) and writes nothing, unless ``force`` with an output, which writes it and
    returns a :class:`Lowered` whose ``passed`` is False.
    """
    from . import __version__
    from .fileio import plan_outputs

    request.validate()
    if model is None and request.source.checkpoint is None:
        raise FxpassError("lower: give a model or a request whose source names a checkpoint")
    out = request.output
    from .deep_cache import shallow_path

    shallow = shallow_path(out.path) if out.path is not None and request.rewrite.deep_cache is not None else None
    planned = plan_outputs({"-o": out.path, "--deep-cache": shallow, "--report": out.report}, force=out.force,
                           inputs=[request.source.checkpoint, *out.protected],
                           directories=("-o",) if out.format == "mlpackage" else ())
    started = time.perf_counter()
    state = stages.Lowering(request, progress, planned.get("-o"), planned.get("--report"), model, example_inputs,
                            shallow_path=planned.get("--deep-cache"))
    state.report.update(fxpass_version=__version__, opset=request.rewrite.opset,
                        precision=request.rewrite.precision, request=request.to_dict())
    times: dict[str, float] = {}
    for stage in STAGES:
        if stage.name == "write":
            state.report["stages_s"] = dict(times)
            state.report["total_s"] = time.perf_counter() - started
            state.lowered = _lowered(state, times)
        if stage.applies(state):
            with _timed(stage.name, times, progress):
                stage.run(state)
    return state.lowered  # made before the write stage, which always comes last


def _lowered(state: stages.Lowering, times: dict[str, float]) -> Lowered:
    return Lowered(state.proto, state.mode, state.kept, state.seen, times, state.report, state.check, state.gm,
                   state.source, state.source_inputs, state.request, state.shallow)


def lower_with_report(model: torch.nn.Module,
                      example_inputs: dict[str, torch.Tensor] | Sequence[torch.Tensor] | None = None, *,
                      request: LowerRequest | None = None, progress: Progress | None = None, **options) -> Lowered:
    """:func:`run` on ``model`` with ``request`` and/or flat options (:meth:`LowerRequest.of`'s keywords)."""
    request = (request or LowerRequest()).replace(**options)
    return run(request, model, example_inputs, progress=progress)


def lower(model: torch.nn.Module, example_inputs: dict[str, torch.Tensor] | Sequence[torch.Tensor] | None = None, *,
          request: LowerRequest | None = None, **options) -> onnx.ModelProto:
    """Lower a guided-diffusion / RePaint U-Net (ours or a user's class) to an ONNX ModelProto.

    ``request`` (a :class:`~fxpass.request.LowerRequest`) and/or its fields as flat keywords, e.g.
    ``lower(model, config=cfg, precision="fp16")``.  The most used:

    ``timesteps``: ``"respaced"`` (the config's schedule, needs ``config``), a sequence of timesteps
    (table mode: inputs ``x``, ``t_index``) or an int (fixed mode: input ``x``).  ``example_inputs``
    default to a seeded ``x`` of the config's size and the last schedule entry.  ``step_graph``
    exports one whole denoising step instead (inputs ``x``, ``t_index``, ``noise``; outputs ``x_prev``,
    ``pred_xstart``; see :mod:`fxpass.step_graph`).  ``group_norm="keep"`` keeps every GroupNorm as
    one ``GroupNormalization`` node; the default "auto" expands the large ones into a
    ``LayerNormalization`` form that ONNX Runtime's CPU provider runs about twice as fast.
    ``surgery_options`` reach the surgery passes by name, e.g. ``{"expand_group_norm": {"min_elements":
    2**20}}`` (see ``surgery.passes``).  ``verify`` (default True) checks ONNX Runtime against the eager
    model, as ``fxpass lower`` does, and raises :class:`FxpassError` when they differ; ``verify=False``
    opts out.

    Any guided-diffusion-family model: without ``example_inputs``, its inputs are inferred from its
    ``forward`` signature, first convolution and ``config`` (:mod:`fxpass.signature`); ``timestep_input``
    names a timestep parameter fxpass does not know, ``inputs`` gives other inputs' shapes
    (``["low_res=1,3,16,16"]``).  A user class's config: :func:`fxpass.config.user_class_config`.
    """
    return lower_with_report(model, example_inputs, request=request, **options).model
