"""ExecuTorch ``.pte``: the rewritten fx graph through ``torch.export.export`` and ExecuTorch's
``to_edge_transform_and_lower`` with the XNNPACK partitioner; :func:`run_pte` runs a ``.pte`` file in
ExecuTorch's Python runtime (``executorch.runtime.Runtime``).

The graph is the one ``fxpass.capture`` + ``fxpass.passes.rewrite`` produce (the timestep folded into
tables gathered by ``t_index``), so nothing of the eager model's Python (``.item()``, asserts,
``math.sqrt`` on shapes) reaches ``torch.export``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FxpassError, first_line
from ._deps import require
from ..fileio import staged_path
from ._io import compare_module, gate

#: gates against the eager model (max|diff| ≤ tol·max|ref|), as fxpass lower's for ONNX
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


class _HalfCompute(torch.nn.Module):
    """float32 in and out, float16 inside: the module's float parameters/buffers/constants are cast."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module.half()

    def forward(self, *args):
        args = [a.half() if a.is_floating_point() else a for a in args]
        out = self.module(*args)
        if isinstance(out, (tuple, list)):
            return type(out)(o.float() for o in out)
        return out.float()


def _halve_constants(gm: torch.nn.Module) -> torch.nn.Module:
    """``.half()`` misses float tensors held as plain attributes (fx ``get_attr`` of a non-buffer)."""
    for module in gm.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype == torch.float32:
                setattr(module, name, value.half())
    return gm


def half_compute(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` computing in float16 with float32 inputs and outputs.  A step graph
    (:class:`~fxpass.step_graph.DenoisingStep`) keeps its posterior update in float32: only its U-Net
    is halved (its coefficients reach ~1/sqrt(alpha_bar) ≈ 10^2, whose products cancel in float16)."""
    import copy

    from ..step_graph import DenoisingStep

    if isinstance(module, DenoisingStep):
        return module.with_unet(_HalfCompute(_halve_constants(copy.deepcopy(module.unet))))
    return _HalfCompute(_halve_constants(copy.deepcopy(module)))


def _ordered(example_inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, Mapping):
        return tuple(example_inputs.values())
    return tuple(example_inputs)


def to_pte(graph_module: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
           out_path: str | Path, *, fp16: bool = False, verify: bool = True,
           reference: torch.nn.Module | None = None, tolerance: float | None = None,
           rows: int | None = None) -> dict[str, Any]:
    """Export ``graph_module`` (positional inputs in the order of ``example_inputs``; a dict's order is
    its insertion order, e.g. ``x``, ``t_index``) with ``torch.export.export`` and lower it with
    ExecuTorch's XNNPACK partitioner to a ``.pte`` file at ``out_path``.  ``graph_module`` may also be the
    step graph (:func:`fxpass.step_graph.step_module`: inputs x, t_index, noise; outputs x_prev, pred_xstart).

    ``fp16``: parameters and activations float16 inside, inputs and outputs stay float32 (a step
    graph's posterior update too: :func:`half_compute`).  ``rows``: how many t_index rows its tables
    have (default: from the graph's fxpass metadata).
    ``verify``: the ``.pte`` runs in ExecuTorch's runtime against ``reference`` (default: the graph
    module itself, float32) on the example inputs with ``t_index`` (when there is one) at the first,
    middle and last row of its tables; above ``tolerance``·max|ref| (fp32 1e-4, fp16 2e-2) or NaN/Inf
    nothing is written and FxpassError (exit 1) is raised.
    Returns ``{"path", "bytes", "precision", "delegated_nodes", "nodes", "export_s", "lower_s", "check"}``.
    """
    require("pte")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackPartitioner,
    )
    from executorch.exir import to_edge_transform_and_lower

    inputs = _ordered(example_inputs)
    precision = "fp16" if fp16 else "fp32"
    tolerance = TOLERANCE[precision] if tolerance is None else tolerance
    reference = graph_module if reference is None else reference
    module = graph_module
    if fp16:
        module = half_compute(graph_module)
    module = module.eval()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            exported = torch.export.export(module, inputs)
    except Exception as exc:  # noqa: BLE001 - third-party converters raise many types; re-raised as FxpassError
        raise FxpassError(f"{out_path}: torch.export failed on the rewritten graph: {first_line(exc)}") from None
    t1 = time.perf_counter()
    try:
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        delegated, nodes = _delegation(edge)
        program = edge.to_executorch()
    except Exception as exc:  # noqa: BLE001 - third-party converters raise many types; re-raised as FxpassError
        raise FxpassError(f"{out_path}: ExecuTorch lowering failed: {first_line(exc)}") from None
    t2 = time.perf_counter()
    report: dict[str, Any] = {"precision": precision, "bytes": len(program.buffer), "delegated_nodes": delegated,
                              "nodes": nodes, "export_s": t1 - t0, "lower_s": t2 - t1}
    with staged_path(out_path) as staged:
        staged.write_bytes(program.buffer)
        if verify:
            report["check"] = gate(compare_pte(staged, reference, inputs, rows=rows), tolerance, out_path,
                                   "ExecuTorch")
    report["path"] = str(out_path)
    return report


def _delegation(edge) -> tuple[int, int]:
    """(call_delegate nodes, all call_function nodes) in the lowered edge program's graph."""
    graph = edge.exported_program().graph_module.graph
    calls = [n for n in graph.nodes if n.op == "call_function"]
    delegated = sum(1 for n in calls if "executorch_call_delegate" in str(n.target))
    return delegated, len(calls)


def compare_pte(path: str | Path, reference: torch.nn.Module, inputs: Sequence[torch.Tensor], *,
                rows: int | None = None) -> dict[str, Any]:
    """Run the ``.pte`` and ``reference`` on ``inputs`` at the first, middle and last t_index (``rows``:
    table rows; default from the graph's metadata, else the given t_index only)."""
    return compare_module(lambda case: run_pte(path, case), reference, inputs, rows=rows, where=str(path))


def run_pte(path: str | Path, inputs: Mapping[str, Any] | Sequence[Any], *, method: str = "forward") -> list[np.ndarray]:
    """Run a ``.pte`` file's ``method`` in ExecuTorch's Python runtime; inputs as tensors or arrays (a
    dict's insertion order is the argument order); the outputs as NumPy arrays."""
    require("pte")
    from executorch.runtime import Runtime

    args = [torch.as_tensor(a) for a in _ordered(inputs)]
    path = Path(path)
    if not path.is_file():
        raise FxpassError(f"{path}: no such .pte file")
    program = Runtime.get().load_program(path)
    outputs = program.load_method(method).execute(args)
    return [o.detach().numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in outputs]
