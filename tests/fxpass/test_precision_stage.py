"""--precision int8 / bf16: the plan search, the int8 stage on a small model, plan reuse, refusals.

The plan search is tested on synthetic oracles (damage additive over layers: exact answers known);
the int8 stage on the tiny random-weight config (structure, determinism, reuse, refusals).  Quality
figures are measured on the trained reference, in test_precision_reference.py.
"""

from __future__ import annotations

import json
from collections import Counter

import onnx
import pytest

from fxpass import metadata
from fxpass.cli import main
from fxpass.errors import FxpassError
from fxpass.precision import Int8Options, PrecisionPlan, layers_of, quantize_int8
from fxpass.precision.layers import Layer, fingerprint, groups_of
from fxpass.precision.plan import Measured, search

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")


# ---- the search, on oracles whose damage is the sum of per-layer costs ----------------------------
def _oracle(costs: dict[str, float], base: float = 0.0):
    layers = [Layer(name, "Conv", "conv", 8) for name in costs]
    calls = Counter()

    def probe(names):
        calls["probe"] += 1
        return sum(costs[n] for n in names)

    def evaluate(floats):
        calls["evaluate"] += 1
        return Measured(base + sum(c for n, c in costs.items() if n not in floats), 0, [])

    return layers, probe, evaluate, calls


def test_search_keeps_nothing_in_float_when_all_int8_fits():
    layers, probe, evaluate, calls = _oracle({f"l{i}": 0.001 for i in range(10)})
    floats, records, measured = search(layers, probe, evaluate, 0.05)
    assert floats == [] and records == [] and measured.damage == pytest.approx(0.01)
    assert calls == {"evaluate": 1}


def test_search_finds_the_smallest_float_set_within_the_budget():
    costs = {f"l{i}": 0.0005 for i in range(32)}
    costs.update({"l3": 0.5, "l17": 0.2, "l30": 0.04, "l9": 0.03})
    layers, probe, evaluate, calls = _oracle(costs)
    floats, records, measured = search(layers, probe, evaluate, 0.05)
    # all int8: 0.784; without l3, l17: 0.084; also without l30: 0.044 <= 0.05 (the smallest such set)
    assert floats == ["l3", "l17", "l30"]
    assert measured.damage == pytest.approx(0.044) and measured.damage <= 0.05
    assert calls["probe"] < len(costs), "group testing probes fewer sets than there are layers"
    assert {tuple(r["layers"]) for r in records} >= {("l3",), ("l17",), ("l30",)}


def test_search_keeps_the_cheaper_float_set_by_measured_cost():
    costs = {f"l{i}": 0.0005 for i in range(28)}
    costs.update({"A": 0.06, "B": 0.03, "C": 0.03, "D": 0.03})
    layers, probe, evaluate, _ = _oracle(costs)
    # all int8: 0.164; by damage alone A first: A and B are needed (0.074 <= 0.08)
    floats, _, measured = search(layers, probe, evaluate, 0.08)
    assert floats == ["A", "B"] and measured.damage == pytest.approx(0.074)
    # A costs ten times B, C or D: B, C and D leave the same damage (0.074) at a quarter of the time
    seconds = {name: 1e-3 for name in costs} | {"A": 1e-2}
    floats, _, measured = search(layers, probe, evaluate, 0.08, cost=seconds)
    assert floats == ["B", "C", "D"] and measured.damage == pytest.approx(0.074)
    # a cheaper set that leaves more damage than the damage-first one is not taken
    costs.update({"B": 0.025, "C": 0.025, "D": 0.025})  # B, C, D leave 0.074, more than A and B (0.064)
    layers, probe, evaluate, _ = _oracle(costs)
    floats, _, _ = search(layers, probe, evaluate, 0.08, cost=seconds)
    assert floats[0] == "A"


def test_search_lowers_its_threshold_when_small_damages_add_up():
    costs = {f"l{i}": 0.004 for i in range(32)}  # each below budget/4 alone, 0.128 together
    layers, probe, evaluate, _ = _oracle(costs)
    floats, _, measured = search(layers, probe, evaluate, 0.05)
    assert measured.damage <= 0.05 and 0 < len(floats) < 32


def test_search_refuses_an_unreachable_budget():
    layers, probe, evaluate, _ = _oracle({f"l{i}": 0.2 for i in range(8)}, base=0.1)
    with pytest.raises(FxpassError, match="no precision plan keeps the eps-MSE ratio within 1.05") as info:
        search(layers, probe, evaluate, 0.05)
    assert info.value.exit_code == 1


