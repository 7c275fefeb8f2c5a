"""Issue #27: other libraries' diffusion U-Nets through lower, check and sample, with no wrapper written.

diffusers' ``UNet2DModel`` (attention blocks; class-conditional), a diffusers model folder with its
scheduler config (v-prediction), MONAI's ``DiffusionModelUNet``.  Every lowering is checked here
independently of fxpass's gate: ONNX Runtime on the written file against the library model itself,
called by its own parameter names, at the first, middle and last t_index and at seeded ones, within
1e-5·max|ref|.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from check_helpers import cli, gray_image_and_half_mask, input_shapes
from library_models import TwoOutputs, ddpm, ddpm_classes, monai_ddpm, randomized

from fxpass.checkpoint import save_checkpoint
from fxpass.diffusion import Diffusion
from fxpass.errors import FxpassError
from fxpass.library import folder_config
from fxpass.metadata import parse, read_props
from fxpass.outputs import pick_output

SCHEDULE = ("--diffusion-steps", "1000", "--timestep-respacing", "20")
BOUND = 1e-5


def _needs(module: str):
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[test]' installs it)")


def _against_eager(path, call) -> float:
    """Worst |ORT - eager| / max|eager| over t_index first, middle, last and three seeded ones."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = parse(read_props(onnx.load(str(path))))
    gen = torch.Generator().manual_seed(5)
    feeds = {}
    for name, shape in input_shapes(path).items():
        if name == "t_index":
            continue
        is_label = onnx.load(str(path)).graph.input[[i.name for i in onnx.load(str(path)).graph.input].index(name)] \
            .type.tensor_type.elem_type == onnx.TensorProto.INT64
        feeds[name] = torch.randint(0, 5, shape, generator=gen) if is_label else torch.randn(shape, generator=gen)
    n = len(meta.timesteps)
    seeded = np.random.default_rng(11).integers(0, n, 3).tolist()
    worst = 0.0
    for k in [0, n // 2, n - 1, *seeded]:
        got = sess.run(None, {**{name: v.numpy() for name, v in feeds.items()}, "t_index": np.array([k])})[0]
        with torch.no_grad():
            ref = call(feeds, torch.tensor([meta.model_timesteps[k]], dtype=torch.int64)).numpy()
        worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
    return worst


def _lower(tmp_path, name, model, *flags):
    ckpt, out = tmp_path / f"{name}.pt", tmp_path / f"{name}.onnx"
    save_checkpoint(model, ckpt)
    return ckpt, out, ["lower", str(ckpt), "-o", str(out), "--model-factory", f"library_models:{name}", *flags]


def test_diffusers_unet2d_with_attention_lowers_in_table_mode(tmp_path, capsys):
    _needs("diffusers")
    torch.manual_seed(0)
    model = ddpm().eval()
    _, out, argv = _lower(tmp_path, "ddpm", model, *SCHEDULE)
    code, _, err = cli(capsys, *argv[0:], )
    assert code == 0, err
    assert set(input_shapes(out)) == {"x", "t_index"}
    assert _against_eager(out, lambda f, t: model(sample=f["x"], timestep=t).sample) <= BOUND
    config = parse(read_props(onnx.load(str(out)))).config
    assert config["learn_sigma"] is False and config["image_size"] == 16  # sample_size, 3 channels out
    assert "num_channels" not in config  # fxpass's own U-Net's settings are not recorded for a user's model


@pytest.mark.slow
def test_diffusers_class_conditional_takes_class_labels(tmp_path, capsys):
    _needs("diffusers")
    torch.manual_seed(1)
    model = ddpm_classes().eval()
    _, out, argv = _lower(tmp_path, "ddpm_classes", model, *SCHEDULE)
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    assert set(input_shapes(out)) == {"x", "t_index", "class_labels"}
    worst = _against_eager(out, lambda f, t: model(f["x"], t, class_labels=f["class_labels"]).sample)
    assert worst <= BOUND


@pytest.mark.slow
def test_monai_diffusion_unet_lowers_in_table_mode(tmp_path, capsys):
    _needs("monai")
    _needs("einops")
    model = randomized(monai_ddpm()).eval()
    _, out, argv = _lower(tmp_path, "monai_ddpm", model, *SCHEDULE, "--image-size", "16")
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    assert input_shapes(out)["x"] == [1, 1, 16, 16]
    assert _against_eager(out, lambda f, t: model(f["x"], t)) <= BOUND


def _folder(tmp_path, prediction_type="v_prediction", **scheduler):
    _needs("diffusers")
    from diffusers import DDPMScheduler

    torch.manual_seed(2)
    model = ddpm().eval()
    folder = tmp_path / "unet"
    model.save_pretrained(str(folder))
    DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, **scheduler).save_pretrained(str(folder))
    return model, folder


