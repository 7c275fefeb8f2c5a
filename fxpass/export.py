"""Export a rewritten GraphModule to ONNX through torch.onnx (dynamo exporter)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx
import torch
from torch.fx import GraphModule

from .errors import FxpassError
from .metadata import write_props

DEFAULT_OPSET = 21
MIN_OPSET = 18
#: highest opset checked here: torch 2.13's exporter and ONNX Runtime 1.32 both run it
MAX_OPSET = 26


def check_opset(opset: int) -> int:
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise FxpassError(f"--opset {opset}: supported opsets are {MIN_OPSET}..{MAX_OPSET}")
    return opset


@contextlib.contextmanager
def quiet_exporter():
    """Silence the exporter's progress prints and warnings (they are not ours to show)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export(
    gm: GraphModule,
    example_inputs: dict[str, torch.Tensor] | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    metadata: dict[str, str] | None = None,
    output_name: str = "out",
    output_names: list[str] | None = None,
) -> onnx.ModelProto:
    """Export ``gm`` with ``torch.onnx.export(dynamo=True)`` at ``opset``.

    Inputs are named after the graph's placeholders (``x``, ``t_index``, ``y``); the output is
    ``out``.  Static shapes unless ``dynamic_batch``.  ``metadata`` (from :func:`fxpass.metadata.encode`)
    becomes the model's ``metadata_props``.
    """
    check_opset(opset)
    if example_inputs is None:
        example_inputs = gm.meta.get("fxpass_example_inputs")
    if not example_inputs:
        raise FxpassError("export: no example inputs (capture records them; or pass example_inputs=)")
    if isinstance(gm, GraphModule):
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    else:  # a module wrapping a rewritten graph (the step graph): inputs in the order given
        names = list(example_inputs)
    missing = [n for n in names if n not in example_inputs]
    if missing:
        raise FxpassError(f"export: no example value for graph input(s) {', '.join(missing)}")
    args = tuple(example_inputs[n] for n in names)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1024)
        dynamic_shapes = tuple({0: batch} if isinstance(a, torch.Tensor) and a.ndim else None for a in args)
    try:
        with quiet_exporter():
            program = torch.onnx.export(
                gm,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=names,
                output_names=output_names or [output_name],
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                verbose=False,
                external_data=False,
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FxpassError(f"export: torch.onnx.export failed ({type(exc).__name__}: {first[:300]})") from exc
    model = program.model_proto
    if metadata:
        write_props(model, metadata)
    return model
