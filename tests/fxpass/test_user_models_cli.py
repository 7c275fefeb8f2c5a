"""Issue #13, the rest: image-like inputs shaped by the model's own attributes (``fxpass.signature``),
and ``fxpass check`` / ``golden`` / ``inspect`` taking ``lower``'s user-class flags (``fxpass/cli/user.py``).

The models live in ``user_models.py``: ``SmallSizeSRNet`` is guided-diffusion's SuperResModel keeping
its scripts' ``small_size``; ``GrayLowResNet`` says ``low_res_size`` / ``low_res_channels``;
``CondChannelsNet`` needs a conditioning image whose channels are ``cond_channels``.  Every lowering
is checked here independently of fxpass's gate: ONNX Runtime on the written file against the
unwrapped eager model, called by its own parameter names, at the first, middle and last t_index.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from check_helpers import SCHEDULE, input_shapes, lower_user_class
from user_models import (
    BareCondNet,
    CondChannelsNet,
    GrayLowResNet,
    NoiseLevelNet,
    NoSizeLowResNet,
    SmallSizeSRNet,
)

from fxpass.checkpoint import save_checkpoint
from fxpass.cli import main
from fxpass.errors import FxpassError
from fxpass.metadata import parse, read_props
from fxpass.signature import plan


def _against_eager(out, model, continuous=False):
    """ORT on ``out`` against ``model`` itself (its own parameter names) at three schedule positions."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = parse(read_props(onnx.load(out)))
    shapes = input_shapes(out)
    gen = torch.Generator().manual_seed(3)
    feeds = {n: torch.randn(s, generator=gen) for n, s in shapes.items() if n != "t_index"}
    n = len(meta.timesteps)
    worst = 0.0
    for k in (0, n // 2, n - 1):
        got = sess.run(None, {**{n_: v.numpy() for n_, v in feeds.items()}, "t_index": np.array([k])})[0]
        t = torch.tensor([meta.model_timesteps[k]], dtype=torch.float32 if continuous else torch.int64)
        extras = {n_: v for n_, v in feeds.items() if n_ != "x"}
        with torch.no_grad():
            ref = model.eval()(feeds["x"], t, **extras).numpy()
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        assert rel <= 1e-4, (k, rel)
        worst = max(worst, rel)
    return worst


def _error(capsys) -> str:
    """The one ``fxpass: ...`` line a refused command printed (never an internal error)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fxpass:")]
    assert len(lines) == 1, err
    assert "internal error" not in err and "Proxy(" not in err and "Traceback" not in err
    return lines[0]


# ---- shapes from the model's attributes, through fxpass lower ----------------------------------------
@pytest.fixture(scope="module")
def superres(tmp_path_factory):
    """SmallSizeSRNet lowered with no --input: low_res from small_size, its channels as x's."""
    directory = tmp_path_factory.mktemp("superres")
    model = SmallSizeSRNet()
    code, ckpt, out, report = lower_user_class(directory, "SmallSizeSRNet", model)
    return code, ckpt, out, report, model, directory


def test_low_res_shape_from_small_size(superres):
    code, _, out, report, model, _ = superres
    assert code == 0
    assert input_shapes(out) == {"x": [1, 3, 16, 16], "t_index": [1], "low_res": [1, 3, 8, 8]}
    assert report["check"]["passed"] and report["check"]["max_rel_to_scale"] <= 1e-4
    _against_eager(out, model)


@pytest.mark.parametrize("name, model, inputs", [
    ("GrayLowResNet", GrayLowResNet, {"x": [1, 3, 16, 16], "t_index": [1], "low_res": [1, 1, 8, 4]}),
    ("CondChannelsNet", CondChannelsNet, {"x": [1, 1, 16, 16], "t_index": [1], "cond": [1, 3, 16, 16]}),
])
def test_input_shapes_from_attributes(tmp_path, name, model, inputs):
    model = model()
    code, _, out, report = lower_user_class(tmp_path, name, model, "--image-size", "16")
    assert code == 0 and input_shapes(out) == inputs
    assert report["check"]["max_rel_to_scale"] <= 1e-4
    _against_eager(out, model)


def test_given_input_wins_over_attributes():
    p = plan(SmallSizeSRNet(), image_size=16, inputs=["low_res=1,3,4,4"])
    assert tuple(p.extras["low_res"].shape) == (1, 3, 4, 4) and p.origins["low_res"] == "--input"


def test_plan_reads_shape_and_size_attributes():
    m = CondChannelsNet()
    m.cond_shape = (3, 16, 8)  # per sample; beats cond_channels
    p = plan(m, image_size=16)
    assert tuple(p.extras["cond"].shape) == (1, 3, 16, 8) and p.origins["cond"] == "model.cond_shape"
    m = SmallSizeSRNet()
    p = plan(m, image_size=16, inputs=["x=1,2,16,16"])  # low_res's channels: 6 less x's 2
    assert tuple(p.extras["low_res"].shape) == (1, 4, 8, 8)
    assert "less x's 2" in p.origins["low_res"]


@pytest.mark.parametrize("setup, message", [
    (lambda m: setattr(m, "small_size", (8, 8, 8)), "SmallSizeSRNet.small_size = (8, 8, 8): not a size for 'low_res'"),
    (lambda m: setattr(m, "low_res_shape", (3, 8)), "SmallSizeSRNet.low_res_shape = (3, 8): not a shape for 'low_res'"),
    (lambda m: setattr(m.inp, "in_channels", 7), ("'low_res': channels unknown (SmallSizeSRNet has small_size but no "
                                                  "attribute low_res_channels); give its shape with "
                                                  "--input low_res=1,C,8,8 (C its channels)")),
])
def test_plan_refuses_what_the_attributes_cannot_say(setup, message):
    m = SmallSizeSRNet()
    setup(m)
    with pytest.raises(FxpassError) as info:
        plan(m, image_size=16)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name, model, message", [
    ("NoSizeLowResNet", NoSizeLowResNet,
     ("NoSizeLowResNet.forward's 'low_res': size unknown (NoSizeLowResNet has low_res_channels but no attribute "
      "low_res_size, low_res_image_size, low_res_resolution, lowres_size, small_size, lowres_image_size); "
      "give its shape with --input low_res=1,3,H,W (H,W its size)")),
    ("BareCondNet", BareCondNet,
     ("BareCondNet.forward needs 'cond', whose shape fxpass cannot infer (the model has no attribute cond_shape, "
      "cond_size, cond_channels); give its shape with --input cond=1,C,H,W (C its channels, H,W its size)")),
])
def test_lower_says_which_input_and_how(tmp_path, capsys, name, model, message):
    code, *_ = lower_user_class(tmp_path, name, model(), "--image-size", "16")
    assert code == 2
    assert message in _error(capsys)


