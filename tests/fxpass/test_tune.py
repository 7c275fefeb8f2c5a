"""Preset files and ``fxpass evaluate --tune`` (:mod:`fxpass.tune`): the search on NumPy fakes (the grid, the
budget, determinism, a deep-cache model's cost), and on the tiny lowered model one tuning run whose preset
``sample`` and ``evaluate`` read back; every refusal, and hostile preset files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from check_helpers import cli, gray_image_and_half_mask
from test_samplers import SIZE, TableModel, _case, _diffusion

from fxpass import tune
from fxpass.errors import FxpassError
from fxpass.inpainting import fixed_masks
from fxpass.samplers import Settings

BUDGET = 12
KEYS = ("start", "steps", "eta", "travel_length", "travel_repeat", "cache_interval")


# ---- the candidates and the search, on NumPy fakes ---------------------------------------------------
def test_candidates_spend_the_budget_and_no_more():
    d = _diffusion(steps=10)
    found = tune.candidates(d, BUDGET)
    assert 1 < len(found) <= tune.MAX_CANDIDATES
    plans = set()
    for c in found:
        s = c.settings
        method = {k: getattr(s, k) for k in ("sampler", "eta", "init")}
        assert s.start in tune.STARTS and s.cache_interval == 1
        assert any(all(method[k] == v for k, v in m.items()) for m in tune.METHODS)
        assert c.calls == c.cost == s.build(d).calls and BUDGET / 2 <= c.cost <= BUDGET
        top = s.resolved(10).t_T
        assert s.steps == top or Settings(**{**s.__dict__, "steps": s.steps + 1}).build(d).calls > BUDGET
        plans.add((tuple(s.build(d).plan), s.sampler, s.eta))
    assert len(plans) == len(found)  # no two candidates walk the same plan
    assert tune.candidates(d, BUDGET) == found  # a fixed grid
    assert {c.settings.sampler for c in found} == {"ddnm", "diffpir"}


def test_a_budget_below_the_cheapest_candidate_is_refused():
    with pytest.raises(FxpassError, match=r"--budget 1: the cheapest candidate, DDNM \(t_T 4, steps 2.*costs 2 "
                                               r"model calls per image; give at least 2"):
        tune.candidates(_diffusion(steps=10), 1)


def test_a_deep_cache_model_counts_shallow_calls_at_the_latency_ratio():
    d = _diffusion(steps=10)
    found = tune.candidates(d, BUDGET, ratio=0.25)
    assert {c.settings.cache_interval for c in found} == {1, 2, 3}
    for c in found:
        full = math.ceil(c.calls / c.settings.cache_interval)
        assert c.cost == pytest.approx(full + (c.calls - full) * 0.25) and c.cost <= BUDGET
    assert max(c.calls for c in found) > BUDGET  # shallow calls are cheaper than full ones
    assert tune.cost_of(10, 3, 0.25) == 4 + 6 * 0.25 and tune.cost_of(10, 1, 0.25) == 10


class CachedTableModel(TableModel):
    """A fake deep-cache model: a full call also returns a feature, a shallow call adds a little of it."""

    def full(self, x, t_index):
        out = self(x, t_index)
        return out, np.float32(0.5) * out

    def shallow(self, x, t_index, feature):
        return self(x, t_index) + np.float32(0.01) * feature


def _images(n: int = 6):
    return np.stack([_case(s)[0][0] for s in range(n)]), [f"{i:02d}.png" for i in range(n)]


def _fake_tune(model, ratio=None, seed: int = 3) -> dict:
    images, names = _images()
    found = tune.candidates(model.diffusion, BUDGET, ratio=ratio)
    return tune.tune(model, images, fixed_masks(SIZE, ("box",)), found, budget=BUDGET, name="fake", names=names,
                     seed=seed, ratio=ratio)


def _without_seconds(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    del doc["measured"]["held_apart"]["model_seconds_per_image"]
    return doc


def test_the_search_is_deterministic_and_halves():
    d = _diffusion(steps=10)
    first = _fake_tune(TableModel(d))
    assert _without_seconds(_fake_tune(TableModel(d))) == _without_seconds(first)
    candidates = first["tuning"]["candidates"]
    stages = [c["stage"] for c in candidates]
    assert stages == sorted(stages, reverse=True) and stages.count(2) == math.ceil(len(candidates) / 3)
    assert {c["cases"] for c in candidates if c["stage"] == 2} == {3} and {c["cases"] for c in candidates
                                                                           if c["stage"] == 1} == {1}
    best = [(-c["psnr"], -c["ssim"]) for c in candidates if c["stage"] == 2]
    assert best == sorted(best) and first["settings"] == candidates[0]["settings"]
    assert tune.preset_from(first, "fake.json") == Settings(**first["settings"], preset="fake")


def test_the_search_on_a_deep_cache_model_records_the_ratio():
    doc = _fake_tune(CachedTableModel(_diffusion(steps=10)), ratio=0.25)
    assert doc["tuning"]["shallow_to_full"] == 0.25 and "shallow calls x 0.25" in doc["tuning"]["cost"]
    assert all(c["cost"] <= BUDGET for c in doc["tuning"]["candidates"])
    assert any(c["settings"]["cache_interval"] > 1 for c in doc["tuning"]["candidates"])


def test_shallow_ratio_is_a_rounded_positive_number():
    ratio = tune.shallow_ratio(CachedTableModel(_diffusion(steps=10)), calls=3)
    assert ratio >= 0.01 and ratio == round(ratio, 2)


# ---- one tuning run on the tiny lowered model ------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("tune-data")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_onnx, data):
    """``evaluate --tune --budget 12`` on 6 images, one mask: (stdout, the preset path, its JSON)."""
    from fxpass.cli import main

    out = tmp_path_factory.mktemp("tuned") / "mine.json"
    rc = main(["evaluate", str(tiny_onnx), "--data", str(data), "--masks", "box", "--seed", "1", "--tune",
               "--budget", str(BUDGET), "-o", str(out)])
    assert rc == 0
    return out, json.loads(out.read_text())


def test_tune_writes_a_preset_within_the_budget(tuned):
    path, doc = tuned
    assert doc["fxpass_preset"] == 1 and doc["name"] == "mine" and doc["budget"] == BUDGET
    assert doc["model"] == {"file": "tiny.onnx", "steps": 10, "precision": "fp32"}
    assert doc["note"] == "chosen on the tuning images, measured once on the held-apart ones"
    winner = doc["tuning"]["candidates"][0]
    assert winner["rank"] == 1 and winner["stage"] == 2 and winner["settings"] == doc["settings"]
    assert all(c["calls"] <= BUDGET and c["cost"] <= BUDGET for c in doc["tuning"]["candidates"])
    held = doc["measured"]["held_apart"]
    assert held["calls_per_image"] == winner["calls"] <= BUDGET and held["seed"] == doc["tuning"]["seed"] == 1
    assert held["model_seconds_per_image"] > 0 and np.isfinite([held["psnr"], held["ssim"]]).all()
    assert tune.read_preset(path) == Settings(**doc["settings"], preset="mine")  # the settings round-trip


def test_a_second_run_with_the_same_seed_chooses_the_same(tmp_path, capsys, tiny_onnx, data, tuned):
    _, doc = tuned
    out = tmp_path / "again.json"
    rc, stdout, err = cli(capsys, "evaluate", tiny_onnx, "--data", data, "--masks", "box", "--seed", 1, "--tune",
                          "--budget", BUDGET, "-o", out)
    assert rc == 0, err
    assert f"wrote {out}: preset 'again'" in stdout and "held apart, 3 image(s) x 1 mask(s), seed 1" in stdout
    again = json.loads(out.read_text())
    assert again["settings"] == doc["settings"]
    assert again["tuning"]["candidates"] == doc["tuning"]["candidates"]


def test_the_held_apart_images_are_every_other_one(tuned):
    _, doc = tuned
    tuning, held = doc["tuning"]["images"], doc["measured"]["held_apart"]["images"]
    assert tuning == ["0.png", "2.png", "4.png"] and held == ["1.png", "3.png", "5.png"]
    assert not set(tuning) & set(held)
    assert doc["tuning"]["cases"] == doc["measured"]["held_apart"]["cases"] == 3


def test_sample_reads_the_preset_as_the_flags_it_stands_for(tmp_path, capsys, tiny_onnx, tuned):
    path, doc = tuned
    s = doc["settings"]
    img, mask = gray_image_and_half_mask(tmp_path, 32)
    base = ["sample", tiny_onnx, "--image", img, "--mask", mask, "--seed", 2]
    rc, stdout, err = cli(capsys, *base, "-o", tmp_path / "p.png", "--preset", path)
    assert rc == 0, err
    assert "mine: DDNM (" in stdout
    t_T = min(10, round(s["start"] * 10))
    rc, _, err = cli(capsys, *base, "-o", tmp_path / "k.png", "--sampler", "ddnm", "--t-T", t_T, "--steps",
                     min(s["steps"], t_T), "--eta", s["eta"], "--travel-length", s["travel_length"],
                     "--travel-repeat", s["travel_repeat"])
    assert rc == 0, err
    assert (tmp_path / "p.png").read_bytes() == (tmp_path / "k.png").read_bytes()
    rc, _, err = cli(capsys, *base, "-o", tmp_path / "x.png", "--preset", path, "--steps", 3)
    assert rc == 2 and err == f"fxpass: error: --preset {path} sets the sampler and its knobs: drop --steps\n"
    rc, _, err = cli(capsys, *base, "-o", path, "--preset", path, "--force")  # never over the preset it reads
    assert rc == 2 and "refusing to overwrite an input" in err and json.loads(path.read_text()) == doc


def test_evaluate_reads_the_preset_alone_and_in_a_list(tmp_path, capsys, tiny_onnx, tuned, data):
    path, doc = tuned
    base = ["evaluate", tiny_onnx, "--data", data, "--masks", "box", "--count", 2]
    rc, _, err = cli(capsys, *base, "--preset", path, "-o", tmp_path / "one.json")
    assert rc == 0, err
    report = json.loads((tmp_path / "one.json").read_text())
    assert report["settings"]["method"].startswith("mine: DDNM (")
    assert report["settings"]["model_calls_per_case"] == doc["tuning"]["candidates"][0]["calls"]
    rc, _, err = cli(capsys, *base, "--preset", f"{path},fast", "-o", tmp_path / "two.json")
    assert rc == 0, err
    labels = [r["settings"]["label"] for r in json.loads((tmp_path / "two.json").read_text())["runs"]]
    assert labels[0].startswith("mine: DDNM (") and labels[1].startswith("fast: DiffPIR (")


def test_evaluate_preset_list_is_the_run_comparison(tmp_path, capsys, tiny_onnx, data):
    out = tmp_path / "runs.json"
    rc, stdout, err = cli(capsys, "evaluate", tiny_onnx, "--data", data, "--masks", "box", "--count", 2,
                          "--preset", "paper,fast", "-o", out)
    assert rc == 0, err
    assert "1. paper: RePaint" in stdout and "2. fast: DiffPIR" in stdout
    report = json.loads(out.read_text())
    assert [r["settings"]["label"].partition(":")[0] for r in report["runs"]] == ["paper", "fast"]
    assert [len(r["cases"]) for r in report["runs"]] == [2, 2] and "diff_to_first" in report["summary"][1]
    rc, _, err = cli(capsys, "evaluate", tiny_onnx, "--data", data, "--preset", "paper,fast", "--eta", 1,
                     "-o", tmp_path / "x.json")
    assert rc == 2 and err == "fxpass: error: --preset paper,fast sets the samplers and their knobs: drop --eta\n"


# ---- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "line"), [
    (["--tune", "-o", "{out}"], "--tune needs --budget CALLS: the model calls per image"),
    (["--tune", "--budget", "12"], "--tune needs -o PRESET.json: the model calls per image"),
    (["--tune", "--budget", "12", "-o", "{dir}/p.txt"], "{dir}/p.txt: a preset file's name ends in .json"),
    (["--tune", "--budget", "1", "-o", "{out}"], "--budget 1: the cheapest candidate, DDNM (t_T 4, steps 2"),
    (["--tune", "--budget", "12", "-o", "{out}", "--run", "ddim"], "--tune searches the sampler and its knobs "
                                                                    "itself: drop --run"),
    (["--tune", "--budget", "12", "-o", "{out}", "--preset", "fast"], "--tune searches the sampler and its knobs "
                                                                       "itself: drop --preset"),
    (["--tune", "--budget", "12", "-o", "{out}", "--sampler", "ddnm", "--steps", "3"],
     "--tune searches the sampler and its knobs itself: drop --sampler, --steps"),
    (["--tune", "--budget", "12", "-o", "{out}", "--count", "3"], "{data}: --tune needs at least 4 images (every "
                                                                   "other one is held apart), found 3"),
    (["--budget", "12", "-o", "{out}"], "--budget is the model calls per image that --tune may spend: give --tune"),
])
def test_tune_refusals_one_line_exit_2(tmp_path, capsys, tiny_onnx, data, args, line):
    out = tmp_path / "p.json"
    fill = {"out": out, "dir": tmp_path, "data": data}
    rc, _, err = cli(capsys, "evaluate", tiny_onnx, "--data", data, "--masks", "box",
                     *(a.format(**fill) for a in args))
    assert rc == 2 and err.startswith(f"fxpass: error: {line.format(**fill)}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_tune_never_writes_over_an_existing_file(tmp_path, capsys, tiny_onnx, data):
    out = tmp_path / "p.json"
    out.write_text("keep me")
    rc, _, err = cli(capsys, "evaluate", tiny_onnx, "--data", data, "--tune", "--budget", 12, "-o", out)
    assert rc == 2 and err == f"fxpass: error: {out}: already exists (pass --force to overwrite)\n"
    assert out.read_text() == "keep me"


# ---- hostile preset files ----------------------------------------------------------------------------
GOOD = {"fxpass_preset": 1, "name": "mine", "settings": {"sampler": "ddnm", "start": 0.5, "steps": 4, "eta": 1.0,
                                                        "travel_length": 2, "travel_repeat": 2, "cache_interval": 1}}


def _with(**settings) -> bytes:
    return json.dumps({**GOOD, "settings": {**GOOD["settings"], **settings}}).encode()


@pytest.mark.parametrize(("content", "says"), [
    (b"{not json", "not a preset file (not JSON: "),
    (json.dumps({"name": "x", "settings": GOOD["settings"]}).encode(), 'no "fxpass_preset": 1'),
    (json.dumps({**GOOD, "fxpass_preset": 2}).encode(), '"fxpass_preset" is 2, expected 1'),
    (_with(speed=3), 'unknown key "speed" in "settings"'),
    (json.dumps({**GOOD, "script": "rm -rf ~"}).encode(), 'unknown key "script"'),
    (_with(eta=2), '"settings.eta" is 2, expected a number in [0, 1]'),
    (_with(steps=0), '"settings.steps" is 0, expected a positive integer'),
    (_with(steps="4"), '"settings.steps" is "4", expected a positive integer'),
    (_with(sampler="euler"), '"settings.sampler" is "euler", expected one of repaint, ddim, ddnm'),
    (_with(jump_length=3), '"settings.jump_length" is for sampler repaint, not ddnm'),
    (_with(start=1.5), '"settings.start" is 1.5, expected a fraction of the table in (0, 1]'),
    (b'{"fxpass_preset": 1, "name": "x", "settings": {"sampler": "ddnm", "eta": NaN}}', "NaN is not a JSON number"),
    (b'{"fxpass_preset": 1, "fxpass_preset": 1}', 'the key "fxpass_preset" appears twice'),
    (b"[" * 100_000 + b"]" * 100_000, "not a preset file (JSON nested too deeply)"),
    (b" " * 2_000_000 + b"{}", "larger than 1,000,000 bytes; not a preset file"),
    (None, "is a directory, expected a preset file (JSON)"),
], ids=["not-json", "no-marker", "marker-2", "unknown-knob", "unknown-key", "eta-2", "steps-0", "steps-text",
        "sampler", "other-samplers-knob", "start-1.5", "nan", "duplicate-key", "nested", "2MB", "directory"])
def test_hostile_preset_files_are_refused_naming_the_file(tmp_path, capsys, tiny_onnx, content, says):
    path = tmp_path / "hostile.json"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    img, mask = gray_image_and_half_mask(tmp_path, 32)
    out = tmp_path / "out.png"
    rc, _, err = cli(capsys, "sample", tiny_onnx, "--image", img, "--mask", mask, "-o", out, "--preset", path)
    assert rc == 2 and err.startswith(f"fxpass: error: {path}: ") and says in err and err.count("\n") == 1, err
    assert not out.exists()


def test_the_good_preset_reads_and_run_entries_may_name_files(tmp_path):
    from fxpass.cli.sampling import settings_from_spec

    path = tmp_path / "mine.json"
    path.write_bytes(_with())
    expected = Settings("ddnm", start=0.5, steps=4, eta=1.0, travel_length=2, travel_repeat=2, preset="mine")
    assert tune.read_preset(path) == settings_from_spec(str(path)) == expected


@pytest.mark.parametrize(("command", "value", "says"), [
    ("sample", "quick", "expected paper, balanced, fast or a preset file FILE.json, got 'quick'"),
    ("sample", "paper,fast", "expected one preset, got 'paper,fast' (fxpass evaluate compares a list)"),
    ("evaluate", "paper,quick", "got 'quick'"),
])
def test_preset_values_that_are_neither_a_name_nor_a_file(tmp_path, capsys, command, value, says):
    where = ["-o", str(tmp_path / "o.png")] if command == "sample" else ["--data", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        from fxpass.cli import main

        main([command, str(tmp_path / "none.onnx"), *where, "--preset", value])
    assert exc.value.code == 2 and says in capsys.readouterr().err
