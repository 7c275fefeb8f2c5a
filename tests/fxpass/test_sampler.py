"""fxpass.sampler and ``fxpass sample``: schedule maths, RePaint's jump schedule, the loops, the ONNX
adapter, the CLI's errors, the torch-free sample path, and ONNX-vs-eager equivalence.

The ONNX files here are fixtures built with onnx.helper: a tiny table-mode "denoiser"
out = tanh(a[t_index] * x + b[t_index]) with the metadata ``fxpass lower`` writes, so the adapter and
the CLI run on a real ONNX Runtime session.  The equivalence test at the end needs ``fxpass.lower``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from check_helpers import sample_in_a_fresh_process

from fxpass.cli import main
from fxpass.config import ModelConfig
from fxpass.denoisers import OnnxDenoiser
from fxpass.errors import FxpassError
from fxpass.diffusion import Diffusion, base_betas, cosine_betas, linear_betas, respaced_betas
from fxpass.sampler import (
    GeneratorNoise,
    RecordingNoise,
    ReplayNoise,
    count_model_calls,
    ddpm,
    descent_schedule,
    jump_schedule,
    repaint,
    sample_loop,
)
from fxpass.schedule import respaced



# ---- fixtures: a table-mode ONNX model built by hand -------------------------------------------
class TableFixture:
    """out = tanh(a[t] * cat(x, x) + b[t]) (6 channels) or tanh(a[t] * x + b[t]) (3 channels)."""

    def __init__(self, path: Path, cfg: ModelConfig, *, mode: str | None = "table", timesteps=None,
                 input_names=("x", "t_index"), static_batch: int | None = None, seed: int = 0,
                 drop_keys=()):
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        kept = respaced(cfg.diffusion_steps, cfg.timestep_respacing)
        channels = cfg.out_channels
        rng = np.random.default_rng(seed)
        self.a = rng.uniform(0.5, 1.5, (len(kept), channels)).astype(np.float32)
        self.b = rng.uniform(-0.3, 0.3, (len(kept), channels)).astype(np.float32)
        self.learn_sigma = cfg.learn_sigma
        s = cfg.image_size
        x_name, t_name = input_names
        nodes = [
            helper.make_node("Gather", ["a_table", t_name], ["a_rows"], axis=0),
            helper.make_node("Gather", ["b_table", t_name], ["b_rows"], axis=0),
            helper.make_node("Reshape", ["a_rows", "shape4"], ["a4"]),
            helper.make_node("Reshape", ["b_rows", "shape4"], ["b4"]),
        ]
        if channels == 6:
            nodes.append(helper.make_node("Concat", [x_name, x_name], ["xx"], axis=1))
        else:
            nodes.append(helper.make_node("Identity", [x_name], ["xx"]))
        nodes += [
            helper.make_node("Mul", ["xx", "a4"], ["m"]),
            helper.make_node("Add", ["m", "b4"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["out"]),
        ]
        batch = static_batch if static_batch is not None else "N"
        graph = helper.make_graph(
            nodes, "fixture",
            [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, [batch, 3, s, s]),
             helper.make_tensor_value_info(t_name, TensorProto.INT64, [batch])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, channels, s, s])],
            initializer=[numpy_helper.from_array(self.a, "a_table"), numpy_helper.from_array(self.b, "b_table"),
                         numpy_helper.from_array(np.array([-1, channels, 1, 1], dtype=np.int64), "shape4")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        props = {
            "fxpass.config": json.dumps(cfg.to_dict()),
            "fxpass.timesteps": json.dumps(kept if timesteps is None else timesteps),
            "fxpass.mode": mode,
        }
        helper.set_model_props(model, {k: v for k, v in props.items() if v is not None and k not in drop_keys})
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
        self.path = path

    def __call__(self, x, t_index):
        """The same function in NumPy (the reference for the adapter)."""
        xx = np.concatenate([x, x], axis=1) if self.learn_sigma else x
        return np.tanh(xx * self.a[t_index][:, :, None, None] + self.b[t_index][:, :, None, None])


# an 8-pixel config (valid, so .replace() works); only the fixtures use it, never a real U-Net
SMALL = ModelConfig().replace(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,1",
                              attention_resolutions="4", diffusion_steps=100, timestep_respacing="10")


@pytest.fixture
def fixture_onnx(tmp_path) -> TableFixture:
    return TableFixture(tmp_path / "fixture.onnx", SMALL)


def _png(path: Path, array: np.ndarray) -> Path:
    """uint8 [H, W] -> L, [H, W, 3] -> RGB, uint16 [H, W] -> I;16 (16-bit grayscale PNG)."""
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def images(tmp_path):
    """A gray 8x8 image and a mask whose left half is known (white)."""
    rng = np.random.default_rng(1)
    img = _png(tmp_path / "img.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, :4] = 255
    return img, _png(tmp_path / "mask.png", mask)


class ZeroNoise:
    def normal(self, shape):
        return np.zeros(shape, dtype=np.float32)


class PointMass:
    """The exact epsilon predictor when all data is the image ``c`` (v = 0 for learned sigma)."""

    def __init__(self, diffusion: Diffusion, c: np.ndarray):
        self.d, self.c = diffusion, np.asarray(c, dtype=np.float64)
        self.inputs: list[tuple[np.ndarray, int]] = []

    def __call__(self, x, t_index):
        t = int(t_index[0])
        self.inputs.append((x.copy(), t))
        eps = (x - self.d.sqrt_alphas_cumprod[t] * self.c) / self.d.sqrt_one_minus_alphas_cumprod[t]
        eps = np.broadcast_to(eps, x.shape).astype(np.float32)
        return np.concatenate([eps, np.zeros_like(eps)], axis=1) if self.d.learn_sigma else eps


# ---- schedule maths ----------------------------------------------------------------------------
def test_linear_betas_endpoints_and_spacing():
    b = linear_betas(1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4, abs=1e-15) and b[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=0, atol=1e-15)
    b = linear_betas(4000)  # CAMUS: scale 1000/4000
    assert b[0] == pytest.approx(2.5e-5, abs=1e-16) and b[-1] == pytest.approx(0.005, abs=1e-15)


def test_cosine_betas_follow_alpha_bar_and_cap():
    n = 100
    b = cosine_betas(n)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f(i / n) / f(0) for i in range(1, n + 1)])
    uncapped = b < 0.999
    assert b[-1] == 0.999 and uncapped[:-1].all()
    ac = np.cumprod(1 - b)
    np.testing.assert_allclose(ac[:-1], expected[:-1], rtol=1e-12, atol=1e-15)
    assert ((b > 0) & (b <= 0.999)).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alphas_cumprod_decreasing_in_unit_interval(schedule):
    d = Diffusion(base_betas(schedule, 1000))
    ac = d.alphas_cumprod
    assert (np.diff(ac) < 0).all() and (ac > 0).all() and (ac < 1).all()
    assert d.alphas_cumprod_prev[0] == 1.0


@pytest.mark.parametrize("schedule,steps,spacing", [("linear", 4000, "250"), ("cosine", 100, "10,5"),
                                                    ("linear", 1000, "ddim50"), ("linear", 100, "")])
def test_respaced_betas_reconstruct_alphas_cumprod(schedule, steps, spacing):
    base = base_betas(schedule, steps)
    kept = respaced(steps, spacing)
    rb = respaced_betas(base, kept)
    np.testing.assert_allclose(np.cumprod(1 - rb), np.cumprod(1 - base)[kept], rtol=0, atol=1e-12)
    d = Diffusion.from_config({"diffusion_steps": steps, "timestep_respacing": spacing, "noise_schedule": schedule,
                               "learn_sigma": True})
    assert d.timesteps == kept and d.num_steps == len(kept)
    np.testing.assert_array_equal(d.betas, rb)


def test_camus_respacing_first_steps():
    d = Diffusion.from_config(ModelConfig())  # 4000 linear steps kept at 250
    assert d.num_steps == 250 and d.timesteps[0] == 0 and d.timesteps[-1] == 3999
    assert d.betas[0] == pytest.approx(2.5e-5, rel=1e-12)  # the first kept step is the first step


def test_posterior_quantities_closed_form():
    d = Diffusion.from_config(SMALL)
    ac, acp, b = d.alphas_cumprod, d.alphas_cumprod_prev, d.betas
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == pytest.approx(math.log(d.posterior_variance[1]), abs=1e-12)
    np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(d.posterior_variance[1:]), atol=1e-12)
    assert d.posterior_mean_coef1[0] == pytest.approx(1.0, abs=1e-12)
    assert d.posterior_mean_coef2[0] == pytest.approx(0.0, abs=1e-12)
    # with no noise in x_t the posterior mean is sqrt(alpha_bar_{t-1}) x0
    np.testing.assert_allclose(d.posterior_mean_coef1 + d.posterior_mean_coef2 * np.sqrt(ac), np.sqrt(acp),
                               atol=1e-12)
    assert (d.posterior_variance[1:] < b[1:]).all()
    np.testing.assert_allclose(d.posterior_variance, b * (1 - acp) / (1 - ac), atol=1e-15)


def test_learned_range_variance_and_xstart():
    d = Diffusion.from_config(SMALL)
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-0.9, 0.9, (2, 3, 4, 4)).astype(np.float32)
    eps = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    for t in (0, 4, 9):
        xt = d.q_sample(x0, t, eps)
        for v, want in ((-1.0, d.posterior_log_variance_clipped[t]), (1.0, math.log(d.betas[t])),
                        (0.0, 0.5 * (math.log(d.betas[t]) + d.posterior_log_variance_clipped[t]))):
            out = np.concatenate([eps, np.full_like(eps, v)], axis=1)
            mean, log_var, pred = d.p_mean_variance(out, xt, t)
            np.testing.assert_allclose(log_var, want, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(pred, x0, atol=2e-4)  # exact eps gives x0 back (float32)
        big = np.concatenate([eps + 100.0, np.zeros_like(eps)], axis=1)
        _, _, pred = d.p_mean_variance(big, xt, t)
        assert pred.min() >= -1.0 and pred.max() <= 1.0
    with pytest.raises(ValueError, match="expected"):
        d.p_mean_variance(np.zeros((2, 3, 4, 4), np.float32), xt, 1)


def test_fixed_variance_three_channel_models():
    cfg = SMALL.replace(learn_sigma=False)
    d = Diffusion.from_config(cfg)
    x = np.ones((1, 3, 2, 2), np.float32)
    _, log_var, _ = d.p_mean_variance(np.zeros_like(x), x, 5)
    np.testing.assert_allclose(log_var, math.log(d.betas[5]), rtol=1e-6)
    _, log_var, _ = d.p_mean_variance(np.zeros_like(x), x, 0)
    np.testing.assert_allclose(log_var, math.log(d.posterior_variance[1]), rtol=1e-6)
    small = Diffusion.from_config(cfg, fixed_variance="small")
    _, log_var, _ = small.p_mean_variance(np.zeros_like(x), x, 5)
    np.testing.assert_allclose(log_var, d.posterior_log_variance_clipped[5], rtol=1e-6)


def test_forward_step_and_q_sample_agree_in_distribution():
    d = Diffusion.from_config(SMALL)
    # two single steps of forward noising compose to alpha_bar ratios: check the means exactly
    x = np.ones((1, 3, 2, 2), np.float32)
    z = np.zeros_like(x)
    two = d.forward_step(d.forward_step(x, 4, z), 5, z)
    np.testing.assert_allclose(two, math.sqrt(d.alphas_cumprod[5] / d.alphas_cumprod[3]), rtol=1e-6)


# ---- RePaint's jump schedule -------------------------------------------------------------------
def test_jump_schedule_small_example():
    assert jump_schedule(6, jump_length=2, jump_n_sample=2) == [5, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]


def test_jump_schedule_without_jumps_is_the_descent():
    assert jump_schedule(10, 10, 10) == descent_schedule(10) == list(range(9, -2, -1))
    assert jump_schedule(7, 2, 1) == descent_schedule(7)


@pytest.mark.parametrize("t_T,jl,jn", [(6, 2, 2), (10, 3, 4), (25, 5, 3), (250, 10, 10), (12, 1, 3), (5, 4, 2)])
def test_jump_schedule_properties(t_T, jl, jn):
    ts = jump_schedule(t_T, jl, jn)
    points = list(range(0, t_T - jl, jl))
    assert ts[0] == t_T - 1 and ts[-2:] == [0, -1]
    assert all(abs(a - b) == 1 for a, b in zip(ts[:-1], ts[1:]))
    assert max(ts) <= t_T - 1 and min(ts) == -1
    assert len(ts) == t_T + 1 + len(points) * (jn - 1) * 2 * jl
    assert count_model_calls(ts) == t_T + len(points) * (jn - 1) * jl
    turns = [ts[i] for i in range(1, len(ts) - 1) if ts[i - 1] > ts[i] < ts[i + 1]]
    assert sorted(turns) == sorted(p for p in points for _ in range(jn - 1))


def test_jump_schedule_paper_setting_counts():
    ts = jump_schedule(250, 10, 10)
    assert count_model_calls(ts) == 2410 and len(ts) == 4571


@pytest.mark.parametrize("args", [(0, 10, 10), (10, 0, 10), (10, 10, 0), (10.0, 2, 2), (True, 2, 2)])
def test_jump_schedule_rejects_bad_arguments(args):
    with pytest.raises(ValueError, match="positive integer"):
        jump_schedule(*args)


# ---- the loops ---------------------------------------------------------------------------------
def test_ddpm_recovers_a_point_mass():
    d = Diffusion.from_config(SMALL)
    c = np.linspace(-0.8, 0.8, 3 * 8 * 8, dtype=np.float32).reshape(1, 3, 8, 8)
    x = ddpm(PointMass(d, c), d, c.shape, noise=GeneratorNoise(0))
    np.testing.assert_allclose(x, c, atol=1e-4)


def test_repaint_recovers_a_point_mass_and_draws_in_order():
    d = Diffusion.from_config(SMALL)
    c = np.full((1, 3, 8, 8), 0.25, np.float32)
    gt = np.full_like(c, 0.25)
    mask = np.zeros((1, 1, 8, 8), np.float32)
    mask[..., :4] = 1
    noise = RecordingNoise(GeneratorNoise(5))
    model = PointMass(d, c)
    x = repaint(model, d, gt, mask, noise=noise, jump_length=3, jump_n_sample=2)
    np.testing.assert_allclose(x, c, atol=1e-4)
    ts = jump_schedule(10, 3, 2)
    calls = count_model_calls(ts)
    ups = len(ts) - 1 - calls
    assert len(model.inputs) == calls
    assert [t for _, t in model.inputs] == [a for a, b in zip(ts[:-1], ts[1:]) if b < a]
    # start, then per call step noise (+ ground-truth noise after the first call), one per step up
    assert len(noise.draws) == 1 + calls + (calls - 1) + ups


def test_known_pixels_are_the_noised_ground_truth():
    d = Diffusion.from_config(SMALL)
    rng = np.random.default_rng(2)
    gt = rng.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    mask = np.zeros((1, 1, 8, 8), np.float32)
    mask[..., 2:6, 2:6] = 1
    model = PointMass(d, np.zeros_like(gt))
    repaint(model, d, gt, mask, noise=ZeroNoise(), jump_length=3, jump_n_sample=2)
    known = np.broadcast_to(mask, gt.shape).astype(bool)
    first_x, _ = model.inputs[0]
    assert not first_x.any()  # the first call sees the start image untouched (as RePaint does)
    for x, t in model.inputs[1:]:
        np.testing.assert_allclose(x[known], (d.sqrt_alphas_cumprod[t] * gt)[known], rtol=1e-6, atol=1e-7)
    # without injection the known region is whatever the chain carries: with zero noise and a
    # zero point mass that is zero
    model = PointMass(d, np.zeros_like(gt))
    repaint(model, d, gt, mask, noise=ZeroNoise(), jump_length=3, jump_n_sample=2, inpa_inj_sched_prev=False)
    assert all(not x.any() for x, _ in model.inputs)


def test_same_seed_same_image_and_replayed_noise():
    d = Diffusion.from_config(SMALL)
    model = _numpy_table_model(SMALL)
    gt = np.zeros((1, 3, 8, 8), np.float32)
    mask = np.zeros((1, 1, 8, 8), np.float32)
    mask[..., :3] = 1
    run = lambda noise: repaint(model, d, gt, mask, noise=noise, jump_length=2, jump_n_sample=3)  # noqa: E731
    a, b, c = run(GeneratorNoise(7)), run(GeneratorNoise(7)), run(GeneratorNoise(8))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.1
    rec = RecordingNoise(GeneratorNoise(7))
    np.testing.assert_array_equal(run(rec), a)
    replay = ReplayNoise(rec.draws)
    np.testing.assert_array_equal(run(replay), a)
    assert replay.remaining == 0
    with pytest.raises(ValueError, match="exhausted"):
        run(ReplayNoise(rec.draws[:-1]))


def test_loop_rejects_bad_schedules():
    d = Diffusion.from_config(SMALL)
    model = _numpy_table_model(SMALL)
    for times in ([9, 8, 7], [9, 7, -1], [10] + descent_schedule(10), [0, 1, 0, -1]):
        with pytest.raises(ValueError):
            sample_loop(model, d, times, (1, 3, 8, 8), noise=ZeroNoise())


def test_batch_of_two_matches_per_image_runs_on_the_point_mass():
    d = Diffusion.from_config(SMALL)
    c = np.stack([np.full((3, 8, 8), -0.5), np.full((3, 8, 8), 0.5)]).astype(np.float32)
    x = ddpm(PointMass(d, c), d, c.shape, noise=GeneratorNoise(0))
    np.testing.assert_allclose(x, c, atol=1e-4)


def _numpy_table_model(cfg):
    rng = np.random.default_rng(0)
    n = len(respaced(cfg.diffusion_steps, cfg.timestep_respacing))
    a = rng.uniform(0.5, 1.5, (n, 6)).astype(np.float32)

    def model(x, t_index):
        return np.tanh(np.concatenate([x, x], axis=1) * a[t_index][:, :, None, None])

    return model


# ---- the ONNX adapter --------------------------------------------------------------------------
def test_onnx_denoiser_reads_metadata_and_matches_the_function(fixture_onnx):
    den = OnnxDenoiser(fixture_onnx.path, threads=1)
    assert den.image_size == 8 and den.timesteps == respaced(100, "10") and den.config["diffusion_steps"] == 100
    assert den.diffusion.num_steps == 10 and den.diffusion.learn_sigma
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    t = np.array([0, 9], dtype=np.int64)
    out = den(x, t)
    assert out.shape == (2, 6, 8, 8) and out.dtype == np.float32 and den.calls == 1
    np.testing.assert_allclose(out, fixture_onnx(x, t), rtol=0, atol=1e-6)


def test_onnx_loop_matches_the_numpy_loop(fixture_onnx):
    den = OnnxDenoiser(fixture_onnx.path, threads=1)
    d = den.diffusion
    gt = np.random.default_rng(3).uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    mask = np.zeros((1, 1, 8, 8), np.float32)
    mask[..., 4:] = 1
    a = repaint(den, d, gt, mask, noise=GeneratorNoise(1), jump_length=3, jump_n_sample=2)
    b = repaint(fixture_onnx, d, gt, mask, noise=GeneratorNoise(1), jump_length=3, jump_n_sample=2)
    assert np.abs(a - b).max() < 1e-5


def test_onnx_denoiser_static_batch_runs_images_one_by_one(tmp_path):
    fx = TableFixture(tmp_path / "static.onnx", SMALL, static_batch=1)
    den = OnnxDenoiser(fx.path, threads=1)
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    t = np.array([1, 2, 3], np.int64)
    np.testing.assert_allclose(den(x, t), fx(x, t), atol=1e-6)
    assert den.calls == 3


def test_onnx_denoiser_three_channel_model(tmp_path):
    cfg = SMALL.replace(learn_sigma=False)
    fx = TableFixture(tmp_path / "three.onnx", cfg)
    den = OnnxDenoiser(fx.path, threads=1)
    assert not den.diffusion.learn_sigma
    x = ddpm(den, den.diffusion, (1, 3, 8, 8), noise=GeneratorNoise(0))
    assert x.shape == (1, 3, 8, 8) and np.isfinite(x).all()


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda p: p.write_bytes(b"not onnx at all"), "not a readable ONNX model"),
        (lambda p: TableFixture(p, SMALL, mode=None), "not an fxpass model (no fxpass.mode"),
        (lambda p: TableFixture(p, SMALL, mode="fixed"), "fxpass.mode is 'fixed'; this needs a table-mode model"),
        (lambda p: TableFixture(p, SMALL, drop_keys=("fxpass.config",)), "no fxpass.config metadata"),
        (lambda p: TableFixture(p, SMALL, timesteps=[0, 1, 2]), "fxpass.timesteps (3 steps) does not match"),
        (lambda p: TableFixture(p, SMALL, input_names=("image", "t_index")), "inputs are ['image', 't_index']"),
    ],
)
def test_onnx_denoiser_errors_name_the_file(tmp_path, build, message):
    path = tmp_path / "m.onnx"
    build(path)
    with pytest.raises(FxpassError) as err:
        OnnxDenoiser(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_onnx_denoiser_missing_file(tmp_path):
    with pytest.raises(FxpassError, match=r"nope\.onnx: no such file"):
        OnnxDenoiser(tmp_path / "nope.onnx")


# ---- the CLI -----------------------------------------------------------------------------------
def _sample(capsys, *args):
    rc = main(["sample", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_sample_writes_a_deterministic_png(tmp_path, capsys, fixture_onnx, images):
    from PIL import Image

    img, mask = images
    outs = []
    for seed, name in ((3, "a.png"), (3, "b.png"), (4, "c.png")):
        out = tmp_path / name
        rc, stdout, _ = _sample(capsys, fixture_onnx.path, "--image", img, "--mask", mask, "-o", out,
                                "--seed", seed, "--jump-length", 3, "--jump-n-sample", 2)
        assert rc == 0 and f"wrote {out}: RePaint" in stdout and "19 model calls" in stdout
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
    with Image.open(tmp_path / "a.png") as result:
        assert result.size == (8, 8) and result.mode == "RGB"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_cli_sample_ddpm_needs_no_image(tmp_path, capsys, fixture_onnx):
    out = tmp_path / "gen.png"
    rc, stdout, _ = _sample(capsys, fixture_onnx.path, "--ddpm", "-o", out)
    assert rc == 0 and out.is_file() and "DDPM generation over 10 steps, 10 model calls" in stdout


def test_cli_sample_accepts_rgb_and_16_bit_images(tmp_path, capsys, fixture_onnx, images):
    _, mask = images
    rgb = _png(tmp_path / "rgb.png", np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    deep = _png(tmp_path / "deep.png", (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000))
    for img in (rgb, deep):
        out = tmp_path / f"out-{img.name}"
        rc, _, err = _sample(capsys, fixture_onnx.path, "--image", img, "--mask", mask, "-o", out)
        assert rc == 0, err
        assert out.is_file()


def test_image_and_mask_loading_scales(tmp_path):
    from fxpass.images import load_image, load_mask

    gray = np.array([[0, 255], [128, 64]], dtype=np.uint8)
    x = load_image(_png(tmp_path / "g.png", gray), 2)
    assert x.shape == (1, 3, 2, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], -1.0) and np.testing.assert_allclose(x[0, :, 0, 1], 1.0)
    np.testing.assert_allclose(x[0, 1, 1, 0], 128 / 127.5 - 1, atol=1e-7)
    deep = np.array([[0, 65535], [32768, 0]], dtype=np.uint16)
    np.testing.assert_allclose(load_image(_png(tmp_path / "d.png", deep), 2)[0, 0, 0, 1], 1.0, atol=1e-7)
    m = load_mask(_png(tmp_path / "m.png", np.array([[255, 0], [200, 100]], dtype=np.uint8)), 2)
    assert m.shape == (1, 1, 2, 2)
    np.testing.assert_array_equal(m[0, 0], [[1, 0], [1, 0]])


def _bad_cases(tmp_path, fixture_onnx, images):
    img, mask = images
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    big = _png(tmp_path / "big.png", np.zeros((16, 8), np.uint8))
    white = _png(tmp_path / "white.png", np.full((8, 8), 255, np.uint8))
    black = _png(tmp_path / "black.png", np.zeros((8, 8), np.uint8))
    fixed = TableFixture(tmp_path / "fixed.onnx", SMALL, mode="fixed").path
    plain = TableFixture(tmp_path / "plain.onnx", SMALL, mode=None).path
    model = fixture_onnx.path
    missing = tmp_path / "missing.png"
    int32 = tmp_path / "int32.tif"
    from PIL import Image

    Image.fromarray(np.full((8, 8), 100000, np.int32), mode="I").save(int32)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (30000, 30000)).save(bomb)  # 900 Mpx of one bit: a few KiB on disk
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    return [
        ([model, "--image", int32, "--mask", mask], f"{int32}: image has 32-bit integer pixels"),
        ([model, "--image", bomb, "--mask", mask], f"{bomb}: image has more pixels than fxpass opens"),
        ([model, "--image", img, "--mask", bomb], f"{bomb}: mask has more pixels than fxpass opens"),
        ([model, "--image", fifo, "--mask", mask], f"{fifo}: not a regular file"),
        ([model, "--image", img, "--mask", mask, "--jump-length", 1, "--jump-n-sample", 100000000],
         "sample: this schedule makes 900,000,001 model calls"),
        ([model, "--image", missing, "--mask", mask], f"{missing}: no such file"),
        ([model, "--image", img, "--mask", missing], f"{missing}: no such file"),
        ([model, "--image", text, "--mask", mask], f"{text}: not an image file"),
        ([model, "--image", img, "--mask", text], f"{text}: not an image file"),
        ([model, "--image", big, "--mask", mask], f"{big}: image is 8x16 pixels, the model takes 8x8"),
        ([model, "--image", img, "--mask", big], f"{big}: mask is 8x16 pixels, the model takes 8x8"),
        ([model, "--image", img, "--mask", black], f"{black}: mask has no known (white) pixels"),
        ([model, "--image", img, "--mask", white], f"{white}: mask has no unknown (black) pixels"),
        ([tmp_path / "none.onnx", "--image", img, "--mask", mask], f"{tmp_path / 'none.onnx'}: no such file"),
        ([text, "--image", img, "--mask", mask], f"{text}: not a readable ONNX model"),
        ([fixed, "--image", img, "--mask", mask], f"{fixed}: metadata fxpass.mode is 'fixed'"),
        ([plain, "--image", img, "--mask", mask], f"{plain}: not an fxpass model"),
        ([model, "--image", img, "--mask", mask, "--t-T", 11], f"{model}: --t-T 11 is more than the model's 10"),
        ([model, "--image", img], "sample: --image IMG.png and --mask MASK.png are required"),
    ]


def test_cli_sample_bad_inputs_one_line_nonzero_no_output(tmp_path, capsys, fixture_onnx, images):
    for args, line in _bad_cases(tmp_path, fixture_onnx, images):
        out = tmp_path / "result.png"
        rc, stdout, err = _sample(capsys, *args, "-o", out)
        assert rc != 0, args
        assert err.startswith(f"fxpass: error: {line}"), (args, err)
        assert err.count("\n") == 1 and "Traceback" not in err
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".result.png")]


def test_cli_sample_output_directory_missing(tmp_path, capsys, fixture_onnx, images):
    img, mask = images
    out = tmp_path / "no" / "such" / "dir.png"
    rc, _, err = _sample(capsys, fixture_onnx.path, "--image", img, "--mask", mask, "-o", out)
    assert rc != 0 and err == f"fxpass: error: {out}: directory {out.parent} does not exist\n"


def test_cli_sample_keeps_old_output_on_failure(tmp_path, capsys, fixture_onnx, images):
    img, _ = images
    out = tmp_path / "result.png"
    out.write_bytes(b"previous")
    white = _png(tmp_path / "white.png", np.full((8, 8), 255, np.uint8))
    rc, _, _ = _sample(capsys, fixture_onnx.path, "--image", img, "--mask", white, "-o", out)
    assert rc != 0 and out.read_bytes() == b"previous"


@pytest.mark.parametrize("flag", ["--jump-length", "--jump-n-sample", "--t-T", "--seed"])
def test_cli_sample_rejects_non_positive_numbers(tmp_path, capsys, fixture_onnx, flag):
    with pytest.raises(SystemExit) as exc:
        main(["sample", str(fixture_onnx.path), "--ddpm", "-o", str(tmp_path / "o.png"), flag, "-1"])
    assert exc.value.code == 2
    assert "expected a" in capsys.readouterr().err


# ---- the sample path stays torch-free -----------------------------------------------------------
def test_sample_path_does_not_import_torch(tmp_path, fixture_onnx, images):
    img, mask = images
    out = tmp_path / "torchfree.png"
    args = [str(fixture_onnx.path), "--image", str(img), "--mask", str(mask), "-o", str(out), "--jump-length", "3",
            "--jump-n-sample", "2"]
    assert sample_in_a_fresh_process(args, "onnxruntime") == "torch-free"
    assert out.is_file()


# ---- ONNX (fxpass.lower) against eager PyTorch, same noise ---------------------------------------
class EagerDenoiser:
    """The eager U-Net behind the sampler's interface: t_index -> the schedule's timestep values."""

    def __init__(self, model, cfg: ModelConfig):
        import torch

        from fxpass.schedule import model_timesteps

        self.torch, self.model = torch, model.eval()
        kept = respaced(cfg.diffusion_steps, cfg.timestep_respacing)
        self.timesteps = torch.tensor(model_timesteps(cfg.diffusion_steps, kept, cfg.rescale_timesteps))

    def __call__(self, x, t_index):
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.from_numpy(np.ascontiguousarray(x)), self.timesteps[torch.from_numpy(t_index)])
        return out.float().numpy()


EQUIV = ModelConfig(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16",
                    diffusion_steps=100, timestep_respacing="10", use_fp16=False)


def _lowered_small_model(tmp_path, model, cfg):
    """``fxpass.lower`` on the small model (table mode, the config's schedule in its metadata)."""
    import onnx

    import fxpass

    proto = fxpass.lower(model, config=cfg)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["fxpass.config"])["timestep_respacing"] == cfg.timestep_respacing
    assert json.loads(props["fxpass.timesteps"]) == respaced(cfg.diffusion_steps, cfg.timestep_respacing)
    assert props["fxpass.mode"] == "table"
    path = tmp_path / "small.onnx"
    onnx.save(proto, str(path))
    return path


