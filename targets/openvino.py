"""OpenVINO behind Polygraphy: an ONNX file compiled for OpenVINO's CPU plugin at f32 or bf16.

The only module of fxpass that imports ``openvino``, and only lazily (inside functions), so this module
imports on any machine.  :func:`openvino_unavailable_reason` says why a precision cannot run here (OpenVINO
not installed or not loading, no CPU plugin, a CPU without bf16), or ``None``.

OpenVINO reads ``.onnx`` directly (``Core.read_model``, external data beside the file included) and
compiles it with ``INFERENCE_PRECISION_HINT``: ``f32`` computes in float32; ``bf16`` lets the CPU plugin
run convolutions, matmuls and most element-wise layers in bfloat16 (8 significant bits), so its outputs
call for :data:`TOLERANCES` ``["bf16"]`` (a runner's ``tolerance``) rather than the float32 tolerance.  A CPU without bf16
instructions would silently compute in f32 under that hint; this module reports it unavailable instead,
and the runner refuses to run when the compiled model's precision is not the one asked for.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections import OrderedDict

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from fxpass.errors import first_line

INSTALL_HINT = "pip install 'fxpass[openvino]'"
#: fxpass's precision name → OpenVINO's ``INFERENCE_PRECISION_HINT`` value
PRECISIONS = {"f32": "f32", "fp32": "f32", "bf16": "bf16"}
#: (atol as a fraction of max|reference|, rtol) per OpenVINO precision.  f32: the float32 tolerance.
#: bf16: about 2.2x the worst max|diff|/max|ref| measured against the eager float32 model on this
#: project's configs (every t_index, several seeds; OpenVINO 2026.4.1, Zen 4 with AVX-512 BF16): random
#: weights, tiny test config 3.2e-2 (250 inputs), small test config 3.0e-2 (150); trained digits
#: reference 6.7e-3 (150); CAMUS at seed 0 1.2e-2 (5).  Random weights give the larger figures.
TOLERANCES = {"f32": (1e-4, 0.0), "bf16": (7e-2, 0.0)}


def _precision(precision: str) -> str:
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"OpenVINO precision {precision!r}: choose f32 or bf16") from None


def runner_name(precision: str = "f32", device: str = "CPU") -> str:
    """``openvino-cpu-f32`` / ``openvino-cpu-bf16``: the row name of a runner."""
    return f"openvino-{device.lower()}-{_precision(precision)}"


# ---- availability ---------------------------------------------------------------------------------
def _core():
    import openvino

    return openvino.Core()


def _cpu_capabilities(core) -> list[str]:
    """The CPU plugin's ``OPTIMIZATION_CAPABILITIES`` (e.g. FP32, BF16, INT8)."""
    return [str(c).upper() for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def openvino_unavailable_reason(precision: str = "f32") -> str | None:
    """Why OpenVINO cannot run a model at ``precision`` (``f32`` or ``bf16``) on this machine's CPU,
    or ``None`` when it can: the package, its libraries, the CPU plugin, bf16 instructions."""
    precision = _precision(precision)
    if importlib.util.find_spec("openvino") is None:
        return f"OpenVINO is not installed ({INSTALL_HINT})"
    try:
        core = _core()
    except Exception as exc:  # ImportError/OSError from its libraries, RuntimeError from the plugins
        return f"OpenVINO is installed but does not load ({first_line(exc, 200)})"
    try:
        devices = list(core.available_devices)
        capabilities = _cpu_capabilities(core) if "CPU" in devices else []
    except Exception as exc:  # OpenVINO raises RuntimeError for a plugin that fails to load
        return f"OpenVINO's CPU plugin does not load ({first_line(exc, 200)})"
    if "CPU" not in devices:
        return f"OpenVINO has no CPU device here (devices: {', '.join(devices) or 'none'})"
    if precision == "bf16" and "BF16" not in capabilities:
        return ("this CPU has no bf16 support (OpenVINO's CPU plugin reports "
                f"{', '.join(capabilities) or 'no capabilities'})")
    return None


# ---- the runner ------------------------------------------------------------------------------------
def _dims(partial_shape) -> tuple[int, ...]:
    return tuple(d.get_length() if d.is_static else -1 for d in partial_shape)


def _onnx_output_names(path: str) -> list[str]:
    import onnx

    try:
        return [o.name for o in onnx.load(path, load_external_data=False).graph.output]
    except Exception:  # not ONNX (OpenVINO IR): the ports' own names are all there is
        return []


def _port_name(port, preferred: list[str]) -> str:
    """The name of a model input/output: the ONNX graph's name where the port carries several."""
    names = port.get_names()
    for name in preferred:
        if name in names:
            return name
    return port.get_any_name()


class OpenVinoRunner(BaseRunner):
    """An ONNX (or OpenVINO IR) file on OpenVINO's CPU plugin, as a Polygraphy runner.

    The model is read and compiled on first activation and kept for later ones; each activation makes
    an infer request.  ``precision``: ``f32`` or ``bf16`` (``INFERENCE_PRECISION_HINT``);
    ``num_threads``: ``INFERENCE_NUM_THREADS`` (default: OpenVINO's choice, every core).  Outputs come
    back as an ``OrderedDict`` by the ONNX graph's output names, in the graph's order.
    """

    def __init__(self, path: str | os.PathLike, *, precision: str = "f32", num_threads: int | None = None,
                 name: str | None = None):
        self.precision = _precision(precision)
        super().__init__(name=name or runner_name(self.precision), prefix="openvino-runner")
        self.path = os.fspath(path)
        self.num_threads = num_threads
        #: the comparison tolerance this runner's outputs call for (atol fraction of max|ref|, rtol)
        self.tolerance = TOLERANCES[self.precision]
        self._compiled = None

    def config(self) -> dict:
        """The properties ``compile_model`` gets."""
        props = {"INFERENCE_PRECISION_HINT": self.precision}
        if self.num_threads:
            props["INFERENCE_NUM_THREADS"] = int(self.num_threads)
        return props

    def compiled_model(self):
        """Read and compile the model (once); raises where the compiled precision is not the one asked."""
        if self._compiled is None:
            core = _core()
            compiled = core.compile_model(core.read_model(self.path), "CPU", self.config())
            got = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
            want = {"f32": "float32", "bf16": "bfloat16"}[self.precision]
            if want not in got and self.precision not in got:
                raise RuntimeError(f"{self.path}: OpenVINO compiled at {got}, not {self.precision}")
            preferred = _onnx_output_names(self.path)
            self._input_names = [_port_name(p, []) for p in compiled.inputs]
            self._outputs = [(_port_name(p, preferred), p) for p in compiled.outputs]
            self._compiled = compiled
        return self._compiled

    def activate_impl(self):
        self._request = self.compiled_model().create_infer_request()

    def deactivate_impl(self):
        del self._request

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for port in self.compiled_model().inputs:
            dtype = DataType.from_dtype(np.dtype(port.get_element_type().to_dtype()))
            meta.add(_port_name(port, []), dtype, _dims(port.get_partial_shape()))
        return meta

    def infer_impl(self, feed_dict):
        feeds = {name: np.ascontiguousarray(feed_dict[name]) for name in self._input_names}
        start = time.perf_counter()
        results = self._request.infer(feeds, share_inputs=False, share_outputs=False)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((name, np.asarray(results[port])) for name, port in self._outputs)


def openvino_runner(path: str | os.PathLike, *, precision: str = "f32", num_threads: int | None = None,
                    name: str | None = None) -> OpenVinoRunner:
    """An :class:`OpenVinoRunner` (nothing is read or compiled until it is activated)."""
    return OpenVinoRunner(path, precision=precision, num_threads=num_threads, name=name)
