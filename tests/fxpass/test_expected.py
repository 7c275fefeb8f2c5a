"""``fxpass check`` holds a file to the precision the user asks for, never to its own label (issue #26):
relabelled files, loosened golden manifests, structure before numbers, a bf16 file's float32 rows."""

from __future__ import annotations

import json
import math
import shutil

import onnx
import pytest
from check_helpers import cli, lower_on_one_thread, scale_output_conv_weight
from onnx import TensorProto, helper

from fxpass import metadata
from fxpass.errors import FxpassError
from fxpass.expected import asked_precision, golden_tolerance, row_tolerance, structure_problem
from fxpass.metadata import graph_facts


def _graph(*ops: str, half: bool = False) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    nodes, name = [], "x"
    for i, op in enumerate(ops):
        nodes.append(helper.make_node(op, [name], [f"t{i}"]))
        name = f"t{i}"
    inits = [helper.make_tensor("w", TensorProto.FLOAT16 if half else TensorProto.FLOAT, [1], [0])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info(name, 1, [1])],
                                               inits))


@pytest.mark.parametrize("model, precision, problem", [
    (_graph("Relu"), "int8", "no QuantizeLinear/DequantizeLinear pairs"),
    (_graph("QuantizeLinear", "DequantizeLinear"), "int8", None),
    (_graph("Relu"), "fp16", "no float16 weights or casts"),
    (_graph("Relu", half=True), "fp16", None),
    (_graph("Relu"), "fp32", None),
    (_graph("Relu"), "bf16", None),
    (_graph("QuantizeLinear", "DequantizeLinear"), "fp32", "QuantizeLinear/DequantizeLinear: it is not a float32"),
    (_graph("Relu", half=True), "bf16", "float16 weights or casts: it is not a float32"),
])
def test_structure_matches_the_precision(model, precision, problem):
    found = structure_problem(*graph_facts(model), precision)
    assert (found is None) if problem is None else (problem in found)


class _Info:
    def __init__(self, precision):
        self.precision, self.path = precision, "m.onnx"


def test_the_precision_comes_from_the_user_never_the_file(tmp_path):
    assert asked_precision(_Info("fp32"), None) == "fp32"
    assert asked_precision(_Info("int8"), "int8") == "int8"
    with pytest.raises(FxpassError, match="metadata says int8; check holds a file to the precision you ask for") as e:
        asked_precision(_Info("int8"), None)
    assert e.value.exit_code == 2
    with pytest.raises(FxpassError, match="metadata says int8, --precision says fp32: not the file") as e:
        asked_precision(_Info("int8"), "fp32")
    assert e.value.exit_code == 1
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"precision": "fp16"}))
    assert asked_precision(_Info("fp16"), None, report) == "fp16"
    report.write_text("[]")
    with pytest.raises(FxpassError, match="not a lowering report of fxpass lower"):
        asked_precision(_Info("fp16"), None, report)


def test_a_bf16_file_runs_in_float32_everywhere_but_openvino_bf16():
    assert row_tolerance("bf16", "onnxrt-cpu") == "fp32"
    assert row_tolerance("bf16", "openvino-cpu-f32") == "fp32"
    assert row_tolerance("bf16", "openvino-cpu-bf16") == "bf16"
    assert row_tolerance("int8", "onnxrt-cpu") == "int8"


@pytest.mark.parametrize("entry, message", [
    ({"atol_scale": math.nan}, "atol_scale is nan"),
    ({"atol_scale": math.inf}, "atol_scale is inf"),
    ({"atol_scale": 0}, "atol_scale is 0"),
    ({"atol_scale": -1}, "atol_scale is -1"),
    ({"atol_scale": 1e-4, "rtol": -0.5}, "rtol is -0.5"),
    ({"atol_scale": "1e9"}, "atol_scale is '1e9'"),
    ({"atol_scale": 1e-4, "precision": "int8"}, "must hold atol_scale, rtol"),
    ("loose", "must hold atol_scale, rtol"),
])
def test_a_golden_manifest_tolerance_is_validated(entry, message):
    with pytest.raises(FxpassError, match=message):
        golden_tolerance({"tolerances": {"fp32": entry}}, "fp32", (1e-4, 0.0), trust=False, source="g")


