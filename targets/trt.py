"""TensorRT behind Polygraphy: ONNX → network → builder config → engine → ``TrtRunner``.

The only module of fxpass that imports ``tensorrt``, and only lazily: building the Polygraphy loader
chain needs no TensorRT (Polygraphy's loaders import it when they are called), so this module imports
and its settings can be checked on any machine.  :func:`trt_unavailable_reason` says why TensorRT
cannot run here (not installed, its libraries do not load, no CUDA device), or ``None``.

The chain, all Polygraphy loaders::

    NetworkFromOnnxPath ─▶ PostprocessNetwork(keep_float32) ─▶ EngineFromNetwork(CreateConfig(...))
                                                                  ─▶ [SaveEngine] ─▶ TrtRunner

With ``fp16`` the builder may pick half-precision kernels; the layers that lose most in half
precision (normalization — GroupNormalization, LayerNormalization and InstanceNormalization all
become TensorRT normalization layers — and softmax) are pinned to float32 compute and float32
outputs, and the builder is told to obey those constraints (``precision_constraints="obey"``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fxpass.errors import first_line

#: TensorRT ``LayerType`` member names whose layers stay in float32 when fp16 kernels are allowed
FLOAT32_LAYER_TYPES = frozenset({"NORMALIZATION", "SOFTMAX"})

INSTALL_HINT = "pip install 'fxpass[trt]'"


# ---- availability ---------------------------------------------------------------------------------
def _cuda_device_count() -> tuple[int, str | None]:
    """(number of CUDA devices, why none) from the CUDA driver API, without any CUDA toolkit."""
    names = ["nvcuda.dll"] if sys.platform.startswith("win") else ["libcuda.so.1", "libcuda.so"]
    found = ctypes.util.find_library("cuda")
    if found:
        names.append(found)
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return 0, "no CUDA driver (libcuda) on this machine, so no CUDA device"
    status = lib.cuInit(0)
    if status != 0:
        return 0, f"no usable CUDA device (cuInit returned CUDA error {status})"
    count = ctypes.c_int(0)
    status = lib.cuDeviceGetCount(ctypes.byref(count))
    if status != 0:
        return 0, f"no usable CUDA device (cuDeviceGetCount returned CUDA error {status})"
    if count.value == 0:
        return 0, "no CUDA device on this machine"
    return count.value, None


def trt_unavailable_reason() -> str | None:
    """Why TensorRT cannot build and run engines here, or ``None`` when it can (as far as can be told
    without building one): the module, its libraries, a CUDA device, the CUDA runtime Polygraphy uses."""
    if importlib.util.find_spec("tensorrt") is None:
        return f"TensorRT is not installed ({INSTALL_HINT})"
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"TensorRT is installed but its libraries do not load ({first_line(exc, 200)})"
    count, why = _cuda_device_count()
    if not count:
        return why
    try:
        from polygraphy import cuda

        from .compare import polygraphy_severity

        with polygraphy_severity(False):
            cuda.wrapper()
    except Exception as exc:  # Polygraphy raises its own exception type, or OSError from ctypes
        return f"the CUDA runtime library (libcudart) does not load ({first_line(exc, 200)})"
    return None


# ---- precision constraints --------------------------------------------------------------------------
def _type_name(layer_type) -> str:
    return getattr(layer_type, "name", str(layer_type).rsplit(".", 1)[-1])


def float32_layer_names(layers: Iterable) -> list[str]:
    """Names of the layers to keep in float32: those whose ``type`` is a TensorRT ``LayerType`` named in
    :data:`FLOAT32_LAYER_TYPES`.  ``layers``: a TensorRT ``INetworkDefinition`` (iterates its layers) or
    anything yielding objects with ``name`` and ``type``."""
    return [layer.name for layer in layers if _type_name(layer.type) in FLOAT32_LAYER_TYPES]


def keep_float32(network) -> list[str]:
    """Pin normalization and softmax layers of a TensorRT network to float32 compute and outputs.

    Used as a Polygraphy ``PostprocessNetwork`` callback; takes effect with
    ``precision_constraints="obey"`` (or ``"prefer"``) in ``CreateConfig``.  Returns the layer names.
    """
    import tensorrt as trt

    names = set(float32_layer_names(network))
    for layer in network:
        if layer.name not in names:
            continue
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            layer.set_output_type(i, trt.float32)
    return sorted(names)


# ---- loaders and runner --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrtSettings:
    """How to build an engine.

    ``fp16``: allow half-precision kernels; ``tf32``: allow TF32 for float32 matrix math (both off
    means strict float32).  ``float32_islands``: with ``fp16``, keep normalization and softmax layers
    in float32 and make the builder obey it.  ``timing_cache``: a file read before the build (when it
    exists) and updated after it.  ``engine_path``: where to save the serialized engine, if anywhere.
    ``max_batch``: the largest batch of the optimization profile when the model's batch is dynamic.
    """

    fp16: bool = False
    tf32: bool = False
    float32_islands: bool = True
    timing_cache: str | os.PathLike | None = None
    engine_path: str | os.PathLike | None = None
    max_batch: int = 4

    @property
    def precision_constraints(self) -> str | None:
        return "obey" if self.fp16 and self.float32_islands else None


def _profiles(onnx_path: str, max_batch: int):
    """One optimization profile when some input has a symbolic dimension (batch: 1..max_batch)."""
    import onnx
    from polygraphy.backend.trt import Profile

    model = onnx.load(onnx_path, load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    profile = Profile()
    dynamic = False
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        dims = inp.type.tensor_type.shape.dim
        if not any(d.HasField("dim_param") or not d.HasField("dim_value") for d in dims):
            continue
        dynamic = True
        shape_min, shape_opt, shape_max = [], [], []
        for k, d in enumerate(dims):
            if d.HasField("dim_value"):
                shape_min.append(d.dim_value)
                shape_opt.append(d.dim_value)
                shape_max.append(d.dim_value)
            elif k == 0:
                shape_min.append(1)
                shape_opt.append(1)
                shape_max.append(max_batch)
            else:
                raise ValueError(f"{onnx_path}: input {inp.name} has a symbolic dimension {k} besides the batch")
        profile.add(inp.name, min=shape_min, opt=shape_opt, max=shape_max)
    return [profile] if dynamic else None


def engine_loader(onnx_path: str | os.PathLike, settings: TrtSettings = TrtSettings()):
    """The Polygraphy loader chain that builds (and optionally saves) a TensorRT engine.

    Nothing is built or imported until the loader is called (``TrtRunner`` calls it on activation).
    """
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, PostprocessNetwork, SaveEngine

    path = os.fspath(onnx_path)
    network = NetworkFromOnnxPath(path)
    if settings.fp16 and settings.float32_islands:
        network = PostprocessNetwork(network, keep_float32, name="keep_float32")
    cache = os.fspath(settings.timing_cache) if settings.timing_cache else None
    config = CreateConfig(
        fp16=settings.fp16,
        tf32=settings.tf32,
        precision_constraints=settings.precision_constraints,
        load_timing_cache=cache if cache and Path(cache).exists() else None,
        profiles=_profiles(path, settings.max_batch),
    )
    engine = EngineFromNetwork(network, config=config, save_timing_cache=cache)
    if settings.engine_path:
        engine = SaveEngine(engine, path=os.fspath(settings.engine_path))
    return engine


class BuildOnce:
    """A loader that calls ``loader`` on first use and hands back the same engine afterwards, so a
    runner activated for several ``Comparator.run`` calls builds its engine once."""

    def __init__(self, loader):
        self.loader = loader
        self.engine = None

    def __call__(self):
        if self.engine is None:
            self.engine = self.loader()
        return self.engine


def trt_runner(onnx_path: str | os.PathLike, settings: TrtSettings = TrtSettings(), *, name: str | None = None):
    """A Polygraphy ``TrtRunner`` over :func:`engine_loader` (the engine is built on first activation)."""
    from polygraphy.backend.trt import TrtRunner

    return TrtRunner(BuildOnce(engine_loader(onnx_path, settings)),
                     name=name or ("tensorrt-fp16" if settings.fp16 else "tensorrt"))