# ---- check, golden and inspect take lower's flags ---------------------------------------------------
def test_check_takes_the_lower_flags(superres, capsys):
    _, ckpt, out, *_ = superres
    user = ["--model-class", "user_models:SmallSizeSRNet", *SCHEDULE]  # as lower was given them
    assert main(["check", str(out), "--model", str(ckpt), *user]) == 0
    assert "check: pass" in capsys.readouterr().out
    assert main(["check", str(out), "--model", str(ckpt), "--model-class", "user_models:SmallSizeSRNet",
                 "--diffusion-steps", "50"]) == 2
    assert _error(capsys).endswith(f"--diffusion-steps 50: {out} was lowered with diffusion_steps 100")


def test_golden_for_a_user_class(superres, capsys):
    _, ckpt, out, _, _, directory = superres
    user = ["--model-class", "user_models:SmallSizeSRNet"]
    with_onnx, without = directory / "g-onnx", directory / "g-flags"
    assert main(["golden", str(ckpt), "-o", str(with_onnx), "--onnx", str(out), *user]) == 0
    assert "matches the golden outputs" in capsys.readouterr().out
    manifest = json.loads((with_onnx / "manifest.json").read_text())
    assert manifest["inputs"]["tensors"]["low_res"]["shape"] == [1, 3, 8, 8]
    assert "user_models:SmallSizeSRNet" in manifest["outputs"]["what"]
    # without --onnx: the inputs lower infers, from the same flags; the lowered file matches them
    assert main(["golden", str(ckpt), "-o", str(without), *user, *SCHEDULE]) == 0
    for golden in (with_onnx, without):
        assert main(["check", str(out), "--golden", str(golden), "--targets", "ort"]) == 0
        assert "check: pass" in capsys.readouterr().out