def test_a_golden_manifest_cannot_loosen_the_bound_unless_trusted():
    manifest = {"tolerances": {"fp32": {"atol_scale": 1e9, "rtol": 1e9}}}
    bound, note = golden_tolerance(manifest, "fp32", (1e-4, 0.0), trust=False, source="g")
    assert bound == (1e-4, 0.0) and "checked at the precision's own (--trust-golden-tolerance" in note
    bound, note = golden_tolerance(manifest, "fp32", (1e-4, 0.0), trust=True, source="g")
    assert bound == (1e9, 1e9) and "used because of --trust-golden-tolerance" in note
    tighter = {"tolerances": {"fp32": {"atol_scale": 1e-5, "rtol": 0}}}
    assert golden_tolerance(tighter, "fp32", (1e-4, 0.0), trust=False, source="g") == ((1e-5, 0.0), None)


# ---- on the tiny lowered model ---------------------------------------------------------------------------
def _relabelled(tmp_path, tiny_onnx, precision: str, factor: float):
    model = onnx.load(str(tiny_onnx))
    scale_output_conv_weight(model, factor)
    metadata.write_props(model, {metadata.PRECISION: precision})
    path = tmp_path / f"relabelled-{precision}.onnx"
    onnx.save(model, str(path))
    return path


def test_a_float32_file_relabelled_int8_fails(capsys, tmp_path, tiny_onnx, tiny_ckpt):
    path = _relabelled(tmp_path, tiny_onnx, "int8", 1.15)
    rc, _, err = cli(capsys, "check", path, "--model", tiny_ckpt)
    assert rc == 2 and "metadata says int8; check holds a file to the precision you ask for" in err
    rc, _, err = cli(capsys, "check", path, "--model", tiny_ckpt, "--precision", "int8")
    assert rc == 1 and "checked as int8, but its graph has no QuantizeLinear/DequantizeLinear" in err
    rc, _, err = cli(capsys, "check", path, "--model", tiny_ckpt, "--precision", "fp32")
    assert rc == 1 and "metadata says int8, --precision says fp32" in err


def test_a_float32_file_relabelled_bf16_fails_at_float32s_bound(capsys, tmp_path, tiny_onnx, tiny_ckpt):
    path = _relabelled(tmp_path, tiny_onnx, "bf16", 1.05)  # 5% off: inside bf16's 7e-2, far outside fp32's 1e-4
    rc, out, err = cli(capsys, "check", path, "--model", tiny_ckpt, "--precision", "bf16", "--targets", "torch,ort")
    assert rc == 1 and "not the float32 graph of" in err  # its weights are not the model's: before any number


def test_the_correct_file_passes_and_a_relabelled_golden_run_fails(capsys, tmp_path, tiny_onnx, tiny_ckpt):
    rc, _, err = cli(capsys, "check", tiny_onnx, "--model", tiny_ckpt, "--precision", "fp32")
    assert rc == 0, err
    path = _relabelled(tmp_path, tiny_onnx, "int8", 1.15)
    rc, _, err = cli(capsys, "golden", tiny_ckpt, "-o", tmp_path / "g", "--onnx", path, "--precision", "int8")
    assert rc == 1 and "checked as int8, but its graph has no QuantizeLinear" in err
    assert not (tmp_path / "g").exists()