def test_onnx_and_eager_loops_agree_with_the_same_noise(tmp_path):
    import torch

    from fxpass.checkpoint import init_model

    torch.set_num_threads(1)
    cfg = EQUIV
    model = init_model(cfg, seed=0)
    path = _lowered_small_model(tmp_path, model, cfg)
    onnx_model = OnnxDenoiser(path, threads=1)
    eager = EagerDenoiser(model, cfg)
    d = Diffusion.from_config(cfg)
    assert onnx_model.diffusion.timesteps == d.timesteps
    np.testing.assert_array_equal(onnx_model.diffusion.betas, d.betas)

    rng = np.random.default_rng(0)
    gt = rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    mask = np.zeros((1, 1, 32, 32), np.float32)
    mask[..., :, :16] = 1
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    t = np.array([5], np.int64)
    assert np.abs(onnx_model(x, t) - eager(x, t)).max() < 1e-4  # one call first: a clearer failure

    recorded = RecordingNoise(GeneratorNoise(0))
    a = repaint(onnx_model, onnx_model.diffusion, gt, mask, noise=recorded, jump_length=3, jump_n_sample=2)
    b = repaint(eager, d, gt, mask, noise=ReplayNoise(recorded.draws), jump_length=3, jump_n_sample=2)
    assert np.abs(a - b).max() < 1e-3
    recorded = RecordingNoise(GeneratorNoise(1))
    a = ddpm(onnx_model, onnx_model.diffusion, (1, 3, 32, 32), noise=recorded)
    b = ddpm(eager, d, (1, 3, 32, 32), noise=ReplayNoise(recorded.draws))
    assert np.abs(a - b).max() < 1e-3


@pytest.mark.slow
def test_camus_onnx_and_eager_repaint_agree(camus_seed0):
    """CAMUS config: a short RePaint run (t_T 4, jumps) on the lowered model and on eager PyTorch."""
    from fxpass.checkpoint import load_model
    from fxpass.config import CAMUS

    ckpt, path, _ = camus_seed0  # fxpass init --seed 0 and fxpass lower (conftest)
    model = load_model(ckpt, CAMUS)
    onnx_model = OnnxDenoiser(path)
    eager = EagerDenoiser(model, CAMUS)
    rng = np.random.default_rng(0)
    gt = rng.uniform(-1, 1, (1, 3, 256, 256)).astype(np.float32)
    mask = np.zeros((1, 1, 256, 256), np.float32)
    mask[..., :, :128] = 1
    recorded = RecordingNoise(GeneratorNoise(0))
    a = repaint(onnx_model, onnx_model.diffusion, gt, mask, noise=recorded, t_T=4, jump_length=2, jump_n_sample=2)
    b = repaint(eager, Diffusion.from_config(CAMUS), gt, mask, noise=ReplayNoise(recorded.draws), t_T=4,
                jump_length=2, jump_n_sample=2)
    assert np.abs(a - b).max() < 1e-3