def test_golden_feeds_a_continuous_model_its_noise_levels(tmp_path, capsys):
    values = ["--timestep-values", "alpha_bar"]
    model = NoiseLevelNet()
    code, ckpt, out, report = lower_user_class(tmp_path, "NoiseLevelNet", model, "--image-size", "16", *values)
    assert code == 0 and report["check"]["max_rel_to_scale"] <= 1e-4
    _against_eager(out, model, continuous=True)  # fed alpha_bar of each timestep, as the table holds
    user = ["--model-class", "user_models:NoiseLevelNet", *SCHEDULE, "--image-size", "16"]
    golden = tmp_path / "golden"
    assert main(["golden", str(ckpt), "-o", str(golden), *user, *values]) == 0
    assert main(["check", str(out), "--golden", str(golden), "--targets", "ort"]) == 0
    assert main(["check", str(out), "--model", str(ckpt), *user, *values]) == 0
    capsys.readouterr()
    assert main(["golden", str(ckpt), "-o", str(tmp_path / "g2"), "--onnx", str(out), *user,
                 "--timestep-values", "sqrt_alpha_bar"]) == 2
    assert "--timestep-values sqrt_alpha_bar: " in _error(capsys)


def test_inspect_shows_the_inferred_inputs(superres, capsys):
    _, ckpt, *_ = superres
    assert main(["inspect", str(ckpt), "--model-class", "user_models:SmallSizeSRNet"]) == 0
    out = capsys.readouterr().out
    assert "low_res" in out and "(1, 3, 8, 8)" in out and "model.small_size" in out and "(1, 3, 16, 16)" in out


def test_inspect_says_what_to_pass(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "bare.pt"
    save_checkpoint(BareCondNet(), ckpt)
    assert main(["inspect", str(ckpt), "--model-class", "user_models:BareCondNet", "--image-size", "16"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "not inferred:" in out and "--input cond=1,C,H,W" in out


@pytest.mark.parametrize("argv, message", [
    (["check", "{out}", "--model", "{ckpt}", "--input", "low_res=1,3,8,8"],
     "--input describes your own class: it needs --model-class (or --model-factory)"),
    (["golden", "{ckpt}", "-o", "{tmp}/g", "--timestep-input", "t", "--image-size", "16"],
     "--timestep-input, --image-size describe your own class: they need --model-class"),
    (["inspect", "{ckpt}", "--timestep-values", "alpha_bar"], "--timestep-values describes your own class"),
    (["golden", "{ckpt}", "-o", "{tmp}/g", "--model-class", "user_models:SmallSizeSRNet"],
     "SmallSizeSRNet.forward takes a timestep ('timesteps'): fxpass needs the diffusion schedule of your model: pass --config FILE"),
    (["golden", "{bare}", "-o", "{tmp}/g", "--model-class", "user_models:BareCondNet", *SCHEDULE, "--image-size", "16"],
     "BareCondNet.forward needs 'cond'"),
    (["check", "{out}", "--model", "{ckpt}", "--model-class", "user_models:SmallSizeSRNet", "--image-size", "32"],
     "--image-size 32: {out} was lowered with image_size 16"),
])
def test_user_flag_refusals(superres, tmp_path, capsys, argv, message):
    _, ckpt, out, *_ = superres
    bare = tmp_path / "bare.pt"
    save_checkpoint(BareCondNet(), bare)
    names = {"out": out, "ckpt": ckpt, "tmp": tmp_path, "bare": bare}
    assert main([a.format(**names) for a in argv]) == 2
    assert message.format(**names) in _error(capsys)