@pytest.mark.slow
def test_diffusers_folder_lowers_with_its_scheduler_config(tmp_path, capsys):
    model, folder = _folder(tmp_path, beta_schedule="scaled_linear", beta_start=0.0002, beta_end=0.015)
    out = tmp_path / "folder.onnx"
    code, _, err = cli(capsys, "lower", str(folder), "-o", str(out), "--timestep-respacing", "20")
    assert code == 0, err
    assert _against_eager(out, lambda f, t: model(f["x"], t).sample) <= BOUND
    config = parse(read_props(onnx.load(str(out)))).config
    assert config["model_class"] == "diffusers:UNet2DModel"
    assert config["prediction_type"] == "v_prediction" and config["noise_schedule"] == "scaled_linear"
    from diffusers import DDPMScheduler

    ours = Diffusion.from_config(dict(config, timestep_respacing=""))
    theirs = DDPMScheduler.from_pretrained(str(folder)).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(ours.alphas_cumprod, theirs, rtol=1e-5)  # the library's betas, reproduced


@pytest.mark.slow
def test_sample_on_a_v_predicting_folder_model_is_deterministic(tmp_path, capsys):
    _, folder = _folder(tmp_path)
    out = tmp_path / "folder.onnx"
    assert cli(capsys, "lower", str(folder), "-o", str(out), "--timestep-respacing", "10")[0] == 0
    from PIL import Image

    img, mask = gray_image_and_half_mask(tmp_path, 16)  # the left half known
    results = []
    for k in range(2):
        png = tmp_path / f"r{k}.png"
        code, _, err = cli(capsys, "sample", str(out), "--image", str(img), "--mask", str(mask), "-o", str(png),
                           "--seed", "4")  # RePaint, the default
        assert code == 0, err
        results.append(np.asarray(Image.open(png)))
    assert np.array_equal(results[0], results[1])
    known = np.asarray(Image.open(img).convert("RGB"))[:, :8].astype(int)
    # RePaint pastes the noised known pixels into x_t: at t = 0 they are kept within the last step's noise
    assert np.abs(results[0][:, :8].astype(int) - known).mean() <= 3.0


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_as_eps_inverts_each_prediction_type(prediction):
    d = Diffusion.from_config({"diffusion_steps": 100, "timestep_respacing": "10", "learn_sigma": False,
                               "prediction_type": prediction})
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 3, 4, 4)).astype(np.float32), rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    t = np.array([0, 7])
    a = d.sqrt_alphas_cumprod[t].astype(np.float32)[:, None, None, None]
    s = d.sqrt_one_minus_alphas_cumprod[t].astype(np.float32)[:, None, None, None]
    x = a * x0 + s * eps
    out = a * eps - s * x0 if prediction == "v_prediction" else x0
    np.testing.assert_allclose(d.as_eps(out, x, t), eps, atol=2e-4)


@pytest.mark.parametrize(("scheduler", "message"), [
    ({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid' is not one of"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ({"prediction_type": "flow"}, "prediction_type: must be one of epsilon, v_prediction, sample"),
    ({"num_train_timesteps": -3}, "num_train_timesteps must be a positive integer"),
])
def test_scheduler_configs_fxpass_cannot_reproduce_are_refused(tmp_path, scheduler, message):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", **scheduler}))
    with pytest.raises(FxpassError, match=message):
        folder_config(folder)


def test_a_folder_naming_a_class_outside_diffusers_is_refused(tmp_path, capsys):
    _needs("diffusers")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", "sample_size": 8}))
    (folder / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 10}))
    code, _, err = cli(capsys, "lower", str(folder), "-o", str(tmp_path / "o.onnx"))
    assert code == 2 and "is not a diffusers model class" in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_several_outputs_need_model_output(tmp_path, capsys):
    torch.manual_seed(0)
    model = TwoOutputs().eval()
    ckpt, out = tmp_path / "two.pt", tmp_path / "two.onnx"
    save_checkpoint(model, ckpt)
    argv = ["lower", str(ckpt), "-o", str(out), "--model-class", "library_models:TwoOutputs", *SCHEDULE]
    code, _, err = cli(capsys, *argv)
    assert code == 2 and "returns dict with eps, aux" in err and "--model-output NAME" in err
    assert [line.startswith("fxpass: error:") for line in err.strip().splitlines()][-1] and "Traceback" not in err
    code, _, err = cli(capsys, *argv, "--model-output", "eps")
    assert code == 0, err
    assert _against_eager(out, lambda f, t: model(f["x"], t)["eps"]) <= BOUND
    code, _, err = cli(capsys, *argv, "--model-output", "nope", "--force")
    assert code == 2 and "nope is not one of its tensors" in err