def test_groups_are_by_role_and_size():
    layers = [Layer("a", "Conv", "conv", 8), Layer("b", "Conv", "conv", 16), Layer("c", "Conv", "conv", 8),
              Layer("d", "MatMul", "attention matmul", 64)]
    assert groups_of(layers) == [["a", "c"], ["b"], ["d"]]
    assert fingerprint(layers) != fingerprint(layers[:3])


# ---- the int8 stage on the tiny config ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_int8(tiny_onnx):
    proto = onnx.load(str(tiny_onnx))
    quantized, info = quantize_int8(proto, options=Int8Options(self_calibration=True, calibration_steps=3,
                                                               calibration_samples=2,
                                                               eval_samples=1, threads=1))
    return proto, quantized, info


def test_layer_costs_are_measured_for_every_layer(tiny_onnx, tiny_int8):
    import numpy as np

    from fxpass.precision.cost import layer_costs

    names = [layer.name for layer in layers_of(onnx.load(str(tiny_onnx)))]
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    costs = layer_costs(tiny_onnx, [{"x": x, "t_index": np.array([3])}], names)
    assert set(costs) == set(names) and all(0 < c < 1 for c in costs.values())
    assert layer_costs(tiny_onnx, [{"x": x, "t_index": np.array([3])}], ["no such layer"]) == {"no such layer": 0.0}
    _, _, info = tiny_int8
    assert info["layer_costs"]["float32_s_per_call"] > 0
    share = info["plan"]["measured"]["float_cost_share"]
    assert share is not None and 0 <= share <= 1


def _float_inputs_of(proto: onnx.ModelProto) -> dict[str, bool]:
    """Per Conv/MatMul: True where its first input comes from a DequantizeLinear (it runs in int8)."""
    producer = {o: n.op_type for n in proto.graph.node for o in n.output}
    return {n.name: producer.get(n.input[0]) == "DequantizeLinear"
            for n in proto.graph.node if n.op_type in ("Conv", "MatMul")}


def test_int8_structure_metadata_and_plan(tiny_int8):
    proto, quantized, info = tiny_int8
    ops = Counter(n.op_type for n in quantized.graph.node)
    layers = layers_of(proto)
    plan = info["plan"]
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]  # weights: DQ only
    assert ops["Conv"] == Counter(n.op_type for n in proto.graph.node)["Conv"]
    props = metadata.read_props(quantized)
    assert props[metadata.PRECISION] == "int8"
    def ours(p):  # ORT's quantizer adds its own key (onnx.infer); fxpass's keys carry over
        return {k: v for k, v in p.items() if k.startswith("fxpass.") and k != metadata.PRECISION}

    assert ours(props) == ours(metadata.read_props(proto)) and len(ours(props)) >= 4
    assert plan["layers"] == len(layers) and plan["fingerprint"] == fingerprint(layers)
    assert plan["measured"]["damage"] <= plan["budget"] == 0.05
    assert [r["t_index"] for r in plan["measured"]["ratios"]] == [0, 2, 4, 7, 9]  # spread over the 10 steps
    assert plan["calibration"]["steps"] == [0, 4, 9] and plan["calibration"]["feeds"] == 6
    runs = _float_inputs_of(quantized)
    assert all(not runs[n] for n in plan["float_layers"])
    assert sum(runs.values()) == len(layers) - len(plan["float_layers"])


def test_int8_is_deterministic(tiny_onnx, tiny_int8):
    _, quantized, _ = tiny_int8
    again, _ = quantize_int8(onnx.load(str(tiny_onnx)), options=Int8Options(
        calibration_steps=3, calibration_samples=2, eval_samples=1, threads=1, self_calibration=True))
    assert again.SerializeToString() == quantized.SerializeToString()


def test_a_reused_plan_keeps_its_float_layers(tiny_onnx, tiny_int8, tmp_path):
    proto, _, info = tiny_int8
    layers = layers_of(proto)
    plan = PrecisionPlan.from_dict(info["plan"], "plan")
    plan.float_layers = [layers[0].name, layers[-1].name]  # a plan that keeps the first and last in float
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"precision_plan": plan.to_dict()}))  # a report holding it works as well
    quantized, again = quantize_int8(proto, options=Int8Options(calibration_steps=3, calibration_samples=2,
                                                                eval_samples=1, plan=path, threads=1,
                                                                self_calibration=True))
    assert again["reused_plan"] and again["plan"]["float_layers"] == plan.float_layers
    assert again["variants_tried"] == 3  # calibration, the evaluation of the plan, the written model
    runs = _float_inputs_of(quantized)
    assert not runs[layers[0].name] and not runs[layers[-1].name] and runs[layers[1].name]


