"""targets/trt.py: why TensorRT cannot run, the Polygraphy loader chain, float32 islands; engines where it can.

Everything short of building an engine runs on any machine (Polygraphy's loaders import TensorRT only
when called); the tests marked ``trt`` build engines and skip with the reason where that cannot happen.
"""

from __future__ import annotations

import enum
import importlib.machinery
import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest

import targets.trt as trt_target
from targets.trt import (
    FLOAT32_LAYER_TYPES,
    BuildOnce,
    TrtSettings,
    _cuda_device_count,
    _profiles,
    engine_loader,
    float32_layer_names,
    keep_float32,
    trt_runner,
    trt_unavailable_reason,
)

ROOT = Path(__file__).resolve().parents[2]
REASON = trt_unavailable_reason()


def relu_model(path: Path, batch: int | str = 1) -> Path:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 3, 4, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 3, 4, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph), str(path))
    return path


# ---- availability ----------------------------------------------------------------------------------
def test_reason_names_what_is_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else real(name, *a))
    assert trt_unavailable_reason() == "TensorRT is not installed (pip install 'fxpass[trt]')"
    monkeypatch.setattr(importlib.util, "find_spec", real)
    installed = types.ModuleType("tensorrt")  # a TensorRT that imports, on a machine without a CUDA device
    installed.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", installed)
    monkeypatch.setattr(trt_target, "_cuda_device_count", lambda: (0, "no CUDA device on this machine"))
    assert trt_unavailable_reason() == "no CUDA device on this machine"


def test_reason_when_tensorrt_is_installed_but_its_libraries_do_not_load(monkeypatch, tmp_path):
    """A ``tensorrt`` package whose import fails as a wheel without its shared libraries does."""
    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise ImportError('libnvinfer.so.10: cannot open shared object file: No such file or directory')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    assert trt_unavailable_reason() == ("TensorRT is installed but its libraries do not load "
                                        "(libnvinfer.so.10: cannot open shared object file: No such file or directory)")


class FakeLibcuda:
    """The two driver calls ``_cuda_device_count`` makes, answering as a driver with ``devices`` would."""

    def __init__(self, init_status=0, count_status=0, devices=0):
        self.init_status, self.count_status, self.devices = init_status, count_status, devices

    def cuInit(self, flags):
        return self.init_status

    def cuDeviceGetCount(self, ref):
        ref._obj.value = self.devices
        return self.count_status