def test_a_loosened_golden_manifest_does_not_pass_a_wrong_model(capsys, tmp_path, tiny_golden, tiny_onnx_perturbed):
    loose = tmp_path / "loose"
    shutil.copytree(tiny_golden, loose)
    manifest = json.loads((loose / "manifest.json").read_text())
    manifest["tolerances"] = {"fp32": {"atol_scale": 1e9, "rtol": 0.0}}
    (loose / "manifest.json").write_text(json.dumps(manifest))
    rc, out, _ = cli(capsys, "check", tiny_onnx_perturbed, "--golden", loose)
    assert rc == 1 and "checked at the precision's own" in " ".join(out.split())
    rc, out, _ = cli(capsys, "check", tiny_onnx_perturbed, "--golden", loose, "--trust-golden-tolerance")
    assert rc == 0 and "used because of --trust-golden-tolerance" in " ".join(out.split())
    manifest["tolerances"] = {"fp32": {"atol_scale": float("nan")}}
    (loose / "manifest.json").write_text(json.dumps(manifest))
    rc, _, err = cli(capsys, "check", tiny_onnx_perturbed, "--golden", loose)
    assert rc == 2 and "tolerances.fp32.atol_scale is nan" in err


@pytest.mark.parametrize("how", ["mul_", "add_", "data.mul_"])
def test_a_model_that_writes_into_its_input_is_checked_on_the_input_it_was_given(tmp_path, how):
    """The eager reference runs on a copy of each feed: were it the feed itself, an in-place op would hand
    the runtime the mutated input and hide whatever the capture did with the mutation."""
    import numpy as np
    from user_models import InPlaceInput

    from targets.torch_ref import TorchReferenceRunner

    runner = TorchReferenceRunner(InPlaceInput(how).eval(), timesteps=list(range(10)))
    feed = {"x": np.ones((1, 3, 8, 8), np.float32), "t_index": np.array([3])}
    with runner:
        runner.infer(feed)
    assert (feed["x"] == 1).all()


@pytest.mark.parametrize("how", ["mul_", "data.mul_"])
def test_lowering_a_model_that_writes_into_its_input_is_refused_not_passed(tmp_path, how):
    from check_helpers import lower_user_class
    from user_models import InPlaceInput

    code, _, out, report = lower_user_class(tmp_path, "InPlaceInput", InPlaceInput(how), "--image-size", "8",
                                            "--model-kwargs", json.dumps({"how": how}))
    assert code == 1 and not out.exists() and report is None


def test_no_output_may_land_inside_an_input_directory(tmp_path):
    from fxpass.fileio import plan_outputs

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"image")
    (tmp_path / "other").mkdir()
    for target in (data / "a.png", data / "new.json", tmp_path / "other" / ".." / "data" / "x.png"):
        with pytest.raises(FxpassError, match="inside the input directory|is the input file"):
            plan_outputs({"--report": target}, inputs=[data], force=True)
    assert (data / "a.png").read_bytes() == b"image"
    assert plan_outputs({"--report": tmp_path / "r.json"}, inputs=[data])["--report"] == tmp_path / "r.json"


def test_check_report_over_a_golden_manifest_is_refused(capsys, tiny_golden, tiny_onnx):
    manifest = tiny_golden / "manifest.json"
    before = manifest.read_bytes()
    rc, _, err = cli(capsys, "check", tiny_onnx, "--golden", tiny_golden, "--report", manifest, "--force")
    assert rc == 2 and "inside the input directory" in err and manifest.read_bytes() == before


def test_lower_output_over_the_precision_plan_is_refused(capsys, tmp_path, tiny_ckpt, tiny_yaml):
    plan = tmp_path / "plan.json"
    text = json.dumps({"version": 1, "float_layers": [], "budget": 0.04, "fingerprint": "f", "layers": 1})
    plan.write_text(text)  # a plan as far as reading it goes (it is read before the lowering)
    rc, _, err = cli(capsys, "lower", tiny_ckpt, "--config", tiny_yaml, "--precision", "int8", "--precision-plan",
                     plan, "--calibrate-on-samples", "-o", tmp_path / "m.onnx", "--report", plan, "--force")
    assert rc == 2 and "is the input file" in err and plan.read_text() == text


