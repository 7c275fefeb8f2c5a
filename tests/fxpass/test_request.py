"""The lowering request: one frozen object built by the CLI or the API, passed whole through the stages
and recorded whole in the report and the metadata."""

from __future__ import annotations

import dataclasses
import json

import onnx
import pytest

from fxpass import metadata
from fxpass.cli import build_parser
from fxpass.cli.lower import request_from
from fxpass.errors import FxpassError
from fxpass.pipeline import STAGES
from fxpass.request import Check, LowerRequest, Output, Rewrite, Source


def test_of_puts_each_keyword_in_the_group_that_owns_it():
    req = LowerRequest.of(precision="fp16", path="m.onnx", verify=False, timestep_input="t", opset=20)
    assert req.rewrite == Rewrite(precision="fp16", opset=20)
    assert req.output == Output(path="m.onnx")
    assert req.check == Check(verify=False)
    assert req.source == Source(timestep_input="t")


def test_the_old_keyword_names_still_reach_their_fields():
    req = LowerRequest.of(report_path="r.json", model_inputs=("low_res=1,3,8,8",))
    assert req.output.report == "r.json" and req.source.inputs == ("low_res=1,3,8,8",)


def test_unknown_option_is_refused_by_name():
    with pytest.raises(TypeError, match="'precisoin' is not one of"):
        LowerRequest.of(precisoin="fp16")


def test_request_is_frozen_and_replace_makes_a_changed_copy():
    req = LowerRequest.of(precision="fp16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.rewrite.precision = "fp32"
    changed = req.replace(opset=20)
    assert (req.rewrite.opset, changed.rewrite.opset, changed.rewrite.precision) == (21, 20, "fp16")


@pytest.mark.parametrize(("options", "message"), [
    ({"precision": "fp8"}, "--precision fp8: expected fp32, fp16, bf16, int8"),
    ({"group_norm": "some"}, "--group-norm some: expected auto or all or keep"),
    ({"format": "tgz"}, "--format tgz: expected one of onnx, ort, pte, mlpackage, tflite"),
    ({"precision": "int8", "step_graph": True}, "--precision int8: its plan is measured"),
    ({"precision": "int8", "format": "pte"}, "written as --format onnx or ort"),
    ({"palettize_bits": 6}, "--palettize-bits 6: applies to --format mlpackage only"),
    ({"opset": 5}, "--opset 5: supported opsets are"),
])
def test_validate_refuses_in_one_line(options, message):
    with pytest.raises(FxpassError, match=message.replace("(", r"\(")):
        LowerRequest.of(**options).validate()


def test_validate_accepts_the_defaults():
    LowerRequest().validate()


def test_to_dict_is_json_and_portable_leaves_out_paths(small_cfg):
    from fxpass.precision import Int8Options

    req = LowerRequest.of(checkpoint="/home/me/m.pt", config=small_cfg, path="/tmp/o.onnx", report="/tmp/r.json",
                          protected=("/tmp/c.yml",), timesteps=(999, 500), surgery_options={"a": {"b": 1}},
                          precision="int8", int8=Int8Options(calibration_data="/tmp/img", plan="/tmp/p.json"))
    whole = json.loads(json.dumps(req.to_dict()))
    assert whole["source"]["checkpoint"] == "/home/me/m.pt" and whole["output"]["path"] == "/tmp/o.onnx"
    assert whole["source"]["config"] == small_cfg.to_dict() and whole["rewrite"]["timesteps"] == [999, 500]
    portable = json.dumps(req.to_dict(portable=True))
    assert "/home/me" not in portable and "/tmp/" not in portable
    assert whole["rewrite"]["int8"]["error_budget"] == 0.05 and whole["rewrite"]["int8"]["plan"] == "/tmp/p.json"
    assert json.loads(portable)["rewrite"]["int8"] == {k: v for k, v in whole["rewrite"]["int8"].items()
                                                       if k not in ("calibration_data", "plan")}


def test_cli_flags_build_the_request_the_api_would(tiny_ckpt, tmp_path):
    args = build_parser().parse_args(["lower", str(tiny_ckpt), "-o", str(tmp_path / "m.onnx"), "--precision", "fp16",
                                      "--group-norm", "keep", "--opset", "20", "--simplifier", "none",
                                      "--report", str(tmp_path / "r.json")])
    req = request_from(args)
    api = LowerRequest.of(checkpoint=str(tiny_ckpt), config=req.source.config, precision="fp16", group_norm="keep",
                          opset=20, simplifier=None, path=str(tmp_path / "m.onnx"), report=str(tmp_path / "r.json"),
                          protected=(None, None, None))  # --config, --precision-plan, --calibration-data
    assert req == api


def test_stages_are_data_in_pipeline_order():
    assert [s.name for s in STAGES] == ["load", "capture", "passes", "export", "surgery", "precision", "verify",
                                        "cut", "write"]


def test_report_and_metadata_record_the_request(small_ckpt, small_cfg, tmp_path, one_thread):
    from fxpass.pipeline import run

    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    req = LowerRequest.of(checkpoint=small_ckpt, config=small_cfg, path=out, report=rep, verify=False)
    lowered = run(req)
    assert lowered.request is req
    report = json.loads(rep.read_text())
    assert report["request"] == json.loads(json.dumps(req.to_dict()))
    assert set(report["stages_s"]) == {"load", "capture", "passes", "export", "surgery", "write"}  # no precision, verify
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert json.loads(props[metadata.REQUEST]) == req.to_dict(portable=True)
    assert metadata.parse(props).request == req.to_dict(portable=True)
