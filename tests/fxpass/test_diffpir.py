"""fxpass.samplers.diffpir: DiffPIR (Zhu et al., CVPRW 2023) with DDNM's time travel and a start from the
known pixels: its update against the paper's formula, the identity with deterministic DDIM at zeta 0, the
known region kept exactly, the fill start, its knobs on the CLI and in preset files.

NumPy fakes (``test_samplers.TableModel``) but for the CLI tests, which run on the tiny lowered model.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from check_helpers import cli, gray_image_and_half_mask
from test_samplers import SHAPE, SIZE, TableModel, _case, _diffusion

from fxpass.errors import FxpassError
from fxpass.sampler import GeneratorNoise, RecordingNoise
from fxpass.samplers import DDIM, DiffPIR, Settings, run_plan
from fxpass.samplers.base import Known
from fxpass.samplers.diffpir import mean_fill


class Recording(DiffPIR):
    """DiffPIR keeping every model input, x0 and next x."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inputs, self.x0s, self.xs = [], [], []

    def model_input(self, x, move, known, noise, first):
        x = super().model_input(x, move, known, noise, first)
        self.inputs.append(x.copy())
        return x

    def step(self, x, model_out, move, known, z):
        x_next, x0 = super().step(x, model_out, move, known, z)
        self.x0s.append(x0)
        self.xs.append(x_next)
        return x_next, x0


@pytest.mark.parametrize("travel", [(1, 1), (2, 3)])
@pytest.mark.parametrize("init", ["noise", "fill"])
def test_known_region_is_exact_in_every_x0_and_the_output(travel, init):
    d = _diffusion()
    gt, mask = _case()
    sampler = Recording(d, 7, travel_length=travel[0], travel_repeat=travel[1], init=init)
    x = run_plan(sampler, TableModel(d), SHAPE, noise=GeneratorNoise(3), gt=gt, mask=mask)
    known = np.broadcast_to(mask, SHAPE).astype(bool)
    assert len(sampler.x0s) == sampler.calls
    for x0 in sampler.x0s:
        np.testing.assert_array_equal(x0[known], gt[known])
    np.testing.assert_array_equal(x, sampler.x0s[-1])
    assert np.isfinite(x).all() and np.abs(x[~known] - gt[~known]).max() > 1e-3


@pytest.mark.parametrize("zeta", [1.0, 0.3])
def test_each_step_is_the_papers_renoising(zeta):
    d = _diffusion()
    gt, mask = _case()
    noise = RecordingNoise(GeneratorNoise(5))
    sampler = Recording(d, 5, zeta)
    run_plan(sampler, TableModel(d), SHAPE, noise=noise, gt=gt, mask=mask)
    draws = noise.draws[1:]  # the start, then one step draw per call (DiffPIR draws nothing else)
    calls = [m for m in sampler.plan if m.call]
    for k, move in enumerate(calls[:-1]):
        x_t, x0, z = sampler.inputs[k], sampler.x0s[k], draws[k]
        ab_t, ab_s = d.alphas_cumprod[move.t], d.alphas_cumprod[move.to]
        eps_hat = (x_t - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        want = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s) * (math.sqrt(1 - zeta) * eps_hat + math.sqrt(zeta) * z)
        np.testing.assert_allclose(sampler.xs[k], want, rtol=0, atol=2e-5)


def test_zeta_zero_generation_is_deterministic_ddim():
    """At zeta 0 and without known pixels, DiffPIR's step is DDIM's with eta 0 (eps re-derived from the
    clipped x0 in both): the same walk from the same start."""
    d = _diffusion()
    a = run_plan(DiffPIR(d, 6, 0.0), TableModel(d), SHAPE, noise=GeneratorNoise(2))
    b = run_plan(DDIM(d, 6, 0.0), TableModel(d), SHAPE, noise=GeneratorNoise(2))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert np.abs(a - run_plan(DiffPIR(d, 6, 1.0), TableModel(d), SHAPE, noise=GeneratorNoise(2))).max() > 1e-2