def test_a_plan_for_another_graph_is_refused(tiny_onnx, tiny_int8, tmp_path):
    proto, _, info = tiny_int8
    plan = dict(info["plan"], fingerprint="0" * 16, float_layers=["node_conv_not_here"])
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    with pytest.raises(FxpassError, match=r"plan.json: precision plan does not fit this model \(its layers "
                                          r"node_conv_not_here are not in this graph\)"):
        quantize_int8(proto, options=Int8Options(plan=path, self_calibration=True))


@pytest.mark.parametrize("text, why", [("[1, 2]", "not a precision plan"), ("{\"version\": 7}", "version 7"),
                                       ("{nope", "not JSON"),
                                       ("{\"version\": 1, \"float_layers\": \"a\"}", "must be a list")])
def test_broken_plan_files_are_one_line_errors(tmp_path, text, why):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(FxpassError, match=why):
        PrecisionPlan.load(path)


def test_int8_of_an_int8_model_is_refused(tiny_int8):
    _, quantized, _ = tiny_int8
    with pytest.raises(FxpassError, match="the model is int8 already"):
        quantize_int8(quantized)


@pytest.mark.parametrize("options, message", [
    (dict(calibration_steps=0), "--calibration-steps 0"), (dict(eval_samples=True), "--eval-samples True"),
    (dict(error_budget=0), "--error-budget 0"), (dict(error_budget=float("nan")), "--error-budget nan")])
def test_bad_options_are_refused(tiny_onnx, options, message):
    with pytest.raises(FxpassError, match=message):
        quantize_int8(onnx.load(str(tiny_onnx)), options=Int8Options(**options))


