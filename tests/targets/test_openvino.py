"""targets/openvino.py: why OpenVINO cannot run, the runner on Polygraphy's BaseRunner, f32 and bf16.

The availability logic runs on any machine; the tests that compile models skip with the reason where
OpenVINO (or, for bf16, a CPU with bf16 instructions) is missing.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from polygraphy.datatype import DataType

import targets.openvino as ov_target
from targets.compare import TOLERANCES as COMPARE_TOLERANCES
from targets.compare import compare, run_runners
from targets.openvino import (
    TOLERANCES,
    OpenVinoRunner,
    openvino_runner,
    openvino_unavailable_reason,
    runner_name,
)
from targets.ort import ort_runner

ROOT = Path(__file__).resolve().parents[2]
REASON = openvino_unavailable_reason("f32")
BF16_REASON = openvino_unavailable_reason("bf16")
needs_openvino = pytest.mark.skipif(REASON is not None, reason=f"OpenVINO unavailable: {REASON}")


def tiny_model(path: Path) -> Path:
    """A dynamic-batch graph with two outputs, in an order unlike their names', and an int64 input::

        x[N,4,8,8] ─Conv(3x3)─ GroupNormalization(2) ─ Sigmoid·Mul (SiLU) ─▶ "out"
        x ─ReduceMean─ Softmax ─▶ "aux"          t[N] (int64) ─ Gather(table) ─ Add ─▶ into "out"
    """
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(np.ones(4, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(4, np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal((10, 4, 1, 1)).astype(np.float32), "table"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GroupNormalization", ["c", "gamma", "beta"], ["g"], num_groups=2, epsilon=1e-5),
        helper.make_node("Sigmoid", ["g"], ["s"]),
        helper.make_node("Mul", ["g", "s"], ["h"]),
        helper.make_node("Gather", ["table", "t"], ["row"], axis=0),
        helper.make_node("Add", ["h", "row"], ["out"]),
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
        helper.make_node("Softmax", ["m"], ["aux"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8]),
         helper.make_tensor_value_info("t", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 8, 8]),
         helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def feeds(count: int = 3) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((n, 4, 8, 8), dtype=np.float32), "t": rng.integers(0, 10, n, dtype=np.int64)}
            for n in (1, 2, 3)[:count]]


# ---- availability ----------------------------------------------------------------------------------
def test_reason_when_openvino_is_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an environment without it looks like
    assert openvino_unavailable_reason("f32") == "OpenVINO is not installed (pip install 'fxpass[openvino]')"
    assert openvino_unavailable_reason("bf16") == "OpenVINO is not installed (pip install 'fxpass[openvino]')"


def test_reason_when_openvino_is_installed_but_does_not_load(monkeypatch, tmp_path):
    package = tmp_path / "openvino"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('libopenvino.so.2026: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "openvino", raising=False)
    assert openvino_unavailable_reason() == ("OpenVINO is installed but does not load "
                                             "(libopenvino.so.2026: cannot open shared object file)")


class FakeCore:
    def __init__(self, devices, capabilities):
        self.available_devices = devices
        self.capabilities = capabilities

    def get_property(self, device, key):
        assert (device, key) == ("CPU", "OPTIMIZATION_CAPABILITIES")
        return self.capabilities


def test_bf16_needs_the_cpu_plugins_bf16_capability(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # "installed"
    monkeypatch.setattr(ov_target, "_core", lambda: FakeCore(["CPU"], ["FP32", "INT8", "BIN", "EXPORT_IMPORT"]))
    assert openvino_unavailable_reason("f32") is None
    assert openvino_unavailable_reason("bf16") == ("this CPU has no bf16 support (OpenVINO's CPU plugin reports "
                                                   "FP32, INT8, BIN, EXPORT_IMPORT)")
    monkeypatch.setattr(ov_target, "_core", lambda: FakeCore(["CPU"], ["BF16", "FP32", "INT8"]))
    assert openvino_unavailable_reason("bf16") is None
    monkeypatch.setattr(ov_target, "_core", lambda: FakeCore(["GPU.0"], []))
    assert openvino_unavailable_reason("f32") == "OpenVINO has no CPU device here (devices: GPU.0)"


class BrokenPluginCore:
    """A core whose CPU plugin fails to load: OpenVINO raises when the devices are listed."""

    @property
    def available_devices(self):
        raise RuntimeError("Failed to create plugin libopenvino_intel_cpu_plugin.so\nfrom src/inference/src/core.cpp")


def test_bf16_gives_the_f32_reason_where_openvino_cannot_run_at_all(monkeypatch):
    """Whatever stops f32 stops bf16 too, in the same words (not a "no bf16" hiding the cause)."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # "installed"

    def no_libraries():
        raise OSError("libopenvino.so.2026: cannot open shared object file")

    for core, reason in (
            (no_libraries, "OpenVINO is installed but does not load (libopenvino.so.2026: cannot open shared "
                           "object file)"),
            (BrokenPluginCore, "OpenVINO's CPU plugin does not load (Failed to create plugin "
                               "libopenvino_intel_cpu_plugin.so)"),
            (lambda: FakeCore(["GPU.0"], ["BF16"]), "OpenVINO has no CPU device here (devices: GPU.0)")):
        monkeypatch.setattr(ov_target, "_core", core)
        assert openvino_unavailable_reason("f32") == openvino_unavailable_reason("bf16") == reason