def test_pick_output_rule():
    a, b = torch.zeros(1), torch.ones(1)
    assert pick_output(a) == (a, None)
    assert pick_output({"sample": a, "other": b})[1] == "sample"
    assert pick_output((a, b))[1] == "0"
    assert pick_output({"only": a, "n": 3})[1] == "only"
    with pytest.raises(FxpassError, match="--model-output NAME"):
        pick_output({"p": a, "q": b})
    with pytest.raises(FxpassError, match="returns a str"):
        pick_output("nope")


@pytest.mark.slow
def test_a_safetensors_checkpoint_is_taken_where_a_pt_is(tmp_path, capsys):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = TwoOutputs().eval()
    ckpt, out = tmp_path / "two.safetensors", tmp_path / "two.onnx"
    save_file(model.state_dict(), str(ckpt))
    flags = ["--model-class", "library_models:TwoOutputs", "--model-output", "eps", *SCHEDULE]
    code, _, err = cli(capsys, "lower", str(ckpt), "-o", str(out), *flags)
    assert code == 0, err
    assert _against_eager(out, lambda f, t: model(f["x"], t)["eps"]) <= BOUND
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80garbage" * 8)
    code, _, err = cli(capsys, "lower", str(bad), "-o", str(tmp_path / "b.onnx"), *flags)
    assert code == 2 and "not a readable safetensors file" in err and not (tmp_path / "b.onnx").exists()


@pytest.mark.slow
def test_a_segmentation_unet_with_no_timestep_lowers_checks_and_goldens(tmp_path, capsys):
    """MONAI's UNet takes x alone: no schedule flags, nothing folded, the same lower / check / golden."""
    _needs("monai")
    from library_models import monai_segmentation

    model = randomized(monai_segmentation(), seed=1).eval()
    ckpt, out, argv = _lower(tmp_path, "monai_segmentation", model, "--image-size", "16")
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    meta = parse(read_props(onnx.load(str(out))))
    assert meta.mode == "plain" and meta.timesteps == () and set(input_shapes(out)) == {"x"}
    import onnxruntime as ort

    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(8))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(got - ref).max() <= BOUND * np.abs(ref).max()
    factory = ("--model-factory", "library_models:monai_segmentation")
    assert cli(capsys, "check", str(out), "--model", str(ckpt), *factory)[0] == 0
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(randomized(monai_segmentation(), seed=2), wrong)
    assert cli(capsys, "check", str(out), "--model", str(wrong), *factory)[0] == 1  # another model's weights fail
    code, _, err = cli(capsys, "golden", str(ckpt), "-o", str(tmp_path / "gold"), "--onnx", str(out), *factory)
    assert code == 0, err
    assert cli(capsys, "check", str(out), "--golden", str(tmp_path / "gold"))[0] == 0
    code, _, err = cli(capsys, *argv, "--precision", "int8", "--calibrate-on-samples", "-o", str(tmp_path / "q.onnx"))
    assert code == 2 and "needs a diffusion model" in err


def test_a_diffusion_model_without_its_schedule_is_refused_naming_the_timestep(tmp_path, capsys):
    _needs("diffusers")
    _, out, argv = _lower(tmp_path, "ddpm", ddpm().eval())
    code, _, err = cli(capsys, *argv)
    assert code == 2 and "takes a timestep ('timestep')" in err and "--diffusion-steps N" in err
    assert not out.exists()


@pytest.mark.slow
def test_a_model_whose_to_eval_float_return_none_lowers_and_checks(tmp_path, capsys):
    """PatchDDM overrides .to() and returns nothing: fxpass never relies on those methods' return values."""
    from library_models import OverridesTo

    torch.manual_seed(0)
    model = OverridesTo()
    ckpt, out = tmp_path / "o.pt", tmp_path / "o.onnx"
    save_checkpoint(model, ckpt)
    flags = ["--model-factory", "library_models:patchddm_like", *SCHEDULE]
    code, _, err = cli(capsys, "lower", str(ckpt), "-o", str(out), *flags)
    assert code == 0, err
    assert _against_eager(out, lambda f, t: model(f["x"], t)) <= BOUND
    code, _, err = cli(capsys, "check", str(out), "--model", str(ckpt), *flags[:2])
    assert code == 0, err


