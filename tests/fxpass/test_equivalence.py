"""fxpass.equivalence: a reduced-precision file is the float32 graph of the model it is checked against plus
quantization and casts, or it fails before any number (issue #26).

On the tiny config: fp16 and int8 of the true checkpoint match its float32 graph; the same precisions of a
checkpoint with one ResBlock's timestep scale/shift zeroed, of another seed, or of a graph with a node added,
rewired or a constant nudged do not; ``fxpass check`` and the precision stage apply it.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from check_helpers import cli, lower_on_one_thread
from conftest import TINY

from fxpass import metadata
from fxpass.checkpoint import init_model, load_model, save_checkpoint
from fxpass.config import from_dict
from fxpass.equivalence import compare, float_view
from fxpass.pipeline import lower
from fxpass.precision import Int8Options, quantize_int8

pytestmark = pytest.mark.usefixtures("one_torch_thread_module")
INT8 = Int8Options(self_calibration=True, calibration_steps=3, calibration_samples=2, eval_samples=1, threads=1)


def _zeroed_scale_shift(model: torch.nn.Module) -> torch.nn.Module:
    name = next(n for n, _ in model.named_parameters() if "emb_layers" in n and n.endswith("weight"))
    with torch.no_grad():
        model.get_parameter(name).zero_()
    return model


class _Graphs(dict):
    """{(checkpoint kind, precision): proto}, each made when first asked for: the true checkpoint and one
    with a zeroed timestep scale/shift, at fp32, fp16 and int8."""

    def __init__(self, ckpt):
        super().__init__()
        self.ckpt, self.cfg = ckpt, from_dict(TINY)

    def __missing__(self, key):
        kind, precision = key
        if precision == "int8":
            value = quantize_int8(self[kind, "fp32"], self.cfg, options=INT8)[0]
        else:
            model = load_model(self.ckpt, self.cfg)
            model = _zeroed_scale_shift(model) if kind == "zeroed" else model
            value = lower(model, config=self.cfg, precision=precision, verify=False)
        self[key] = value
        return value


@pytest.fixture(scope="session")  # one worker builds it (conftest's loadgroup)
def graphs(tiny_ckpt):
    return _Graphs(tiny_ckpt)


PRECISIONS = ["fp32", "fp16", pytest.param("int8", marks=pytest.mark.slow)]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_true_checkpoint_at_every_precision_is_its_float32_graph(graphs, precision):
    assert compare(graphs["true", precision], graphs["true", "fp32"]) is None


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_zeroed_timestep_scale_shift_fails_at_every_precision(graphs, precision):
    problem = compare(graphs["zeroed", precision], graphs["true", "fp32"])
    assert problem is not None and "values are not the float32 graph's" in problem, problem


@pytest.mark.slow
def test_the_float_view_bypasses_quantization_and_casts(graphs):
    view, slack = float_view(graphs["true", "int8"])
    ops = {n.op for n in view.nodes}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"} and slack
    view16, slack16 = float_view(graphs["true", "fp16"])
    assert "Cast" not in {n.op for n in view16.nodes} or "Cast" in {n.op for n in float_view(graphs["true", "fp32"])[0].nodes}
    assert all(t.dtype != "float16" for t in view16.tensors().values() if isinstance(t, gs.Constant))
    again, _ = float_view(gs.export_onnx(view))  # idempotent: a float view is its own float view
    assert [n.op for n in again.nodes] == [n.op for n in view.nodes]


def _edited(proto: onnx.ModelProto, edit) -> onnx.ModelProto:
    graph = gs.import_onnx(proto)
    edit(graph)
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def _add_identity(graph):
    conv = next(n for n in graph.nodes if n.op == "Conv")
    out = conv.outputs[0]
    mid = gs.Variable(out.name + "_pre", dtype=out.dtype)
    conv.outputs = [mid]
    graph.nodes.append(gs.Node("Relu", inputs=[mid], outputs=[out]))


def _swap_inputs(graph):
    node = next(n for n in graph.nodes if n.op == "MatMul" and not any(isinstance(t, gs.Constant) for t in n.inputs))
    node.inputs[0], node.inputs[1] = node.inputs[1], node.inputs[0]


def _nudge_a_weight(graph):
    conv = next(n for n in graph.nodes if n.op == "Conv" and isinstance(n.inputs[1], gs.Constant))
    conv.inputs[1].values = conv.inputs[1].values * 1.001


@pytest.mark.parametrize(("edit", "message"), [
    (_add_identity, "has no counterpart"),
    (_swap_inputs, "has no counterpart"),
    (_nudge_a_weight, "values are not the float32 graph's"),
])
def test_an_added_rewired_or_nudged_graph_fails(graphs, edit, message):
    problem = compare(_edited(graphs["true", "fp16"], edit), graphs["true", "fp32"])
    assert problem is not None and message in problem, problem


@pytest.mark.slow
def test_check_refuses_a_reduced_precision_file_of_another_checkpoint(capsys, tmp_path, graphs, tiny_ckpt):
    for precision in ("fp16", "int8"):
        for kind, code in (("true", 0), ("zeroed", 1)):
            path = tmp_path / f"{kind}-{precision}.onnx"
            onnx.save(graphs[kind, precision], str(path))
            rc, out, err = cli(capsys, "check", path, "--model", tiny_ckpt, "--precision", precision)
            assert rc == code, (kind, precision, err)
            if code:
                line = err.strip().splitlines()[-1]  # after the progress line
                assert line.startswith(f"fxpass: error: {path}: not the float32 graph of {tiny_ckpt}"), err
            else:
                assert f"structure: the float32 graph of {tiny_ckpt}" in out and "check: pass" in out


@pytest.mark.slow
def test_a_step_graph_at_fp16_of_another_seed_fails_structurally(capsys, tmp_path, tiny_ckpt, tiny_yaml):
    out = tmp_path / "step16.onnx"
    assert lower_on_one_thread(tiny_ckpt, "--config", tiny_yaml, "-o", out, "--step-graph", "--precision", "fp16") == 0
    rc, stdout, err = cli(capsys, "check", out, "--model", tiny_ckpt, "--precision", "fp16")
    assert rc == 0 and "structure: the float32 graph" in stdout, err
    other = tmp_path / "other.pt"
    save_checkpoint(init_model(from_dict(TINY), seed=1), other)
    rc, _, err = cli(capsys, "check", out, "--model", other, "--precision", "fp16")
    assert rc == 1 and "not the float32 graph of" in err


def test_the_precision_stage_records_the_structure_check(tiny_ckpt):
    from fxpass.pipeline import lower_with_report

    cfg = from_dict(TINY)
    lowered = lower_with_report(load_model(tiny_ckpt, cfg), config=cfg, precision="fp16", verify=False)
    assert lowered.report["structure"].startswith("the float32 graph with fp16's casts")
    assert metadata.read_props(lowered.model)[metadata.PRECISION] == "fp16"