@pytest.mark.parametrize("lib, expected", [
    (None, (0, "no CUDA driver (libcuda) on this machine, so no CUDA device")),
    (FakeLibcuda(init_status=100), (0, "no usable CUDA device (cuInit returned CUDA error 100)")),
    (FakeLibcuda(count_status=3), (0, "no usable CUDA device (cuDeviceGetCount returned CUDA error 3)")),
    (FakeLibcuda(devices=0), (0, "no CUDA device on this machine")),
    (FakeLibcuda(devices=2), (2, None)),
], ids=["no-driver", "init-fails", "count-fails", "no-device", "two-devices"])
def test_cuda_device_count_says_why_there_is_none(monkeypatch, lib, expected):
    def cdll(name):
        if lib is None:
            raise OSError(f"{name}: cannot open shared object file")
        return lib

    monkeypatch.setattr(trt_target.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(trt_target.ctypes, "CDLL", cdll)
    assert _cuda_device_count() == expected


def test_fxpass_never_imports_tensorrt():
    offenders = [str(p.relative_to(ROOT)) for p in [*(ROOT / "fxpass").rglob("*.py"), *(ROOT / "targets").rglob("*.py")]
                 if re.search(r"^\s*(import|from)\s+tensorrt\b", p.read_text(), re.M)]
    assert offenders == ["targets/trt.py"]
    code = ("import sys; from fxpass.cli import build_parser; build_parser(); import fxpass.cli.check, fxpass.verify, targets.trt; "
            "targets.trt.engine_loader; print('tensorrt' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


# ---- float32 islands -------------------------------------------------------------------------------
class LayerType(enum.Enum):
    """Shaped like ``tensorrt.LayerType`` (members with names) for the selection logic."""

    CONVOLUTION = 0
    NORMALIZATION = 1
    SOFTMAX = 2
    ELEMENTWISE = 3
    MATRIX_MULTIPLY = 4


def test_float32_layer_names_selects_normalization_and_softmax():
    layers = [SimpleNamespace(name=f"{t.name.lower()}_{i}", type=t) for i, t in enumerate(LayerType)]
    layers += [SimpleNamespace(name="group_norm_2", type=LayerType.NORMALIZATION)]
    assert float32_layer_names(layers) == ["normalization_1", "softmax_2", "group_norm_2"]
    assert FLOAT32_LAYER_TYPES == {"NORMALIZATION", "SOFTMAX"}
    assert float32_layer_names([]) == []


def test_settings_obey_precision_constraints_only_with_fp16_and_islands():
    assert TrtSettings().precision_constraints is None  # strict float32: nothing to constrain
    assert TrtSettings(fp16=True).precision_constraints == "obey"
    assert TrtSettings(fp16=True, float32_islands=False).precision_constraints is None
    assert (TrtSettings().fp16, TrtSettings().tf32) == (False, False)


# ---- the Polygraphy loader chain (constructed, not called) -----------------------------------------------
def test_loader_chain_fp16_with_islands_timing_cache_and_saved_engine(tmp_path):
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, PostprocessNetwork, SaveEngine

    model = relu_model(tmp_path / "relu.onnx")
    cache, engine_path = tmp_path / "timing.cache", tmp_path / "relu.engine"
    loader = engine_loader(model, TrtSettings(fp16=True, tf32=True, timing_cache=cache, engine_path=engine_path))
    assert isinstance(loader, SaveEngine) and loader.path == str(engine_path)
    build = loader._engine
    assert isinstance(build, EngineFromNetwork) and build.timing_cache_path == str(cache)
    config = build._config
    assert isinstance(config, CreateConfig)
    assert (config.fp16, config.tf32, config.precision_constraints) == (True, True, "obey")
    assert config.timing_cache_path is None  # no cache file yet: start empty, save after the build
    network = build._network
    assert isinstance(network, PostprocessNetwork) and network._func is keep_float32
    assert isinstance(network._network, NetworkFromOnnxPath) and network._network.path == str(model)

    cache.write_bytes(b"")  # a cache from an earlier build is read first
    loader = engine_loader(model, TrtSettings(fp16=True, timing_cache=cache))
    assert isinstance(loader, EngineFromNetwork) and loader._config.timing_cache_path == str(cache)
    assert not engine_path.exists() and cache.read_bytes() == b""  # constructing builds nothing


def test_loader_chain_strict_float32(tmp_path):
    from polygraphy.backend.trt import EngineFromNetwork, NetworkFromOnnxPath

    loader = engine_loader(relu_model(tmp_path / "relu.onnx"))
    assert isinstance(loader, EngineFromNetwork) and isinstance(loader._network, NetworkFromOnnxPath)
    assert (loader._config.fp16, loader._config.tf32, loader._config.precision_constraints) == (False, False, None)
    assert loader.timing_cache_path is None


def test_profile_for_a_dynamic_batch(tmp_path):
    assert _profiles(str(relu_model(tmp_path / "static.onnx")), 8) is None
    (profile,) = _profiles(str(relu_model(tmp_path / "dynamic.onnx", batch="batch")), 8)
    shapes = profile["x"]
    assert (tuple(shapes.min), tuple(shapes.opt), tuple(shapes.max)) == ((1, 3, 4, 4), (1, 3, 4, 4), (8, 3, 4, 4))


def test_runner_is_named_by_precision_and_builds_once(tmp_path):
    model = relu_model(tmp_path / "relu.onnx")
    assert trt_runner(model).name == "tensorrt"
    assert trt_runner(model, TrtSettings(fp16=True)).name == "tensorrt-fp16"
    calls = []
    once = BuildOnce(lambda: calls.append(1) or object())
    assert once() is once() and calls == [1]


# ---- engines (TensorRT and a CUDA device) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A tiny table-mode lowering (built only where the engine tests run)."""
    import onnx

    from fxpass.checkpoint import init_model
    from fxpass.config import CAMUS
    from fxpass.pipeline import lower

    cfg = CAMUS.replace(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16", num_heads=2,
                        diffusion_steps=100, timestep_respacing="10")
    path = tmp_path_factory.mktemp("trt") / "tiny.onnx"
    onnx.save(lower(init_model(cfg, seed=0), config=cfg), str(path))
    return path


def _feeds(n: int = 3):
    from fxpass.inputs import InputSpec, seeded_feeds

    specs = [InputSpec("x", "float32", (1, 3, 32, 32)), InputSpec("t_index", "int64", (1,))]
    return seeded_feeds(specs, seed=0, timesteps=list(range(n)), model_timesteps=list(range(n)),
                        t_indices=list(range(n))).feeds


@pytest.mark.trt
@pytest.mark.skipif(REASON is not None, reason=f"TensorRT unavailable: {REASON}")
def test_fp32_engine_matches_onnxruntime_and_saves_engine_and_timing_cache(tmp_path, tiny_onnx):
    from targets.compare import TOLERANCES, compare, run_runners
    from targets.ort import ort_runner

    settings = TrtSettings(timing_cache=tmp_path / "timing.cache", engine_path=tmp_path / "tiny.engine")
    results = run_runners([ort_runner(str(tiny_onnx), cuda=False), trt_runner(tiny_onnx, settings)], _feeds())
    (pair,) = compare(results, reference="onnxrt-cpu", atol_scale=TOLERANCES["fp32"][0])
    assert pair.passed, pair
    assert (tmp_path / "tiny.engine").stat().st_size > 0
    assert (tmp_path / "timing.cache").stat().st_size > 0


@pytest.mark.trt
@pytest.mark.skipif(REASON is not None, reason=f"TensorRT unavailable: {REASON}")
def test_fp16_engine_keeps_normalization_and_softmax_in_float32(tiny_onnx):
    import tensorrt as trt
    from polygraphy.backend.trt import NetworkFromOnnxPath

    from targets.compare import TOLERANCES, compare, run_runners
    from targets.ort import ort_runner

    builder, network, parser = NetworkFromOnnxPath(str(tiny_onnx))()
    pinned = keep_float32(network)
    types = {layer.name: layer.type for layer in network}
    assert {types[name] for name in pinned} == {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX}
    assert all(layer.precision == trt.float32 for layer in network if layer.name in pinned)

    runner = trt_runner(tiny_onnx, TrtSettings(fp16=True, tf32=True))
    results = run_runners([ort_runner(str(tiny_onnx), cuda=False), runner], _feeds())
    (pair,) = compare(results, reference="onnxrt-cpu", atol_scale=TOLERANCES["fp16"][0])
    assert pair.passed, pair