def test_precisions_names_and_tolerances():
    assert (runner_name("f32"), runner_name("fp32"), runner_name("bf16")) == (
        "openvino-cpu-f32", "openvino-cpu-f32", "openvino-cpu-bf16")
    with pytest.raises(ValueError, match="choose f32 or bf16"):
        runner_name("fp16")
    assert TOLERANCES["f32"] == COMPARE_TOLERANCES["fp32"]
    assert COMPARE_TOLERANCES["fp32"][0] < TOLERANCES["bf16"][0]
    runner = openvino_runner("model.onnx", precision="bf16", num_threads=2)  # constructing loads nothing
    assert isinstance(runner, OpenVinoRunner) and runner.name == "openvino-cpu-bf16"
    assert runner.tolerance == TOLERANCES["bf16"]
    assert runner.config() == {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": 2}
    assert openvino_runner("model.onnx").config() == {"INFERENCE_PRECISION_HINT": "f32"}


def test_fxpass_never_imports_openvino():
    offenders = [str(p.relative_to(ROOT)) for p in [*(ROOT / "fxpass").rglob("*.py"), *(ROOT / "targets").rglob("*.py")]
                 if re.search(r"^(import|from)\s+openvino\b", p.read_text(), re.M)]  # module level
    assert offenders == []
    code = ("import sys; from fxpass.cli import build_parser; build_parser(); import fxpass.cli.check, fxpass.verify, "
            "targets.openvino; targets.openvino.openvino_runner('m.onnx'); fxpass.verify.parse_targets('openvino'); "
            "print('openvino' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


# ---- running models ------------------------------------------------------------------------------------
@needs_openvino
def test_f32_matches_onnxruntime_at_the_fp32_tolerance(tmp_path):
    path = tiny_model(tmp_path / "tiny.onnx")
    runner = openvino_runner(path, num_threads=1)
    results = run_runners([ort_runner(str(path), cuda=False), runner], feeds())
    (pair,) = compare(results, reference="onnxrt-cpu", atol_scale=COMPARE_TOLERANCES["fp32"][0])
    assert pair.target == "openvino-cpu-f32"
    assert pair.passed, pair
    assert pair.max_rel_to_scale < 1e-5
    first = results["openvino-cpu-f32"][0]
    assert list(first.keys()) == ["out", "aux"]  # the graph's output names, in its order
    assert first["out"].shape == (1, 4, 8, 8) and first["aux"].shape == (1, 4)


@needs_openvino
def test_input_metadata_and_compiling_once(tmp_path, monkeypatch):
    runner = openvino_runner(tiny_model(tmp_path / "tiny.onnx"))
    with runner:
        meta = runner.get_input_metadata(use_numpy_dtypes=False)
        assert list(meta.keys()) == ["x", "t"]
        assert (meta["x"].dtype, tuple(meta["x"].shape)) == (DataType.FLOAT32, (-1, 4, 8, 8))
        assert (meta["t"].dtype, tuple(meta["t"].shape)) == (DataType.INT64, (-1,))
    monkeypatch.setattr(ov_target, "_core", lambda: pytest.fail("compiled a second time"))
    clock = iter([10.0, 10.25])  # the runner's clock: read before and after the infer request
    monkeypatch.setattr(ov_target, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    with runner:  # a second activation reuses the compiled model
        out = runner.infer(feeds(1)[0])
        assert runner.last_inference_time() == 0.25  # the infer request alone, as Polygraphy reports it
    assert set(out) == {"out", "aux"}


@pytest.mark.skipif(BF16_REASON is not None, reason=f"OpenVINO bf16 unavailable: {BF16_REASON}")
def test_bf16_stays_within_its_tolerance_and_really_is_bf16(tmp_path):
    path = tiny_model(tmp_path / "tiny.onnx")
    runner = openvino_runner(path, precision="bf16", num_threads=1)
    results = run_runners([ort_runner(str(path), cuda=False), runner], feeds())
    (pair,) = compare(results, reference="onnxrt-cpu", atol_scale=TOLERANCES["bf16"][0])
    assert pair.passed, pair
    assert pair.max_rel_to_scale > COMPARE_TOLERANCES["fp32"][0]  # not silently float32
    assert "bfloat16" in str(runner.compiled_model().get_property("INFERENCE_PRECISION_HINT"))