@pytest.mark.slow
def test_cross_attention_inputs_say_their_shape_and_lower_once_given(tmp_path, capsys):
    """encoder_hidden_states / context are [B, L, D]: fxpass fills D from the model, L is the user's."""
    _needs("diffusers")
    _needs("monai")
    from library_models import monai_context, text_conditioned

    torch.manual_seed(0)
    model = text_conditioned().eval()
    _, out, argv = _lower(tmp_path, "text_conditioned", model, *SCHEDULE)
    code, _, err = cli(capsys, *argv)
    assert code == 2 and "--input encoder_hidden_states=1,L,32 (L its sequence length" in err
    code, _, err = cli(capsys, *argv, "--input", "encoder_hidden_states=1,7,32")
    assert code == 0, err
    worst = _against_eager(out, lambda f, t: model(f["x"], t, encoder_hidden_states=f["encoder_hidden_states"]).sample)
    assert worst <= BOUND
    monai = randomized(monai_context(), seed=3)
    _, out, argv = _lower(tmp_path, "monai_context", monai, *SCHEDULE, "--image-size", "16")
    code, _, err = cli(capsys, *argv)  # context is optional in forward: capture fails, the hint names it
    assert code == 2 and "--input context=1,L,24" in err and "fake_tensor.py" not in err


def test_a_pipeline_folder_gives_its_unet_and_scheduler(tmp_path):
    """model_index.json + unet/ + scheduler/: the model folder is unet/, the schedule scheduler/'s; diffusers'
    squaredcos_cap_v2 is guided-diffusion's cosine, whose alphas_cumprod fxpass reproduces."""
    diffusers = _needs("diffusers")
    from fxpass.library import model_folder

    (tmp_path / "unet").mkdir()
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": [16, 16]}))
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(
        str(tmp_path / "scheduler"))
    folder = model_folder(tmp_path)
    assert folder == tmp_path / "unet"
    cfg = folder_config(folder, timestep_respacing="25")
    assert (cfg.noise_schedule, cfg.diffusion_steps, cfg.image_size, cfg.model_class) == (
        "cosine", 1000, 16, "diffusers:UNet2DModel")
    theirs = diffusers.DDPMScheduler.from_pretrained(str(tmp_path / "scheduler")).alphas_cumprod.double().numpy()
    ours = Diffusion.from_config(cfg.replace(timestep_respacing="")).alphas_cumprod
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-12)  # diffusers computes its betas in float32
    assert model_folder(tmp_path / "scheduler") is None and model_folder(tmp_path / "nothing") is None


@pytest.mark.slow
def test_a_user_models_reduced_precision_file_is_checked_structurally(tmp_path, capsys):
    """Structure before numbers for a user's model too (issue #26): an fp16 file passes as the float32 graph of
    its own checkpoint plus casts, and fails before any number against another checkpoint's weights."""
    from library_models import OverridesTo

    torch.manual_seed(0)
    ckpt, other, out = tmp_path / "o.pt", tmp_path / "other.pt", tmp_path / "o16.onnx"
    save_checkpoint(OverridesTo(), ckpt)
    save_checkpoint(OverridesTo(), other)  # the next draw: same graph, other weights
    flags = ["--model-factory", "library_models:patchddm_like"]
    code, _, err = cli(capsys, "lower", str(ckpt), "-o", str(out), *flags, *SCHEDULE, "--precision", "fp16")
    assert code == 0, err
    code, stdout, err = cli(capsys, "check", str(out), "--model", str(ckpt), *flags, "--precision", "fp16")
    assert code == 0, err
    assert "structure: the float32 graph of" in stdout and "fp16's casts" in stdout
    code, _, err = cli(capsys, "check", str(out), "--model", str(other), *flags, "--precision", "fp16")
    assert code == 1 and "not the float32 graph of" in err and "more than its precision's rounding" in err


@pytest.mark.slow
def test_a_grayscale_model_samples_grayscale_images(tmp_path, capsys):
    """MONAI's 1-channel DiffusionModelUNet: sample reads the image as gray, writes a gray PNG, keeps the known
    pixels (DiffPIR projects them into x0), deterministic per seed; evaluate takes the same images."""
    _needs("monai")
    from PIL import Image

    model = randomized(monai_ddpm())
    _, out, argv = _lower(tmp_path, "monai_ddpm", model, *SCHEDULE, "--image-size", "16")
    assert cli(capsys, *argv)[0] == 0
    (tmp_path / "imgs").mkdir()
    img, mask = gray_image_and_half_mask(tmp_path / "imgs", 16)  # the left half known
    gray = np.asarray(Image.open(img))
    pngs = []
    for k in range(2):
        png = tmp_path / f"r{k}.png"
        code, _, err = cli(capsys, "sample", str(out), "--image", str(img), "--mask", str(mask), "-o", str(png),
                           "--seed", "2", "--preset", "fast")
        assert code == 0, err
        pngs.append(Image.open(png))
    assert pngs[0].mode == "L" and np.array_equal(np.asarray(pngs[0]), np.asarray(pngs[1]))
    assert np.array_equal(np.asarray(pngs[0])[:, :8], gray[:, :8])
    code, _, err = cli(capsys, "evaluate", str(out), "--data", str(tmp_path / "imgs"), "--count", "1",
                       "--preset", "fast")
    assert code == 0, err