@pytest.fixture(scope="module")
def step_graph(tmp_path_factory, tiny_ckpt, tiny_yaml):
    out = tmp_path_factory.mktemp("step") / "step.onnx"
    assert lower_on_one_thread(tiny_ckpt, "--config", tiny_yaml, "-o", out, "--step-graph") == 0
    return out


def test_a_step_graph_is_checkable_and_a_wrong_checkpoint_fails(capsys, tmp_path, step_graph, tiny_ckpt, tiny_yaml):
    rc, out, err = cli(capsys, "check", step_graph, "--model", tiny_ckpt, "--report", tmp_path / "r.json")
    assert rc == 0, err
    assert "step graph, fp32" in out and ": pass" in out
    assert json.loads((tmp_path / "r.json").read_text())["step_graph"]["passed"] is True
    from fxpass.checkpoint import init_model, save_checkpoint
    from fxpass.config import load_config

    other = tmp_path / "other.pt"
    save_checkpoint(init_model(load_config(str(tiny_yaml)), seed=1), other)
    rc, out, _ = cli(capsys, "check", step_graph, "--model", other)
    assert rc == 1 and ": FAIL" in out
    rc, _, err = cli(capsys, "check", step_graph, "--model", tiny_ckpt, "--targets", "torch,ort,openvino")
    assert rc == 2 and "a step graph is checked against the eager model on ONNX Runtime only" in err


@pytest.mark.parametrize("name, line", [("ItemDictKey", "scales[timesteps[0].item()]"),
                                        ("ItemFString", 'key = f"{timesteps[0].item()}"')])
def test_a_timestep_read_as_a_number_for_a_key_or_text_is_refused_not_frozen(tmp_path, capsys, name, line):
    """``.item()`` used as a dict key or formatted into text decides by the example's value: the decision is
    guarded, so a table over every timestep is refused at the line instead of holding one row for all."""
    import user_models
    from check_helpers import lower_user_class

    code, _, out, _ = lower_user_class(tmp_path, name, getattr(user_models, name)(), "--image-size", "8")
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "breaks fxpass guard" in err and line in err


def test_a_model_that_calls_sys_exit_is_an_error_not_a_silent_success(tmp_path, capsys):
    import user_models
    from check_helpers import lower_user_class

    code, _, out, report = lower_user_class(tmp_path, "ExitsInForward", user_models.ExitsInForward(),
                                            "--image-size", "8")
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and report is None
    assert "called sys.exit(0) (the model's own code, or a library it calls); stopped there, nothing written" in err


def test_a_schedule_rewritten_in_the_metadata_is_refused_by_sample_and_check(capsys, tmp_path, tiny_onnx, tiny_ckpt):
    from check_helpers import gray_image_and_half_mask

    from fxpass.diffusion import respaced

    model = onnx.load(str(tiny_onnx))
    props = metadata.read_props(model)
    config = json.loads(props[metadata.CONFIG])
    config["timestep_respacing"] = "20"  # self-consistent metadata for 20 steps; the graph's tables have 10 rows
    kept = respaced(config["diffusion_steps"], "20")
    metadata.write_props(model, {metadata.CONFIG: json.dumps(config), metadata.TIMESTEPS: json.dumps(kept),
                                 metadata.MODEL_TIMESTEPS: json.dumps(kept)})
    path = tmp_path / "rewritten.onnx"
    onnx.save(model, str(path))
    img, mask = gray_image_and_half_mask(tmp_path, 32)
    rc, _, err = cli(capsys, "sample", path, "--image", img, "--mask", mask, "-o", tmp_path / "r.png")
    assert rc == 2 and "lists 20 steps, but the graph's timestep tables have 10 rows" in err
    assert not (tmp_path / "r.png").exists()
    rc, _, err = cli(capsys, "check", path, "--model", tiny_ckpt)
    assert rc == 2 and "lists 20 steps, but the graph's timestep tables have 10 rows" in err
