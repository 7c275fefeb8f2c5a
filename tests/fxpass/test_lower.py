"""fxpass.lower / `fxpass lower`: export, surgery, the ORT check, atomic writes, the report."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fxpass
from fxpass.checkpoint import init_model, save_checkpoint
from fxpass.cli import main
from fxpass.config import CAMUS
from fxpass.errors import FxpassError
from fxpass.metadata import read_props as get_metadata
from fxpass.schedule import respaced

TINY = CAMUS.replace(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16",
                     diffusion_steps=100, timestep_respacing="10")


def _session(model: onnx.ModelProto):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _rel(out, ref):
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tiny_model():
    return init_model(TINY, seed=0)


@pytest.fixture(scope="module")
def tiny_lowered(tiny_model):
    return fxpass.lower(tiny_model, config=TINY)


def test_table_mode_interface_and_metadata(tiny_lowered):
    model = tiny_lowered
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["x", "t_index"]
    assert [o.name for o in model.graph.output] == ["out"]
    assert model.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64
    meta = get_metadata(model)
    assert json.loads(meta["fxpass.timesteps"]) == respaced(100, "10")
    assert json.loads(meta["fxpass.config"])["diffusion_steps"] == 100
    assert meta["fxpass.mode"] == "table" and meta["fxpass.version"] == fxpass.__version__
    assert dict(o for o in ((op.domain, op.version) for op in model.opset_import))[""] == 21


def test_structure_after_surgery(tiny_lowered):
    ops = Counter(n.op_type for n in tiny_lowered.graph.node)
    assert ops["Einsum"] == 0 and ops["MatMul"] > 0
    assert ops["GroupNormalization"] > 0 and ops["InstanceNormalization"] == 0
    assert not {"If", "Loop", "Assert"} & set(ops)  # nothing left from guards or asserts


@pytest.mark.parametrize("t_index", [0, 1, 5, 8, 9])
def test_ort_matches_eager(tiny_lowered, tiny_model, t_index):
    schedule = respaced(100, "10")
    x = np.random.default_rng(t_index).standard_normal((1, 3, 32, 32), dtype=np.float32)
    out = _session(tiny_lowered).run(None, {"x": x, "t_index": np.array([t_index])})[0]
    with torch.no_grad():
        ref = tiny_model(torch.from_numpy(x), torch.tensor([schedule[t_index]])).numpy()
    assert _rel(out, ref) <= 1e-4


def test_two_runs_give_identical_bytes(tiny_lowered, tiny_model):
    again = fxpass.lower(tiny_model, config=TINY)
    assert again.SerializeToString() == tiny_lowered.SerializeToString()


def test_fixed_mode_has_only_x(tiny_model):
    model = fxpass.lower(tiny_model, config=TINY, timesteps=42)
    assert [i.name for i in model.graph.input] == ["x"]
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        ref = tiny_model(torch.from_numpy(x), torch.tensor([42])).numpy()
    assert _rel(_session(model).run(None, {"x": x})[0], ref) <= 1e-4


def test_dynamic_batch_and_class_conditional():
    cfg = TINY.replace(class_cond=True)
    eager = init_model(cfg, seed=1)
    model = fxpass.lower(eager, config=cfg, dynamic_batch=True)
    assert [i.name for i in model.graph.input] == ["x", "t_index", "y"]
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    t_index, y = np.array([0, 4, 9]), np.array([5, 17, 999])
    out = _session(model).run(None, {"x": x, "t_index": t_index, "y": y})[0]
    schedule = respaced(100, "10")
    with torch.no_grad():
        for row in range(3):
            ref = eager(torch.from_numpy(x[row : row + 1]), torch.tensor([schedule[t_index[row]]]),
                        torch.tensor([y[row]])).numpy()
            assert _rel(out[row : row + 1], ref) <= 1e-4


def test_opset_18_keeps_the_instance_norm_pattern(tiny_model):
    model = fxpass.lower(tiny_model, config=TINY, opset=18)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["GroupNormalization"] == 0 and ops["InstanceNormalization"] > 0 and ops["Einsum"] == 0


def test_fp16_model_keeps_float32_io(tiny_model):
    model = fxpass.lower(tiny_model, config=TINY, precision="fp16")
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    halves = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) > 10
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        ref = tiny_model(torch.from_numpy(x), torch.tensor([respaced(100, "10")[5]])).numpy()
    assert _rel(_session(model).run(None, {"x": x, "t_index": np.array([5])})[0], ref) <= 2e-2


def test_bad_arguments_are_errors(tiny_model):
    with pytest.raises(FxpassError, match="supported opsets are 18"):
        fxpass.lower(tiny_model, config=TINY, opset=17)
    with pytest.raises(FxpassError, match="expected fp32, fp16, bf16, int8"):
        fxpass.lower(tiny_model, config=TINY, precision="int4")
    with pytest.raises(FxpassError, match="must be in 0..99"):
        fxpass.lower(tiny_model, config=TINY, timesteps=100)


def test_users_own_class_through_the_api():
    from user_models import UserUNet

    torch.manual_seed(0)
    eager = UserUNet(new_order=True).eval()
    x = torch.randn(1, 3, 16, 16)
    schedule = [0, 100, 500, 999]
    model = fxpass.lower(eager, (x, torch.tensor([999])), timesteps=schedule)
    out = _session(model).run(None, {"x": x.numpy(), "t_index": np.array([2])})[0]
    with torch.no_grad():
        assert _rel(out, eager(x, torch.tensor([500])).numpy()) <= 1e-4


# ---- the command ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, tiny_model):
    import yaml

    root = tmp_path_factory.mktemp("lower")
    cfg = root / "tiny.yml"
    cfg.write_text(yaml.safe_dump({k: v for k, v in TINY.to_dict().items()}))
    ckpt = root / "tiny.pt"
    save_checkpoint(tiny_model, ckpt)
    return root, cfg, ckpt


def test_cli_lower_writes_model_and_report(tiny_files, capsys):
    root, cfg, ckpt = tiny_files
    out, report = root / "tiny.onnx", root / "tiny.json"
    assert main(["lower", str(ckpt), "--config", str(cfg), "-o", str(out), "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "worst error vs PyTorch" in printed and "ORT latency" in printed
    data = json.loads(report.read_text())
    assert data["check"]["passed"] and data["check"]["max_rel_to_scale"] <= 1e-4
    assert data["onnx_nodes"] == len(onnx.load(out).graph.node)
    assert data["file_bytes"] == out.stat().st_size
    assert {"capture", "passes", "export", "surgery", "write"} <= set(data["stages_s"])
    assert data["surgery"]["ops"]["after"].get("Einsum", 0) == 0


def test_api_and_cli_give_identical_bytes_and_check_figures(tiny_files, tmp_path):
    """fxpass.lower() and `fxpass lower` run the same pipeline: same file, same check figures."""
    from fxpass.config import load_config
    from fxpass.pipeline import lower_with_report

    root, cfg_path, ckpt = tiny_files
    out, report = tmp_path / "cli.onnx", tmp_path / "cli.json"
    assert main(["lower", str(ckpt), "--config", str(cfg_path), "-o", str(out), "--report", str(report)]) == 0
    cfg = load_config(cfg_path)
    lowered = lower_with_report(fxpass.load_model(ckpt, cfg), config=cfg)
    assert lowered.model.SerializeToString() == out.read_bytes()
    assert fxpass.lower(fxpass.load_model(ckpt, cfg), config=cfg).SerializeToString() == out.read_bytes()
    data = json.loads(report.read_text())
    assert data["check"]["max_abs"] == lowered.check["max_abs"]
    assert [e["max_abs"] for e in data["check"]["per_input"]] == [e["max_abs"] for e in lowered.check["per_input"]]
    assert set(data["stages_s"]) == {"load", "capture", "passes", "export", "surgery", "verify", "write"}


def test_cli_refuses_a_model_that_differs_and_keeps_existing_output(tiny_files, tmp_path, capsys):
    root, cfg, _ = tiny_files
    torch.manual_seed(0)
    ckpt = tmp_path / "noisy.pt"
    from user_models import NoisyUNet

    save_checkpoint(NoisyUNet(), ckpt)
    new = tmp_path / "new.onnx"
    user = ["--config", str(cfg), "--model-class", "user_models:NoisyUNet", "--timesteps", "5"]
    assert main(["lower", str(ckpt), "-o", str(new), *user]) == 1
    assert "not written" in capsys.readouterr().err and not new.exists()
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")
    assert main(["lower", str(ckpt), "-o", str(out), *user]) == 2  # refused before any work
    assert "already exists (pass --force to overwrite)" in capsys.readouterr().err
    assert out.read_bytes() == b"previous"
    assert main(["lower", str(ckpt), "-o", str(out), *user, "--force"]) == 1  # written, still a failure
    assert onnx.load(out).graph.input[0].name == "x"


def test_cli_model_class_with_kwargs(tiny_files, tmp_path):
    root, cfg, _ = tiny_files
    from user_models import UserUNet

    torch.manual_seed(0)
    ckpt = tmp_path / "user.pt"
    save_checkpoint(UserUNet(ch=8 * 2, new_order=True, steps=100), ckpt)
    out = tmp_path / "user.onnx"
    user = ["--model-class", "user_models:UserUNet", "--model-kwargs", '{"new_order": true, "steps": 100}']
    code = main(["lower", str(ckpt), "--config", str(cfg), "-o", str(out), *user])
    assert code == 0 and out.exists()
    # the user can re-check what they lowered, at every t_index, with the same flags
    assert main(["check", str(out), "--model", str(ckpt), "--all-steps", *user]) == 0
    assert main(["check", str(out), "--model", str(ckpt), "--tolerance", "1e-12,0", *user]) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--opset", "30"], "supported opsets are 18..26"),
        (["--model-class", "nowhere.mod:Net"], "cannot import nowhere.mod"),
        (["--model-class", "user_models:UserUNet", "--model-kwargs", "{bad"], "--model-kwargs: not valid JSON"),
        (["--timesteps", "soon"], "expected 'respaced' or an integer"),
    ],
)
def test_cli_bad_arguments(tiny_files, tmp_path, capsys, args, message):
    root, cfg, ckpt = tiny_files
    out = tmp_path / "x.onnx"
    code = main(["lower", str(ckpt), "--config", str(cfg), "-o", str(out), *args])
    assert code != 0 and message in capsys.readouterr().err
    assert not out.exists()


def test_cli_unwritable_output_fails_before_work(tiny_files, capsys):
    root, cfg, ckpt = tiny_files
    code = main(["lower", str(ckpt), "--config", str(cfg), "-o", str(root / "missing-dir" / "x.onnx")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_camus_acceptance(camus_seed0):
    """CAMUS config, seeded weights: check_model, ≤ 870 nodes, no Einsum, ORT ≤ 1e-4·max|ref| over the schedule."""
    _, out, report = camus_seed0  # the CLI in a subprocess (conftest)
    model = onnx.load(out)
    onnx.checker.check_model(str(out), full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    assert len(model.graph.node) <= 870 and ops["Einsum"] == 0
    # the ONNX Runtime CPU rewrites: every 256x256 GroupNorm (15, and the 4 of 2^21 elements at
    # 128x128) as LayerNormalization, no Resize left (5 sub-pixel upsamples), every ResBlock's
    # scale-shift folded into its norm (no Mul after a GroupNormalization); and the 88 table rows
    # read by two Gathers (one for the [C] norm scale/bias rows, one for the [C,1,1] Mul/Add rows)
    assert ops["Gather"] == 2
    assert ops["LayerNormalization"] == 19 and ops["GroupNormalization"] == 104 - 19
    assert ops["Resize"] == 0 and ops["DepthToSpace"] == 5
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    norm_outputs = {n.output[0] for n in model.graph.node if n.op_type == "GroupNormalization"}
    scaled = [n for n in model.graph.node
              if n.op_type == "Mul" and set(n.input) & norm_outputs and "Gather" in {made_by.get(i) for i in n.input}]
    assert not scaled
    data = json.loads(Path(report).read_text())
    assert data["check"]["passed"] and data["check"]["max_rel_to_scale"] <= 1e-4
    checked = {e["t_index"] for e in data["check"]["per_input"]}  # the ends, the middle and 2 seeded others
    assert {0, 125, 249} <= checked and len(checked) == 5


@pytest.mark.slow
def test_group_norm_auto_expands_large_norms_and_keep_does_not():
    """At 256 px with 32 channels the top level's GroupNorms hold 2^21 elements per sample (four levels, so the
    middle block's attention runs over 32x32 tokens, not 128x128: 69 s of gate became a few)."""
    cfg = TINY.replace(image_size=256, channel_mult="1,2,2,2", attention_resolutions="")  # middle attention at 32x32
    eager = init_model(cfg, seed=2)
    auto = fxpass.lower(eager, config=cfg)
    keep = fxpass.lower(eager, config=cfg, group_norm="keep")
    auto_ops = Counter(n.op_type for n in auto.graph.node)
    keep_ops = Counter(n.op_type for n in keep.graph.node)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(keep.graph.value_info) + list(keep.graph.input)}
    large = [n for n in keep.graph.node
             if n.op_type == "GroupNormalization" and np.prod(shapes[n.input[0]][1:]) >= 2**21]
    # the 256x256 level's 7 norms (1 input + 2 output ResBlocks, the out norm) and the 128-channel
    # concat entering the 128x128 level's first output ResBlock
    assert len(large) == 8
    assert auto_ops["LayerNormalization"] == 8 and keep_ops["LayerNormalization"] == 0
    assert auto_ops["GroupNormalization"] + 8 == keep_ops["GroupNormalization"]
    x = np.random.default_rng(3).standard_normal((1, 3, 256, 256), dtype=np.float32)
    schedule = respaced(100, "10")
    for t_index in (0, 9):
        with torch.no_grad():
            ref = eager(torch.from_numpy(x), torch.tensor([schedule[t_index]])).numpy()
        for model in (auto, keep):
            assert _rel(_session(model).run(None, {"x": x, "t_index": np.array([t_index])})[0], ref) <= 1e-4
    with pytest.raises(FxpassError, match="--group-norm"):
        fxpass.lower(eager, config=cfg, group_norm="fused")


def test_surgery_options_reach_their_pass(tiny_model):
    """Pass options are reachable from the pipeline: every GroupNorm expanded at min_elements 1."""
    model = fxpass.lower(tiny_model, config=TINY, surgery_options={"expand_group_norm": {"min_elements": 1}},
                         verify=False)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["LayerNormalization"] > 0 and ops.get("GroupNormalization", 0) == 0
    with pytest.raises(FxpassError, match="surgery options: .*min_elems"):
        fxpass.lower(tiny_model, config=TINY, surgery_options={"expand_group_norm": {"min_elems": 1}}, verify=False)
