"""fxpass.samplers: the plan/step contract, DDIM (Song et al., ICLR 2021) and DDNM (Wang et al., ICLR 2023)
beside RePaint, their knobs, ``fxpass evaluate``'s record of them and ``fxpass sample --sampler``.

NumPy fakes everywhere but the CLI tests, which run on the tiny lowered model (``tiny_onnx``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from check_helpers import cli, gray_image_and_half_mask, sample_in_a_fresh_process

from fxpass.cli import main
from fxpass.diffusion import Diffusion, base_betas, respaced_betas
from fxpass.errors import FxpassError
from fxpass.sampler import GeneratorNoise, RecordingNoise, ReplayNoise, ddpm, jump_model_calls, jump_schedule
from fxpass.samplers import DDIM, DDNM, MAX_MODEL_CALLS, DiffPIR, Move, RePaint, Settings, run_plan
from fxpass.samplers.ddim import check_eta, skip_levels, skip_plan

SIZE = 8
SHAPE = (1, 3, SIZE, SIZE)


def _diffusion(learn_sigma: bool = True, fixed_variance: str = "large", steps: int = 10) -> Diffusion:
    kept = list(range(0, 100, 100 // steps))
    return Diffusion(respaced_betas(base_betas("linear", 100), kept), timesteps=kept, learn_sigma=learn_sigma,
                     fixed_variance=fixed_variance)


class TableModel:
    """out = tanh(a[t] * x + b[t]) per output channel, recording every call."""

    def __init__(self, diffusion: Diffusion, seed: int = 0):
        rng = np.random.default_rng(seed)
        n, c = diffusion.num_steps, diffusion.out_channels
        self.a = rng.uniform(0.5, 1.5, (n, c)).astype(np.float32)
        self.b = rng.uniform(-0.3, 0.3, (n, c)).astype(np.float32)
        self.diffusion, self.image_size = diffusion, SIZE
        self.calls: list[int] = []

    def __call__(self, x, t_index):
        self.calls.append(int(t_index[0]))
        xx = np.concatenate([x] * (self.a.shape[1] // x.shape[1]), axis=1)
        return np.tanh(xx * self.a[t_index][:, :, None, None] + self.b[t_index][:, :, None, None])


def _case(seed: int = 2):
    rng = np.random.default_rng(seed)
    gt = rng.uniform(-1, 1, SHAPE).astype(np.float32)
    mask = np.zeros((1, 1, SIZE, SIZE), np.float32)
    mask[..., :, : SIZE // 2] = 1
    return gt, mask


SAMPLERS = {
    "repaint": lambda d: RePaint.jumps(d, None, 3, 2),
    "ddim": lambda d: DDIM(d, 6, 0.85),
    "ddim-eta0": lambda d: DDIM(d, None, 0.0),
    "ddnm": lambda d: DDNM(d, 5, 0.85),
    "ddnm-travel": lambda d: DDNM(d, 7, 0.5, travel_length=2, travel_repeat=3),
    "diffpir": lambda d: DiffPIR(d, 5),
    "diffpir-fill-travel": lambda d: DiffPIR(d, 7, 0.4, travel_length=2, travel_repeat=3, init="fill"),
}


# ---- plans ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_steps", [1, 2, 7, 10, 250])
def test_skip_levels_are_evenly_spaced_with_both_ends(num_steps):
    assert skip_levels(num_steps) == list(range(num_steps))
    for steps in range(1, num_steps + 1):
        levels = skip_levels(num_steps, steps)
        assert len(levels) == steps and levels == sorted(set(levels))
        assert levels[-1] == num_steps - 1 and (steps == 1 or levels[0] == 0)
        gaps = np.diff(levels)
        assert steps < 3 or gaps.max() - gaps.min() <= 1
    assert skip_levels(10, 4) == [0, 3, 6, 9]


def test_ddnm_time_travel_is_the_jump_schedule_over_the_levels():
    plan = skip_plan(10, 4, travel_length=1, travel_repeat=2)
    # levels [0, 3, 6, 9]; positions 3 2 1 0 with jumps back one level at positions 0, 1, 2 (once each)
    walk = jump_schedule(4, 1, 2)
    levels = [0, 3, 6, 9]
    assert plan == [Move(levels[a] if a >= 0 else -1, levels[b] if b >= 0 else -1) for a, b in zip(walk[:-1], walk[1:])]
    assert sum(m.call for m in plan) == jump_model_calls(4, 1, 2) == 7
    assert skip_plan(10, None) == [Move(t, t - 1) for t in range(9, -1, -1)]


def test_ddnm_time_travel_below_a_level_travels_only_from_the_least_noisy_levels():
    d = _diffusion(steps=50)
    levels = skip_levels(50, 20)
    everywhere = DDNM(d, 20, 1.0, travel_length=4, travel_repeat=3)
    low = DDNM(d, 20, 1.0, travel_length=4, travel_repeat=3, travel_below=8)
    # jump points every 4th level below 20 - 4: 0, 4, 8, 12 everywhere; 0, 4 below position 8
    assert everywhere.calls == 20 + 4 * 2 * 4 and low.calls == 20 + 2 * 2 * 4 == jump_model_calls(20, 4, 3, 8)
    starts = {m.t for m in low.plan if not m.call}
    assert starts and starts <= set(levels[:8])
    assert {m.t for m in everywhere.plan if not m.call} > starts
    assert DDNM(d, 20, 1.0, travel_length=4, travel_repeat=3, travel_below=100).plan == everywhere.plan
    assert Settings("ddnm", steps=20, travel_length=4, travel_repeat=3, travel_below=8).build(d).plan == low.plan
    with pytest.raises(ValueError, match="--travel-below must be a positive integer, got 0"):
        DDNM(d, 20, 1.0, travel_length=4, travel_repeat=3, travel_below=0)


@pytest.mark.parametrize("name", SAMPLERS)
def test_planned_calls_are_the_calls_the_denoiser_receives(name):
    d = _diffusion()
    sampler = SAMPLERS[name](d)
    model = TableModel(d)
    gt, mask = _case()
    progress = []
    run_plan(sampler, model, SHAPE, noise=GeneratorNoise(0), gt=gt, mask=mask,
             on_step=lambda done, total: progress.append((done, total)))
    assert model.calls == [m.t for m in sampler.plan if m.call]
    assert len(model.calls) == sampler.calls and progress[-1] == (sampler.calls, sampler.calls)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_is_deterministic_for_a_seed(name):
    d = _diffusion()
    gt, mask = _case()

    def run(noise):
        return run_plan(SAMPLERS[name](d), TableModel(d), SHAPE, noise=noise, gt=gt, mask=mask)

    a, b, c = run(GeneratorNoise(7)), run(GeneratorNoise(7)), run(GeneratorNoise(8))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    rec = RecordingNoise(GeneratorNoise(7))
    np.testing.assert_array_equal(run(rec), a)
    replay = ReplayNoise(rec.draws)
    np.testing.assert_array_equal(run(replay), a)
    assert replay.remaining == 0


def test_noise_draws_follow_the_plan():
    d = _diffusion()
    gt, mask = _case()
    for sampler, per_call_after_first in ((DDIM(d, 6), 1), (DDNM(d, 7, travel_length=2, travel_repeat=3), 0)):
        noise = RecordingNoise(GeneratorNoise(0))
        run_plan(sampler, TableModel(d), SHAPE, noise=noise, gt=gt, mask=mask)
        ups = len(sampler.plan) - sampler.calls
        assert len(noise.draws) == 1 + sampler.calls + per_call_after_first * (sampler.calls - 1) + ups


# ---- the maths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_ddim_eta_one_over_every_step_is_ancestral_sampling_with_the_posterior_variance(seed):
    d = _diffusion(learn_sigma=False, fixed_variance="small")
    model = TableModel(d, seed=seed)
    ancestral = ddpm(model, d, (2, 3, SIZE, SIZE), noise=GeneratorNoise(seed))
    ddim = run_plan(DDIM(d, None, eta=1.0), model, (2, 3, SIZE, SIZE), noise=GeneratorNoise(seed))
    np.testing.assert_allclose(ddim, ancestral, atol=1e-5, rtol=0)


class SameStart:
    """The same start image, then draws from ``seed``."""

    def __init__(self, seed: int):
        self.start = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
        self.rest = GeneratorNoise(seed)

    def normal(self, shape):
        start, self.start = self.start, None
        return self.rest.normal(shape) if start is None else start


def test_ddim_eta_zero_is_deterministic_given_the_start():
    d = _diffusion()
    a, b = (run_plan(DDIM(d, 4, eta=0.0), TableModel(d), SHAPE, noise=SameStart(seed)) for seed in (1, 2))
    np.testing.assert_array_equal(a, b)


class RecordingDDNM(DDNM):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.x0s: list[np.ndarray] = []

    def step(self, x, model_out, move, known, z):
        x_next, x0 = super().step(x, model_out, move, known, z)
        self.x0s.append(x0)
        return x_next, x0


@pytest.mark.parametrize("travel", [(1, 1), (2, 3)])
def test_ddnm_keeps_the_known_region_exactly_in_x0_and_the_output(travel):
    d = _diffusion()
    gt, mask = _case()
    sampler = RecordingDDNM(d, 7, 0.85, travel_length=travel[0], travel_repeat=travel[1])
    x = run_plan(sampler, TableModel(d), SHAPE, noise=GeneratorNoise(3), gt=gt, mask=mask)
    known = np.broadcast_to(mask, SHAPE).astype(bool)
    assert len(sampler.x0s) == sampler.calls
    for x0 in sampler.x0s:
        np.testing.assert_array_equal(x0[known], gt[known])
    np.testing.assert_array_equal(x[known], gt[known])
    assert np.isfinite(x).all() and np.abs(x[~known] - gt[~known]).max() > 1e-3


@pytest.mark.parametrize("make", [lambda d: DDNM(d, 5), lambda d: DDNM(d, 6, travel_length=2, travel_repeat=2),
                                  lambda d: DDIM(d, 5), lambda d: DDIM(d, None, 0.0)])
def test_all_known_returns_the_ground_truth(make):
    d = _diffusion()
    gt, _ = _case()
    everything = np.ones((1, 1, SIZE, SIZE), np.float32)
    x = run_plan(make(d), TableModel(d), SHAPE, noise=GeneratorNoise(4), gt=gt, mask=everything)
    np.testing.assert_array_equal(x, gt)


def test_repaint_sampler_is_the_sampler_module_loop():
    from fxpass.sampler import repaint

    d = _diffusion()
    gt, mask = _case()
    model = TableModel(d)
    np.testing.assert_array_equal(
        run_plan(RePaint.jumps(d, 8, 2, 3), model, SHAPE, noise=GeneratorNoise(1), gt=gt, mask=mask),
        repaint(model, d, gt, mask, noise=GeneratorNoise(1), t_T=8, jump_length=2, jump_n_sample=3))


# ---- knobs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("build", "message"), [
    (lambda d: DDIM(d, 11), "--steps 11 is more than the model's 10 respaced steps"),
    (lambda d: DDNM(d, 0), "--steps must be a positive integer, got 0"),
    (lambda d: DDIM(d, -3), "--steps must be a positive integer, got -3"),
    (lambda d: DDIM(d, 5, eta=1.5), r"--eta 1.5 is outside \[0, 1\]"),
    (lambda d: DDNM(d, 5, eta=-0.1), r"--eta -0.1 is outside \[0, 1\]"),
    (lambda d: DDNM(d, 5, eta=float("nan")), r"--eta nan is outside \[0, 1\]"),
    (lambda d: DDNM(d, 5, travel_length=0), "--travel-length must be a positive integer, got 0"),
    (lambda d: DDNM(d, 5, travel_repeat=0), "--travel-repeat must be a positive integer, got 0"),
    (lambda d: DDNM(d, 10, travel_length=1, travel_repeat=200_000), "this schedule makes 1,800,001 model calls"),
    (lambda d: Settings("ddnm", steps=12).build(d), "--steps 12 is more than the model's 10 respaced steps"),
    (lambda d: Settings("repaint", t_T=11).build(d), "--t-T 11 is more than the model's 10 respaced steps"),
])
def test_bad_knobs_are_refused_naming_the_flag(build, message):
    with pytest.raises(ValueError, match=message):
        build(_diffusion())


def test_settings_describe_the_sampler():
    assert Settings().label(10) == "RePaint (t_T 10, jump_length 10, jump_n_sample 10)"
    assert Settings("ddnm", steps=5, travel_length=2, travel_repeat=3).label(10) == \
        "DDNM (steps 5, eta 0.85, travel_length 2, travel_repeat 3)"
    assert Settings("ddim", eta=0.0).knobs(10) == {"steps": 10, "eta": 0.0}
    assert check_eta(1) == 1.0
    with pytest.raises(ValueError, match="--sampler euler"):
        Settings("euler")
    assert 1_800_001 > MAX_MODEL_CALLS


def test_evaluate_records_the_sampler_and_its_calls():
    from fxpass.inpainting import evaluate, fixed_masks

    d = _diffusion()
    images = np.stack([_case(s)[0][0] for s in (1, 2)])
    masks = fixed_masks(SIZE, ("box", "half"), seed=0)
    settings = Settings("ddnm", steps=4, travel_length=1, travel_repeat=2)
    seen = []
    report = evaluate(TableModel(d), images, masks, seed=5, settings=settings,
                      progress=lambda done, total: seen.append((done, total)))
    s = report["settings"]
    assert s["sampler"] == "ddnm" and s["model_calls_per_case"] == 7 == DDNM(d, 4, travel_repeat=2).calls
    assert {k: s[k] for k in ("steps", "eta", "travel_length", "travel_repeat")} == \
        {"steps": 4, "eta": 0.85, "travel_length": 1, "travel_repeat": 2}
    assert s["method"].startswith("DDNM (steps 4") and seen[-1] == (4 * 7, 4 * 7)
    json.dumps(report, allow_nan=False)
    with pytest.raises(FxpassError, match="evaluate: --steps 11 is more than"):
        evaluate(TableModel(d), images, masks, settings=Settings("ddim", steps=11))


# ---- the CLI on the tiny lowered model -------------------------------------------------------------
@pytest.fixture
def tiny_images(tmp_path):
    return gray_image_and_half_mask(tmp_path, 32)


def _sample(capsys, *args):
    return cli(capsys, "sample", *args)


def test_cli_sample_ddnm_writes_a_deterministic_png(tmp_path, capsys, tiny_onnx, tiny_images):
    from PIL import Image

    img, mask = tiny_images
    knobs = ["--sampler", "ddnm", "--steps", 5, "--travel-length", 2, "--travel-repeat", 2]

    def png(seed: int, name: str) -> bytes:
        out = tmp_path / name
        rc, stdout, err = _sample(capsys, tiny_onnx, "--image", img, "--mask", mask, "-o", out, "--seed", seed, *knobs)
        assert rc == 0, err
        assert f"wrote {out}: DDNM (steps 5, eta 0.85, travel_length 2, travel_repeat 2), 9 model calls" in stdout
        return out.read_bytes()

    first, again, other = png(3, "a.png"), png(3, "b.png"), png(4, "c.png")
    assert first == again != other
    with Image.open(tmp_path / "a.png") as result, Image.open(img) as source:
        assert result.size == (32, 32)
        # the known half is the input's, exactly
        np.testing.assert_array_equal(np.asarray(result.convert("L"))[:, :16], np.asarray(source)[:, :16])


def test_cli_sample_ddim_runs(tmp_path, capsys, tiny_onnx, tiny_images):
    img, mask = tiny_images
    out = tmp_path / "ddim.png"
    rc, stdout, err = _sample(capsys, tiny_onnx, "--image", img, "--mask", mask, "-o", out, "--sampler", "ddim",
                              "--steps", 3, "--eta", 0)
    assert rc == 0, err
    assert "DDIM (steps 3, eta 0), 3 model calls" in stdout and out.is_file()


@pytest.mark.parametrize(("args", "line"), [
    (["--sampler", "ddnm", "--steps", "11"], "{model}: --steps 11 is more than the model's 10 respaced steps"),
    (["--sampler", "ddnm", "--travel-repeat", "300000"], "sample: this schedule makes 2,700,001 model calls"),
    (["--sampler", "ddim", "--jump-length", "3"], "--jump-length is for --sampler repaint, not --sampler ddim"),
    (["--steps", "4"], "--steps is for --sampler ddim or ddnm or diffpir, not --sampler repaint"),
    (["--sampler", "ddim", "--travel-length", "2"], "--travel-length is for --sampler ddnm or diffpir, not --sampler ddim"),
])
def test_cli_bad_knobs_one_line_exit_2(tmp_path, capsys, tiny_onnx, tiny_images, args, line):
    img, mask = tiny_images
    out = tmp_path / "o.png"
    rc, _, err = _sample(capsys, tiny_onnx, "--image", img, "--mask", mask, "-o", out, *args)
    assert rc == 2 and err.startswith(f"fxpass: error: {line.format(model=tiny_onnx)}") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize(("flag", "value"), [("--eta", "1.5"), ("--eta", "-0.2"), ("--eta", "x"), ("--steps", "0"),
                                             ("--travel-length", "-1"), ("--travel-repeat", "0")])
@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_cli_refuses_out_of_range_knobs_before_loading(tmp_path, capsys, command, flag, value):
    where = ["-o", str(tmp_path / "o.png")] if command == "sample" else ["--data", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        main([command, str(tmp_path / "none.onnx"), *where, "--sampler", "ddnm", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "expected a" in err


def test_sample_ddnm_path_does_not_import_torch(tmp_path, tiny_onnx, tiny_images):
    img, mask = tiny_images
    out = tmp_path / "torchfree.png"
    args = [str(tiny_onnx), "--image", str(img), "--mask", str(mask), "-o", str(out), "--sampler", "ddnm",
            "--steps", "3"]
    assert sample_in_a_fresh_process(args, "onnxruntime") == "torch-free"
    assert out.is_file()


def test_cli_evaluate_ddnm_writes_the_settings(tmp_path, capsys, tiny_onnx, tiny_images):
    img, _ = tiny_images
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(img.read_bytes())
    out = tmp_path / "report.json"
    rc = main(["evaluate", str(tiny_onnx), "--data", str(data), "-o", str(out), "--masks", "box,half",
               "--sampler", "ddnm", "--steps", "3", "--eta", "0.5"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "DDNM (steps 3, eta 0.5, travel_length 1, travel_repeat 1), seed 0" in captured.out
    settings = json.loads(out.read_text())["settings"]
    assert settings["sampler"] == "ddnm" and settings["model_calls_per_case"] == 3
    assert (settings["steps"], settings["eta"], settings["travel_repeat"]) == (3, 0.5, 1)


def test_cli_generation_with_ddim_needs_no_image(tmp_path, capsys, tiny_onnx):
    out = tmp_path / "gen.png"
    rc, stdout, err = _sample(capsys, tiny_onnx, "--ddpm", "--sampler", "ddim", "--steps", 4, "-o", out)
    assert rc == 0, err
    assert "DDIM (steps 4, eta 0.85) generation, 4 model calls" in stdout and out.is_file()


# ---- --t-T for ddim and ddnm --------------------------------------------------------------------
@pytest.mark.parametrize(("make", "calls"), [
    (lambda d: DDIM(d, 4, t_T=7), 4), (lambda d: DDIM(d, None, t_T=5), 5), (lambda d: DDIM(d, 1, t_T=3), 1),
    (lambda d: DDNM(d, 4, t_T=7, travel_length=1, travel_repeat=2), 7),
    (lambda d: Settings("ddnm", t_T=6, steps=6).build(d), 6), (lambda d: Settings("ddim", t_T=10).build(d), 10),
])
def test_ddim_and_ddnm_start_at_t_T(make, calls):
    d = _diffusion()
    sampler = make(d)
    model = TableModel(d)
    gt, mask = _case()
    run_plan(sampler, model, SHAPE, noise=GeneratorNoise(0), gt=gt, mask=mask)
    top = max(m.t for m in sampler.plan)
    assert sampler.plan[0].t == top == model.calls[0] and sampler.calls == calls == len(model.calls)
    assert top == {4: 6, 5: 4, 1: 2, 7: 6, 6: 5, 10: 9}[calls]
    assert skip_levels(10, 4, t_T=7) == [0, 2, 4, 6] and skip_levels(10, None, t_T=3) == [0, 1, 2]


def test_t_T_over_steps_is_refused_naming_both_flags(tmp_path, capsys, tiny_onnx, tiny_images):
    with pytest.raises(ValueError, match="--steps 6 is more than --t-T 5"):
        DDNM(_diffusion(), 6, t_T=5)
    with pytest.raises(ValueError, match="--t-T 11 is more than the model's 10 respaced steps"):
        Settings("ddim", t_T=11).build(_diffusion())
    assert Settings("ddim", t_T=5).knobs(10) == {"t_T": 5, "steps": 5, "eta": 0.85}
    assert Settings("ddnm", t_T=5, steps=3).label(10).startswith("DDNM (t_T 5, steps 3, eta 0.85")
    img, mask = tiny_images
    out = tmp_path / "o.png"
    for sampler in ("ddim", "ddnm"):
        rc, _, err = _sample(capsys, tiny_onnx, "--image", img, "--mask", mask, "-o", out, "--sampler", sampler,
                             "--t-T", 3, "--steps", 4)
        assert rc == 2 and err == "fxpass: error: --steps 4 is more than --t-T 3\n"
    rc, stdout, err = _sample(capsys, tiny_onnx, "--image", img, "--mask", mask, "-o", out, "--sampler", "ddim",
                              "--t-T", 4, "--steps", 2)
    assert rc == 0, err
    assert "DDIM (t_T 4, steps 2, eta 0.85), 2 model calls" in stdout and out.is_file()


# ---- presets ------------------------------------------------------------------------------------------
def test_presets_start_at_a_fraction_of_the_table_whatever_its_length():
    from fxpass.samplers import PRESETS

    assert PRESETS["paper"].resolved(250) == Settings("repaint", preset="paper")  # every step, jumps 10 x 10
    for name in ("balanced", "fast"):
        preset = PRESETS[name]
        for steps in (50, 100):
            resolved = preset.resolved(steps)
            top = round(preset.start * steps)  # a fraction of the way up the table
            assert resolved.t_T == top and resolved.steps == preset.steps and resolved.start is None
            assert resolved.build(_diffusion(steps=steps)).plan[0].t == top - 1
        small = preset.resolved(10)  # a table shorter than the preset's steps: the steps fit in it
        assert small.t_T == small.steps == round(preset.start * 10)
    assert PRESETS["balanced"].label(50).startswith("balanced: DiffPIR (t_T 25, steps 20, zeta 1")
    assert PRESETS["fast"].label(50).startswith("fast: DiffPIR (t_T 25, steps 13, zeta 1")


def test_presets_are_cheaper_in_that_order():
    from fxpass.samplers import PRESETS

    d = _diffusion(steps=50)
    calls = [PRESETS[name].build(d).calls for name in ("paper", "balanced", "fast")]
    assert calls[0] == 410 and calls[0] >= 5 * calls[1] and calls[0] >= 10 * calls[2], calls


def test_cli_preset_is_the_sampler_it_names(tmp_path, capsys, tiny_onnx, tiny_images):
    img, mask = tiny_images
    base = [tiny_onnx, "--image", img, "--mask", mask, "--seed", 1]
    rc, stdout, err = _sample(capsys, *base, "-o", tmp_path / "p.png", "--preset", "fast")
    assert rc == 0, err
    assert "fast: DiffPIR (t_T 5, steps 5, zeta 1" in stdout
    from fxpass.samplers import PRESETS

    fast = PRESETS["fast"]
    knobs = ["--sampler", "diffpir", "--t-T", 5, "--steps", 5, "--zeta", fast.zeta, "--travel-length",
             fast.travel_length, "--travel-repeat", fast.travel_repeat, "--init", fast.init]
    rc, _, err = _sample(capsys, *base, "-o", tmp_path / "k.png", *knobs)
    assert rc == 0, err
    assert (tmp_path / "p.png").read_bytes() == (tmp_path / "k.png").read_bytes()
    rc, _, err = _sample(capsys, *base, "-o", tmp_path / "d.png")  # no preset: paper, as before
    rc2, _, _ = _sample(capsys, *base, "-o", tmp_path / "q.png", "--preset", "paper")
    assert rc == rc2 == 0 and (tmp_path / "d.png").read_bytes() == (tmp_path / "q.png").read_bytes()


def test_cli_preset_with_a_knob_is_refused_in_one_line(tmp_path, capsys, tiny_onnx, tiny_images):
    img, mask = tiny_images
    rc, _, err = _sample(capsys, tiny_onnx, "--image", img, "--mask", mask, "-o", tmp_path / "x.png",
                         "--preset", "balanced", "--steps", 4)
    assert rc == 2 and err == "fxpass: error: --preset balanced sets the sampler and its knobs: drop --steps\n"
    assert not (tmp_path / "x.png").exists()


def test_evaluate_run_takes_a_preset_name():
    from fxpass.cli.sampling import settings_from_spec
    from fxpass.samplers import PRESETS

    assert settings_from_spec("balanced") == PRESETS["balanced"]
    with pytest.raises(FxpassError, match="unknown sampler 'quick'"):
        settings_from_spec("quick")
