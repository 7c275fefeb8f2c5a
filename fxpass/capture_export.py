"""Capture route 2: ``torch.export`` for code the example-value tracer (route 1) cannot take.

Route 1 (:mod:`fxpass.capture`) keeps the graph at the torch level and records every decision on a
traced value, but a proxy is no tensor to a library that checks types (einops' ``rearrange``), and fx
has no node for index assignment into a traced tensor (``h[:, :c] = ...``).  :func:`capture_exported`
runs ``torch.export.export(model, (), inputs, strict=False)`` instead: the user's Python runs as it is,
on fake tensors, and what comes out is an ATen graph at the example inputs' static shapes,
functionalized (``run_decompositions({})``: index assignment becomes ``slice_scatter``) and turned into
a plain :class:`torch.fx.GraphModule` the fx passes take:

- placeholders named after ``forward``'s parameters (``x``, ``timesteps``, the extras), as route 1
  names them, so ``fold_timesteps`` finds the timestep input;
- parameters and buffers as ``get_attr`` (unlifted), no pytree plumbing, no input-check submodule
  (``_guards_fn``), no ``_assert_tensor_metadata`` (a restatement of the example's static dtypes);
- one tensor output: what ``forward`` returns reduced by :func:`fxpass.outputs.pick_output` (the same
  rule as route 1 and the eager reference), applied while the model is exported;
- node meta ``fxpass_shape`` / ``fxpass_dtype`` (from export's ``val``) and ``fxpass_source`` (the
  user's line, from export's ``stack_trace``), and ``gm.meta`` as route 1 sets it, plus
  ``fxpass_route = "export"``.

A data-dependent decision that export cannot take (``if x.mean() > 0:``) is one line naming the user's
source line.  Shapes are static: the batch size is a constant of the graph.
"""

from __future__ import annotations

import contextlib
import copy
import io
import linecache
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.fx import GraphModule

from .errors import FxpassError, first_line

__all__ = ["capture_exported", "ROUTE"]

ROUTE = "export"

#: libraries whose frames are never the user's line: torch itself, tensor-op helpers, fxpass
_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (torch,))
_FXPASS_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_HELPER_PACKAGES = ("einops",)
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')
#: export's own checks on the example's static metadata: nothing a lowered graph needs
_DROPPED = ("aten._assert_tensor_metadata.default",)
_QUIET_LOGGERS = ("torch.export", "torch._export", "torch._dynamo", "torch.fx", "torch.fx.experimental.symbolic_shapes",
                  "torch._functorch", "torch._subclasses", "torch._subclasses.fake_tensor")


def _is_library_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    if path.startswith(_LIBRARY_DIRS) or path.startswith(_FXPASS_DIR) or filename.startswith("<"):
        return True
    parts = path.split(os.sep)
    return any(p in parts for p in _HELPER_PACKAGES)


class _OneTensor(torch.nn.Module):
    """``model`` called by keyword, its output reduced to one tensor (the key taken kept in ``picked``)."""

    def __init__(self, model: torch.nn.Module, output: str | None, picked: list):
        super().__init__()
        self.model = model
        self._output = output
        self._picked = picked

    def forward(self, **inputs):
        from .outputs import pick_output

        out, key = pick_output(self.model(**inputs), self._output, where=f"{type(self.model).__name__}.forward")
        self._picked[:] = [key]
        return out