def test_fill_start_is_the_mean_fill_noised_to_the_top_level():
    d = _diffusion()
    gt, mask = _case()
    noise = RecordingNoise(GeneratorNoise(9))
    sampler = Recording(d, 5, init="fill")
    run_plan(sampler, TableModel(d), SHAPE, noise=noise, gt=gt, mask=mask)
    fill = mean_fill(Known(gt, mask, SHAPE))
    known = np.broadcast_to(mask, SHAPE).astype(bool)
    np.testing.assert_array_equal(fill[known], gt[known])
    colour = gt[:, :, :, : SIZE // 2].mean(axis=(2, 3))  # the known half's mean colour, per channel
    np.testing.assert_allclose(fill[:, :, :, SIZE // 2:], np.broadcast_to(colour[:, :, None, None], (1, 3, SIZE, SIZE // 2)),
                               atol=1e-6)
    ab = d.alphas_cumprod[sampler.plan[0].t]
    np.testing.assert_allclose(sampler.inputs[0], math.sqrt(ab) * fill + math.sqrt(1 - ab) * noise.draws[0], atol=1e-6)
    plain = Recording(d, 5)
    run_plan(plain, TableModel(d), SHAPE, noise=GeneratorNoise(9), gt=gt, mask=mask)
    np.testing.assert_array_equal(plain.inputs[0], noise.draws[0])  # init noise: the draw itself
    generated = Recording(d, 5, init="fill")  # no known pixels: nothing to fill from, pure noise
    run_plan(generated, TableModel(d), SHAPE, noise=GeneratorNoise(9))
    np.testing.assert_array_equal(generated.inputs[0], noise.draws[0])


def test_bad_knobs_are_refused():
    d = _diffusion()
    for zeta in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"--zeta .* is outside \[0, 1\]"):
            DiffPIR(d, 5, zeta)
    with pytest.raises(ValueError, match="--init 'zero': expected one of noise, fill"):
        DiffPIR(d, 5, init="zero")
    gt, _ = _case()
    nothing_known = np.zeros((1, 1, SIZE, SIZE), np.float32)
    with pytest.raises(ValueError, match="no known pixels to start from"):
        run_plan(DiffPIR(d, 5, init="fill"), TableModel(d), SHAPE, noise=GeneratorNoise(0), gt=gt, mask=nothing_known)


def test_settings_build_and_describe_it():
    d = _diffusion()
    s = Settings("diffpir", steps=5, travel_length=2, travel_repeat=2, init="fill")
    assert s.label(10) == "DiffPIR (steps 5, zeta 1, travel_length 2, travel_repeat 2, init fill)"
    assert Settings("diffpir", steps=5).label(10) == "DiffPIR (steps 5, zeta 1, travel_length 1, travel_repeat 1)"
    sampler = s.build(d)
    assert isinstance(sampler, DiffPIR) and sampler.init == "fill" and sampler.calls == DiffPIR(
        d, 5, travel_length=2, travel_repeat=2).calls


# ---- the CLI and preset files on the tiny lowered model ----------------------------------------------
def test_cli_sample_diffpir_is_deterministic(tmp_path, capsys, tiny_onnx):
    img, mask = gray_image_and_half_mask(tmp_path, 32)
    knobs = ["--sampler", "diffpir", "--steps", 4, "--zeta", 0.5, "--init", "fill", "--travel-length", 2,
             "--travel-repeat", 2]

    def png(seed: int, name: str) -> bytes:
        rc, stdout, err = cli(capsys, "sample", tiny_onnx, "--image", img, "--mask", mask, "-o", tmp_path / name,
                              "--seed", seed, *knobs)
        assert rc == 0, err
        assert "DiffPIR (steps 4, zeta 0.5, travel_length 2, travel_repeat 2, init fill), 6 model calls" in stdout
        return (tmp_path / name).read_bytes()

    assert png(1, "a.png") == png(1, "b.png") != png(2, "c.png")


@pytest.mark.parametrize(("args", "line"), [
    (["--sampler", "ddnm", "--zeta", "0.5"], "--zeta is for --sampler diffpir, not --sampler ddnm"),
    (["--sampler", "ddnm", "--init", "fill"], "--init is for --sampler diffpir, not --sampler ddnm"),
    (["--sampler", "diffpir", "--eta", "0.5"], "--eta is for --sampler ddim or ddnm, not --sampler diffpir"),
    (["--sampler", "diffpir", "--init", "zero"], "argument --init: expected one of noise, fill, got 'zero'"),
    (["--sampler", "diffpir", "--zeta", "2"], "argument --zeta: expected a number in [0, 1], got 2"),
])
def test_cli_bad_knobs_are_one_line_exit_2(tmp_path, capsys, tiny_onnx, args, line):
    img, mask = gray_image_and_half_mask(tmp_path, 32)
    out = tmp_path / "o.png"
    try:
        rc, _, err = cli(capsys, "sample", tiny_onnx, "--image", img, "--mask", mask, "-o", out, *args)
    except SystemExit as exc:  # argparse's own refusals
        rc, err = exc.code, capsys.readouterr().err
    assert rc == 2 and line in err and not out.exists()


def test_preset_files_and_run_specs_take_its_knobs(tmp_path):
    from fxpass.cli.sampling import settings_from_spec
    from fxpass.tune import read_preset

    assert settings_from_spec("diffpir:steps=5,zeta=0.5,init=fill") == Settings("diffpir", steps=5, zeta=0.5,
                                                                                init="fill")
    with pytest.raises(FxpassError, match="argument --init: expected one of noise, fill"):
        settings_from_spec("diffpir:init=zero")
    path = tmp_path / "p.json"
    doc = {"fxpass_preset": 1, "name": "mine", "settings": {"sampler": "diffpir", "start": 0.5, "steps": 9,
                                                            "zeta": 1.0, "init": "fill"}}
    path.write_text(json.dumps(doc))
    assert read_preset(path) == Settings("diffpir", start=0.5, steps=9, zeta=1.0, init="fill", preset="mine")
    for key, value, message in (("init", "zero", "expected one of noise, fill"), ("zeta", 3, r"expected a number in \[0, 1\]"),
                                ("eta", 0.5, "is for sampler ddim or ddnm, not diffpir")):
        path.write_text(json.dumps({**doc, "settings": {**doc["settings"], key: value}}))
        with pytest.raises(FxpassError, match=message):
            read_preset(path)
