"""Issue #13: any guided-diffusion-family model from the command line (fxpass.signature).

The models live in ``user_models.py`` (plain bytecode for capture): a SuperResModel-style ``low_res``
input, a 5-channel ``x``, a Palette/SR3-style ``(y_cond_and_noisy, gammas)`` with a continuous noise
level, a RePaint-style ``conf`` constructor argument, ten classes known only from ``label_emb``, a 3-D
model with device asserts, ``use_fp16``.  Each is lowered through ``fxpass lower --model-class`` and
the pipeline's gate compares ONNX Runtime with the eager model at five schedule positions (first,
middle, last and two seeded); the report's figures are asserted here.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import onnx
import pytest
import torch
from check_helpers import SCHEDULE, input_shapes, lower_user_class
from user_models import (
    ConfNet,
    FiveChannelNet,
    NoiseLevelNet,
    SuperResNet,
    TenClassNet,
    UnknownTimeNet,
    UserUNet,
    Volume3DNet,
)

import fxpass
from fxpass.checkpoint import save_checkpoint
from fxpass.cli import main
from fxpass.config import from_dict, user_class_config
from fxpass.errors import FxpassError
from fxpass.metadata import parse, read_props
from fxpass.signature import parse_input, plan, wrap


def _assert_gate(report):
    check = report["check"]
    assert check["passed"] and check["max_rel_to_scale"] <= 1e-4
    assert len(check["per_input"]) >= 3  # first, middle, last t_index (and seeded others)
    assert {e["t_index"] for e in check["per_input"]} >= {0, 5, 9}


@pytest.mark.parametrize("name, model, flags, inputs", [
    ("SuperResNet", lambda: SuperResNet(), ["--input", "low_res=1,3,8,8"],
     {"x": [1, 3, 16, 16], "t_index": [1], "low_res": [1, 3, 8, 8]}),
    ("FiveChannelNet", lambda: FiveChannelNet(), ["--image-size", "16"], {"x": [1, 5, 16, 16], "t_index": [1]}),
    ("TenClassNet", lambda: TenClassNet(), ["--image-size", "16"], {"x": [1, 3, 16, 16], "t_index": [1], "y": [1]}),
    ("Volume3DNet", lambda: Volume3DNet(), ["--image-size", "8"], {"x": [1, 1, 8, 8, 8], "t_index": [1]}),
])
def test_cli_lowers_family_members(tmp_path, name, model, flags, inputs):
    code, _, out, report = lower_user_class(tmp_path, name, model(), *flags)
    assert code == 0
    assert input_shapes(out) == inputs
    _assert_gate(report)
    meta = parse(read_props(onnx.load(out)))
    assert meta.mode == "table" and list(meta.timesteps) == fxpass.schedule.respaced(100, "10")


def test_continuous_noise_level_folds_as_float_tables(tmp_path):
    code, _, out, report = lower_user_class(tmp_path, "NoiseLevelNet", NoiseLevelNet(), "--image-size", "16")
    assert code == 0 and input_shapes(out) == {"x": [1, 6, 16, 16], "t_index": [1]}
    _assert_gate(report)
    assert report["signature"] == {"x": "y_cond_and_noisy", "timestep": "gammas", "timestep_dtype": "float32",
                                   "inputs": {"x": [1, 6, 16, 16], "timesteps": [1]}}
    assert report["fx_rewrites"]["fold_timesteps"] > 0  # folded, not left as an input
    assert parse(read_props(onnx.load(out))).mode == "table"


def test_conf_object_from_nested_model_kwargs(tmp_path):
    kwargs = {"conf": {"num_channels": 8, "diffusion_steps": 100}}
    code, *_, report = lower_user_class(tmp_path, "ConfNet", ConfNet(SimpleNamespace(**kwargs["conf"])),
                                  "--model-kwargs", json.dumps(kwargs), "--image-size", "16")
    assert code == 0
    _assert_gate(report)


def test_use_fp16_model_is_lowered_in_float32_consistently(tmp_path):
    code, _, _, report = lower_user_class(tmp_path, "UserUNet", UserUNet(steps=100), "--image-size", "16",
                                "--model-kwargs", '{"steps": 100, "use_fp16": true}')
    assert code == 0
    _assert_gate(report)


def test_check_rechecks_a_user_class(tmp_path, capsys):
    code, ckpt, out, _ = lower_user_class(tmp_path, "SuperResNet", SuperResNet(), "--input", "low_res=1,3,8,8")
    assert code == 0
    user = ["--model-class", "user_models:SuperResNet", "--input", "low_res=1,3,8,8"]
    assert main(["check", str(out), "--model", str(ckpt), "--all-steps", *user]) == 0
    assert "check: pass" in capsys.readouterr().out
    assert main(["check", str(out), "--model", str(ckpt), "--tolerance", "1e-12,0", *user]) == 1


@pytest.mark.parametrize("name, model, flags, message", [
    ("UnknownTimeNet", UnknownTimeNet, ["--image-size", "16"],
     "no timestep input found (looked for timesteps, timestep, t, "),
    ("SuperResNet", SuperResNet, [],
     "left at its default: if the model needs it, give its shape with --input low_res=SHAPE"),
    ("FiveChannelNet", FiveChannelNet, [], "image size unknown (the model has no image_size attribute"),
    ("FiveChannelNet", FiveChannelNet, ["--image-size", "16", "--input", "mask=1,1,16,16"],
     "--input mask: FiveChannelNet.forward has no such parameter"),
    ("FiveChannelNet", FiveChannelNet, ["--image-size", "16", "--input", "low_res=1,3"],
     None),  # a wrong shape: the model's own failure, one line naming its source
])
def test_refusals_say_what_to_pass(tmp_path, capsys, name, model, flags, message):
    code, *_ = lower_user_class(tmp_path, name, model(), *flags)
    err = capsys.readouterr().err
    assert code == 2 and "internal error" not in err and "Proxy(" not in err
    if message:
        assert message in err


def test_timestep_input_names_an_unknown_parameter(tmp_path):
    code, _, out, report = lower_user_class(tmp_path, "UnknownTimeNet", UnknownTimeNet(), "--image-size", "16",
                                  "--timestep-input", "step_value")
    assert code == 0 and input_shapes(out) == {"x": [1, 3, 16, 16], "t_index": [1]}
    _assert_gate(report)


def test_model_class_needs_a_schedule(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "f.pt"
    save_checkpoint(FiveChannelNet(), ckpt)
    code = main(["lower", str(ckpt), "-o", str(tmp_path / "f.onnx"), "--model-class", "user_models:FiveChannelNet"])
    err = capsys.readouterr().err
    assert code == 2 and "pass --config FILE, or --diffusion-steps N" in err
    code = main(["lower", str(ckpt), "-o", str(tmp_path / "f.onnx"), "--diffusion-steps", "10"])
    assert code == 2 and "--diffusion-steps describes your own class: it needs --model-class" in capsys.readouterr().err


def test_plan_reads_the_model():
    p = plan(Volume3DNet(), image_size=8)
    assert p.x.shape == (1, 1, 8, 8, 8) and p.t_name == "timesteps" and p.standard
    p = plan(TenClassNet(), image_size=16)
    assert p.num_classes == 10 and set(p.extras) == {"y"}
    p = plan(SuperResNet(), image_size=16, inputs=["low_res=1,3,8,8"])
    assert p.x.shape == (1, 3, 16, 16)  # 6 input channels less low_res's 3
    p = plan(NoiseLevelNet(), image_size=16)
    assert p.continuous and not p.standard
    wrapped = wrap(NoiseLevelNet(), p)
    out = wrapped(torch.zeros(1, 6, 16, 16), torch.tensor([3]))  # an int timestep reaches it as a float
    assert out.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("text", ["low_res", "low_res=", "low_res=1,a", "1x=1,2", "low_res=1,3:complex"])
def test_parse_input_refuses(text):
    with pytest.raises(FxpassError, match="--input"):
        parse_input(text)


def test_user_class_config_checks_only_what_fxpass_uses():
    cfg = user_class_config(None, diffusion_steps=100, timestep_respacing="10", image_size=16,
                            model_class="m:C")
    assert cfg.image_size == 16 and cfg.model_class == "m:C"
    with pytest.raises(FxpassError, match="has no default channel_mult"):
        from_dict({"image_size": 16})  # fxpass's own U-Net still gets its architecture rules
    assert from_dict(cfg.to_dict(), complete=True) == cfg  # what metadata carries reads back
    assert "model_class" not in fxpass.CAMUS.to_dict()
    with pytest.raises(FxpassError, match="timestep_respacing"):
        user_class_config(None, diffusion_steps=100, timestep_respacing="1000")


def test_module_built_in_forward_is_refused_naming_the_line():
    from user_models import ForwardBuiltNet

    cfg = user_class_config(None, diffusion_steps=100, timestep_respacing="10", image_size=16)
    with pytest.raises(FxpassError, match=r"user_models.py:\d+: `proj = nn.Conv2d.*a module built inside forward"):
        fxpass.lower(ForwardBuiltNet(), config=cfg)


def test_model_factory(tmp_path, capsys):
    from user_models import make_conf_net

    torch.manual_seed(0)
    ckpt, out = tmp_path / "f.pt", tmp_path / "f.onnx"
    save_checkpoint(make_conf_net(), ckpt)
    flags = [*SCHEDULE, "--image-size", "16", "--model-kwargs", '{"num_channels": 8}']
    assert main(["lower", str(ckpt), "-o", str(out), "--model-factory", "user_models:make_conf_net", *flags]) == 0
    assert main(["check", str(out), "--model", str(ckpt), "--model-factory", "user_models:make_conf_net",
                 "--model-kwargs", '{"num_channels": 8}']) == 0
    capsys.readouterr()
    assert main(["lower", str(ckpt), "-o", str(tmp_path / "g.onnx"), "--model-factory", "user_models:ConfNet",
                 *flags]) == 2
    assert "ConfNet is not a function" in capsys.readouterr().err


def test_api_lowers_a_user_class_with_inputs():
    import numpy as np
    import onnxruntime as ort

    torch.manual_seed(0)
    model = SuperResNet(image_size=16).eval()
    cfg = user_class_config(None, diffusion_steps=100, timestep_respacing="10")  # size from model.image_size
    proto = fxpass.lower(model, config=cfg, inputs=["low_res=1,3,8,8"])
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x, low = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 8, 8)
    schedule = fxpass.schedule.respaced(100, "10")
    for k in (0, 5, 9):
        out = sess.run(None, {"x": x.numpy(), "t_index": np.array([k]), "low_res": low.numpy()})[0]
        with torch.no_grad():
            ref = model(x, torch.tensor([schedule[k]]), low_res=low).numpy()
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    assert parse(read_props(proto)).config["image_size"] == 16


def test_noise_level_values_are_the_schedules_alpha_bar(tmp_path):
    import numpy as np

    from fxpass.diffusion import base_betas

    code, ckpt, out, report = lower_user_class(tmp_path, "NoiseLevelNet", NoiseLevelNet(), "--image-size", "16",
                                     "--timestep-values", "alpha_bar")
    assert code == 0
    _assert_gate(report)
    meta = parse(read_props(onnx.load(out)))
    alpha_bar = np.cumprod(1.0 - base_betas("linear", 100))
    np.testing.assert_allclose(meta.model_timesteps, alpha_bar[list(meta.timesteps)], rtol=1e-12)
    assert report["timestep_values"] == "alpha_bar"
    assert main(["check", str(out), "--model", str(ckpt), "--model-class", "user_models:NoiseLevelNet"]) == 0
    fixed = tmp_path / "fixed.onnx"
    assert main(["lower", str(ckpt), "-o", str(fixed), "--model-class", "user_models:NoiseLevelNet", *SCHEDULE,
                 "--image-size", "16", "--timestep-values", "sqrt_alpha_bar", "--timesteps", "50"]) == 0
    meta = parse(read_props(onnx.load(fixed)))
    assert meta.mode == "fixed" and meta.model_timesteps == (pytest.approx(float(np.sqrt(alpha_bar[50]))),)


def test_nested_model_kwargs_become_attribute_objects():
    from fxpass.user_model import namespaces

    conf = namespaces({"conf": {"diffusion_steps": 4000, "inner": {"a": [1, {"b": 2}]}}})["conf"]
    assert isinstance(conf, SimpleNamespace) and conf.diffusion_steps == 4000 and conf.inner.a[1].b == 2
    assert conf["diffusion_steps"] == 4000 and conf.get("missing", 7) == 7 and "inner" in conf


def test_a_model_still_in_float16_is_refused_naming_the_line():
    from user_models import HalfCastNet

    cfg = user_class_config(None, diffusion_steps=100, timestep_respacing="10", image_size=16)
    with pytest.raises(FxpassError, match=r"user_models.py:\d+: `return self.body\(x, timesteps\).half\(\).float\(\)`: "
                                          "HalfCastNet still computes in torch.float16"):
        fxpass.lower(HalfCastNet(), config=cfg)