@contextlib.contextmanager
def _quiet():
    """torch.export prints the graph it had and logs warnings when it fails: not ours to show."""
    from .capture import quiet_loggers

    with quiet_loggers(*_QUIET_LOGGERS), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def capture_exported(model: torch.nn.Module, example_inputs: Sequence[Any] | Mapping[str, Any], *,
                     output: str | None = None) -> GraphModule:
    """``model`` on ``example_inputs`` (positional, or a mapping by parameter name, as
    :func:`fxpass.capture.capture` takes them) through ``torch.export`` into a GraphModule the fx passes
    take (see the module docstring); :class:`FxpassError` in one line where export refuses the code."""
    from .capture import _bind_inputs

    if not isinstance(model, torch.nn.Module):
        raise FxpassError(f"capture: expected a torch.nn.Module, got {type(model).__name__}")
    inputs = _bind_inputs(model, example_inputs)
    picked: list = [None]
    was_training = model.training
    model.eval()
    try:
        with _quiet(), torch.no_grad():
            program = torch.export.export(_OneTensor(model, output, picked), (), inputs, strict=False)
            program = program.run_decompositions({})
    except Exception as exc:
        ours = _fxpass_error(exc)
        if ours is not None:
            raise ours from None
        raise FxpassError(f"{_user_line(exc)}: torch.export cannot handle this "
                          f"({type(exc).__name__}: {first_line(exc)})") from None
    finally:
        model.train(was_training)
    gm = _plain_graph_module(program.module(), list(inputs), type(model).__name__)
    _record_values(gm)
    gm.meta["fxpass_example_inputs"] = dict(inputs)
    gm.meta["fxpass_guards"] = 0  # export refuses a decision on data instead of guarding it
    gm.meta["fxpass_output"] = picked[0]
    gm.meta["fxpass_route"] = ROUTE
    return gm


def _fxpass_error(exc: BaseException) -> FxpassError | None:
    """An FxpassError raised inside the export (``pick_output``'s refusal), however export wrapped it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, FxpassError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _user_line(exc: BaseException) -> str:
    """``file:line: `source``` of the innermost user frame in ``exc``'s traceback, else "torch.export"."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        if not _is_library_file(tb.tb_frame.f_code.co_filename):
            found = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    if found is None:
        return "torch.export"
    source = linecache.getline(*found).strip()
    return f"{found[0]}:{found[1]}: `{source}`" if source else f"{found[0]}:{found[1]}"


def _plain_graph_module(exported: GraphModule, names: list[str], cls: str) -> GraphModule:
    """``exported`` (``ExportedProgram.module()``) without its pytree calling convention: placeholders
    named ``names``, the one output returned as it is, export's input check and metadata asserts left out."""
    old = exported.graph
    placeholders = [n for n in old.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        raise FxpassError(f"capture: {cls}.forward: torch.export made {len(placeholders)} inputs of "
                          f"{len(names)} ({', '.join(names)}); give tensors as the example inputs")
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node, name in zip(placeholders, names):
        env[node] = graph.placeholder(name)
        env[node].meta = copy.copy(node.meta)
    for node in old.nodes:
        if node.op == "placeholder" or _dropped(node):
            continue
        if node.op == "output":
            flat = node.args[0]
            result = flat[0] if isinstance(flat, (tuple, list)) and len(flat) == 1 else flat
            graph.output(torch.fx.node.map_arg(result, lambda n: env[n]))
            break
        env[node] = graph.node_copy(node, lambda n: env[n])
    gm = GraphModule(exported, graph, class_name=f"{cls}Exported")
    gm.graph.lint()
    return gm


def _dropped(node: torch.fx.Node) -> bool:
    if node.op == "call_module" and node.target == "_guards_fn":  # ep.module()'s check of the call's inputs
        return True
    return node.op == "call_function" and str(node.target) in _DROPPED and not node.users


def _record_values(gm: GraphModule) -> None:
    """Shapes and dtypes (``fxpass_shape`` / ``fxpass_dtype``) and plain Python values from export's
    ``val`` meta, and the user's line (``fxpass_source``) from its ``stack_trace``, as route 1 records them."""
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and all(isinstance(d, int) for d in val.shape):
            node.meta["fxpass_shape"] = tuple(val.shape)
            node.meta["fxpass_dtype"] = val.dtype
        elif isinstance(val, (bool, int, float)) and node.op != "placeholder":
            node.meta["fxpass_value"] = val
        source = _source_of_trace(node.meta.get("stack_trace"))
        if source is not None:
            node.meta["fxpass_source"] = source


def _source_of_trace(trace: str | None) -> tuple[str, int] | None:
    """The innermost user frame of an export ``stack_trace`` text, as (file, line)."""
    if not trace:
        return None
    frames = [(m["file"], int(m["line"])) for m in _FRAME.finditer(trace)]
    users = [f for f in frames if not _is_library_file(f[0])]
    return users[-1] if users else None