def test_calibration_data_needs_enough_images(tiny_onnx, tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    with pytest.raises(FxpassError, match=r"3 images; int8 needs 8 \(4 to calibrate, 4 to evaluate"):
        quantize_int8(onnx.load(str(tiny_onnx)), options=Int8Options(calibration_data=tmp_path))


# ---- through the CLI ------------------------------------------------------------------------------
def test_cli_int8_flags_need_int8(tiny_ckpt, tiny_yaml, tmp_path, capsys):
    code = main(["lower", str(tiny_ckpt), "--config", str(tiny_yaml), "-o", str(tmp_path / "m.onnx"),
                 "--precision-plan", str(tmp_path / "p.json")])
    assert code == 2 and "--precision-plan applies to --precision int8 only" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("extra, message", [
    (["--step-graph"], "--precision int8: its plan is measured on the U-Net along the schedule, so it is written "
                       "as the table-mode graph (not --step-graph)"),
    (["--format", "pte"], "--precision int8: ONNX Runtime's QDQ model, written as --format onnx or ort (not pte"),
    (["--format", "mlpackage"], "(not mlpackage; for a smaller Core ML package use --palettize-bits)"),
    (["--timesteps", "5", "--calibrate-on-samples"], "--precision int8: needs the respaced schedule in one graph"),
    (["--calibration-data", "nowhere"], "nowhere: --calibration-data needs a directory of images"),
    (["--error-budget", "-1"], "--error-budget -1.0: expected a number above 0"),
    ([], "--precision int8 needs images to calibrate on and to judge its plan by: --calibration-data DIR"),
    (["--calibration-data", ".", "--calibrate-on-samples"], "give one of them")])
def test_cli_int8_refusals(tiny_ckpt, tiny_yaml, tmp_path, capsys, extra, message):
    code = main(["lower", str(tiny_ckpt), "--config", str(tiny_yaml), "-o", str(tmp_path / "m.onnx"),
                 "--precision", "int8", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_cli_int8_writes_the_plan_and_reuses_it(tiny_ckpt, tiny_yaml, tmp_path, capsys):
    first, report = tmp_path / "a.onnx", tmp_path / "a.json"
    args = ["lower", str(tiny_ckpt), "--config", str(tiny_yaml), "--precision", "int8", "--calibrate-on-samples",
            "--calibration-steps", "3",
            "--calibration-samples", "2", "--eval-samples", "1"]
    assert main([*args, "-o", str(first), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    written = json.loads(report.read_text())
    assert "int8 plan" in out and "layers int8" in out  # the plan's lines (rich wraps them in the table)
    assert written["int8"]["plan_lines"][-1].startswith("eps-MSE ratio to float32 (+ its standard error) at most")
    assert written["precision"] == "int8" and written["check"]["passed"]
    assert written["check"]["tolerance"]["atol_scale"] == 0.2
    # 7-bit weights where ORT's kernels here saturate 8-bit ones (x86 without VNNI), else 8-bit
    from onnx import numpy_helper

    from fxpass.precision.int8 import weights_saturate_here

    bits = 7 if weights_saturate_here() else 8
    assert written["int8"]["weight_bits"] == bits
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(first)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8]
    peak = max(int(abs(w.astype(int)).max()) for w in weights)
    assert peak <= 2 ** (bits - 1) and (bits == 7 or peak > 64), peak
    assert main([*args, "-o", str(tmp_path / "b.onnx"), "--precision-plan", str(report)]) == 0
    assert "int8 plan (reused)" in capsys.readouterr().out
    assert (tmp_path / "b.onnx").read_bytes() == first.read_bytes()


def test_cli_bf16_unavailable_exits_3(tiny_ckpt, tiny_yaml, tmp_path, capsys, monkeypatch):
    import targets.openvino

    monkeypatch.setattr(targets.openvino, "openvino_unavailable_reason", lambda precision="f32": "no bf16 here")
    code = main(["lower", str(tiny_ckpt), "--config", str(tiny_yaml), "-o", str(tmp_path / "m.onnx"),
                 "--precision", "bf16"])
    assert code == 3 and "unavailable: --precision bf16: no bf16 here" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_bf16_is_checked_on_openvino(tiny_ckpt, tiny_yaml, tmp_path, capsys):
    from targets.openvino import openvino_unavailable_reason

    reason = openvino_unavailable_reason("bf16")
    if reason:
        pytest.skip(f"OpenVINO bf16 unavailable: {reason}")
    report = tmp_path / "r.json"
    assert main(["lower", str(tiny_ckpt), "--config", str(tiny_yaml), "-o", str(tmp_path / "m.onnx"),
                 "--precision", "bf16", "--report", str(report)]) == 0
    assert "OpenVINO bf16 latency" in capsys.readouterr().out
    written = json.loads(report.read_text())
    check = written["check"]
    assert check["runtime"] == "openvino-cpu-bf16" and check["passed"]
    # bf16 really ran: float32 would be within 1e-5 of eager; the bound is OpenVINO's bf16 tolerance
    assert 1e-4 < check["max_rel_to_scale"] <= 7e-2
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert metadata.read_props(model)[metadata.PRECISION] == "bf16"
    assert {i.data_type for i in model.graph.initializer} <= {onnx.TensorProto.FLOAT,
                                                                             onnx.TensorProto.INT64}


# ---- 8-bit weights saturate in ONNX Runtime's x86 kernels without VNNI --------------------------------
@pytest.mark.parametrize("flags, saturates", [
    ("flags : fpu sse2 avx avx2 fma", True),  # AVX2 only: u8s8 pairs add into int16 and saturate
    ("flags : avx2 avx512f avx512bw", True),  # AVX-512 without VNNI: the same
    ("flags : avx2 avx512f avx512_vnni avx512_bf16", False),
    ("flags : avx2 avx_vnni", False)])
def test_weights_saturate_without_vnni(flags, saturates):
    from fxpass.precision.int8 import resolve_reduce_range, weights_saturate_here

    assert weights_saturate_here(flags) is saturates
    assert resolve_reduce_range("on") is True and resolve_reduce_range("off") is False
    assert resolve_reduce_range("auto") is weights_saturate_here()


def test_reduce_range_is_an_option_with_a_checked_value():
    with pytest.raises(FxpassError, match="--reduce-range 'maybe': expected auto, on, off"):
        Int8Options(reduce_range="maybe").check()


@pytest.mark.parametrize("extra", [["--format", "ort"], ["--step-graph"]])
def test_cli_bf16_is_table_mode_onnx_only(tiny_ckpt, tiny_yaml, tmp_path, capsys, extra):
    out = tmp_path / ("m.ort" if "ort" in extra else "m.onnx")
    code = main(["lower", str(tiny_ckpt), "--config", str(tiny_yaml), "-o", str(out), "--precision", "bf16", *extra])
    err = capsys.readouterr().err
    assert code == 2 and "--precision bf16: an OpenVINO inference precision for the table-mode ONNX model" in err
    assert "use --precision fp16 for the mobile formats" in err and not out.exists()


def test_an_int8_graph_cuts_into_a_deep_cache_pair(tiny_int8):
    from fxpass.deep_cache import CUT_TOLERANCE, cut

    _, quantized, _ = tiny_int8
    full, shallow, report = cut(quantized, 1)
    assert report["check"]["passed"] and report["check"]["max_rel_to_scale"] <= CUT_TOLERANCE
    assert report["nodes"]["shallow"] < report["nodes"]["full"] / 4
    assert metadata.read_props(full)[metadata.PRECISION] == "int8"
