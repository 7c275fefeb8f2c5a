"""LiteRT behind Polygraphy: a ``.tflite`` file in LiteRT's interpreter (``ai_edge_litert``, CPU kernels with
its default XNNPACK delegate), so ``fxpass check FILE.tflite`` compares it with the eager model as it
compares ONNX Runtime.

Imports ``ai_edge_litert`` only lazily, so this module imports on any machine;
:func:`litert_unavailable_reason` says why it cannot run here.  Inputs are set by the signature's names
(``x``, ``t_index``); outputs come back in the graph's order under ``output_names`` (``out`` for a U-Net,
as the ONNX model names it).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from fxpass.errors import first_line

INSTALL_HINT = "pip install 'fxpass[tflite]'"
RUNNER_NAME = "litert-cpu"


def litert_unavailable_reason() -> str | None:
    """Why LiteRT's interpreter cannot run here, or None."""
    if importlib.util.find_spec("ai_edge_litert") is None:
        return f"LiteRT is not installed ({INSTALL_HINT})"
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install raises ImportError/OSError
        return f"LiteRT is installed but does not load ({first_line(exc, 200)})"
    return None


class LiteRTRunner(BaseRunner):
    """A ``.tflite`` file in LiteRT's interpreter as a Polygraphy runner (loaded on first activation)."""

    def __init__(self, path: str | os.PathLike, *, output_names: Sequence[str] = ("out",), num_threads: int | None = None,
                 name: str | None = None):
        super().__init__(name=name or RUNNER_NAME, prefix="litert-runner")
        self.path = os.fspath(path)
        self.output_names = list(output_names)
        self.num_threads = num_threads
        self._interpreter = None

    def interpreter(self):
        if self._interpreter is None:
            from ai_edge_litert.interpreter import Interpreter

            interpreter = Interpreter(model_path=self.path, num_threads=self.num_threads)
            interpreter.allocate_tensors()
            self._inputs = interpreter.get_signature_runner().get_input_details()  # name -> detail
            outputs = interpreter.get_output_details()
            if len(outputs) != len(self.output_names):
                raise RuntimeError(f"{self.path}: {len(outputs)} outputs, expected {len(self.output_names)} "
                                   f"({', '.join(self.output_names)})")
            self._outputs = [(name, d["index"]) for name, d in zip(self.output_names, outputs)]
            self._interpreter = interpreter
        return self._interpreter

    def activate_impl(self):
        self.interpreter()

    def deactivate_impl(self):
        pass

    def get_input_metadata_impl(self):
        self.interpreter()
        meta = TensorMetadata()
        for name, detail in self._inputs.items():
            meta.add(name, np.dtype(detail["dtype"]), tuple(int(d) for d in detail["shape_signature"]))
        return meta

    def infer_impl(self, feed_dict):
        interpreter = self.interpreter()
        for name, detail in self._inputs.items():
            interpreter.set_tensor(detail["index"], np.ascontiguousarray(feed_dict[name], dtype=detail["dtype"]))
        start = time.perf_counter()
        interpreter.invoke()
        self.inference_time = time.perf_counter() - start
        return OrderedDict((name, interpreter.get_tensor(index).copy()) for name, index in self._outputs)


def litert_runner(path: str | os.PathLike, *, output_names: Sequence[str] = ("out",),
                  num_threads: int | None = None, name: str | None = None) -> LiteRTRunner:
    """A :class:`LiteRTRunner` (nothing is loaded until it is activated)."""
    return LiteRTRunner(path, output_names=output_names, num_threads=num_threads, name=name)
