"""``fxpass lower --deep-cache`` and ``--cache-interval``: the pair written and checked, sampling with it,
and every way a pair can be wrong (on the tiny config)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from check_helpers import cli, gray_image_and_half_mask, lower_on_one_thread, sample_in_a_fresh_process

from fxpass import metadata
from fxpass.deep_cache import CUT_TOLERANCE, check_cut, shallow_path


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_ckpt, tiny_yaml):
    """The tiny checkpoint lowered with --deep-cache (level 1): (full path, report)."""
    out = tmp_path_factory.mktemp("deep-cache") / "tiny.onnx"
    assert lower_on_one_thread(tiny_ckpt, "--config", tiny_yaml, "-o", out, "--deep-cache", "--report",
                               out.with_suffix(".json")) == 0
    return out, json.loads(out.with_suffix(".json").read_text())


def test_lower_writes_the_full_and_the_shallow_graph(pair):
    full, report = pair
    shallow = shallow_path(full)
    assert shallow.name == "tiny.shallow.onnx" and shallow.is_file()
    entry = report["deep_cache"]
    assert entry["level"] == 1 and entry["check"]["passed"]
    assert entry["check"]["max_rel_to_scale"] <= CUT_TOLERANCE
    assert entry["nodes"]["shallow"] < entry["nodes"]["full"] / 4
    assert 0 < entry["gflop_ratio"] < 0.25
    assert set(entry["latency"]) == {"full_s", "shallow_s"}
    full_model, shallow_model = onnx.load(str(full)), onnx.load(str(shallow))
    assert [o.name for o in full_model.graph.output] == ["out", "cache"]
    assert [i.name for i in shallow_model.graph.input] == ["x", "t_index", "cache"]
    meta_full = metadata.parse(metadata.read_props(full_model), "full").deep_cache
    meta_shallow = metadata.parse(metadata.read_props(shallow_model), "shallow").deep_cache
    assert meta_full["role"] == "full" and meta_shallow["role"] == "shallow"
    from fxpass.deep_cache import sha256

    assert meta_full["shallow_sha256"] == sha256(shallow.read_bytes())


def _swap_cache_into_skip(shallow: onnx.ModelProto) -> onnx.ModelProto:
    """A deliberately wrong cut: the cached feature enters its Concat where the skip feature should."""
    graph = gs.import_onnx(shallow)
    cache = next(t for t in graph.inputs if t.name == "cache")
    concat = next(n for n in cache.outputs if n.op == "Concat")
    concat.inputs[0], concat.inputs[1] = concat.inputs[1], concat.inputs[0]
    return gs.export_onnx(graph)


def test_the_identity_gate_refuses_a_wrong_cut(pair):
    full, _ = pair
    full_model, shallow_model = onnx.load(str(full)), onnx.load(str(shallow_path(full)))
    assert check_cut(full_model, shallow_model)["passed"]
    wrong = check_cut(full_model, _swap_cache_into_skip(shallow_model))
    assert not wrong["passed"] and wrong["max_rel_to_scale"] > 100 * CUT_TOLERANCE


@pytest.mark.parametrize("flags, message", [
    (["--step-graph"], "--deep-cache: cuts the table-mode ONNX model (not --step-graph)"),
    (["--format", "pte"], "--deep-cache: cuts the table-mode ONNX model (not --format pte)"),
    (["--timesteps", "5"], "not a model lowered at one timestep"),
])
def test_lower_refuses_deep_cache_where_it_cannot_apply(capsys, tmp_path, tiny_ckpt, tiny_yaml, flags, message):
    rc, _, err = cli(capsys, "lower", tiny_ckpt, "--config", tiny_yaml, "-o", tmp_path / "m.onnx", "--deep-cache",
                     *flags)
    assert rc == 2 and message in err
    assert list(tmp_path.iterdir()) == []


def test_lower_refuses_a_level_the_unet_does_not_have(capsys, tmp_path, tiny_ckpt, tiny_yaml):
    rc, _, err = cli(capsys, "lower", tiny_ckpt, "--config", tiny_yaml, "-o", tmp_path / "m.onnx",
                     "--deep-cache", "99")
    assert rc == 2 and "--deep-cache 99: level 99: the graph has" in err and "skip connections; choose 1.." in err
    assert list(tmp_path.iterdir()) == []


def test_lower_refuses_to_overwrite_an_existing_shallow_graph(capsys, tmp_path, tiny_ckpt, tiny_yaml):
    (tmp_path / "m.shallow.onnx").write_bytes(b"keep me")
    rc, _, err = cli(capsys, "lower", tiny_ckpt, "--config", tiny_yaml, "-o", tmp_path / "m.onnx", "--deep-cache")
    assert rc == 2 and "m.shallow.onnx" in err
    assert (tmp_path / "m.shallow.onnx").read_bytes() == b"keep me" and not (tmp_path / "m.onnx").exists()


def _sample(capsys, tmp_path, model, name: str, *flags):
    img, mask = gray_image_and_half_mask(tmp_path, 32)
    out = tmp_path / name
    rc, _, err = cli(capsys, "sample", model, "--image", img, "--mask", mask, "-o", out, "--sampler", "ddnm",
                     "--steps", "6", "--seed", "3", *flags)
    return rc, out, err


def test_cache_interval_1_equals_no_cache_bit_for_bit(capsys, tmp_path, pair, tiny_onnx):
    rc, plain, _ = _sample(capsys, tmp_path, tiny_onnx, "plain.png")
    assert rc == 0
    rc, cached, _ = _sample(capsys, tmp_path, pair[0], "one.png", "--cache-interval", "1")
    assert rc == 0
    assert cached.read_bytes() == plain.read_bytes()


def test_cached_sampling_is_deterministic_and_uses_the_shallow_graph(capsys, tmp_path, pair):
    rc, a, _ = _sample(capsys, tmp_path, pair[0], "a.png", "--cache-interval", "2")
    rc2, b, _ = _sample(capsys, tmp_path, pair[0], "b.png", "--cache-interval", "2")
    rc3, one, _ = _sample(capsys, tmp_path, pair[0], "one.png")
    assert rc == rc2 == rc3 == 0
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != one.read_bytes()  # the shallow calls ran on the cached feature


def test_cache_interval_needs_a_deep_cache_model(capsys, tmp_path, tiny_onnx):
    rc, out, err = _sample(capsys, tmp_path, tiny_onnx, "r.png", "--cache-interval", "2")
    assert rc == 2 and "no deep-cache shallow graph (lower with --deep-cache" in err and not out.exists()


def test_a_missing_or_foreign_shallow_graph_is_refused(capsys, tmp_path, pair, tiny_onnx):
    full = tmp_path / "m.onnx"
    shutil.copy(pair[0], full)
    rc, out, err = _sample(capsys, tmp_path, full, "r.png", "--cache-interval", "2")
    assert rc == 2 and "m.shallow.onnx: the shallow graph of m.onnx cannot be read" in err and not out.exists()
    shutil.copy(tiny_onnx, tmp_path / "m.shallow.onnx")  # another file where the shallow graph should be
    rc, out, err = _sample(capsys, tmp_path, full, "r.png", "--cache-interval", "2")
    assert rc == 2 and "not the shallow graph m.onnx was lowered with (SHA-256 differs)" in err and not out.exists()


def test_the_shallow_graph_alone_is_refused_with_the_way_out(capsys, tmp_path, pair):
    rc, out, err = _sample(capsys, tmp_path, shallow_path(pair[0]), "r.png")
    assert rc == 2 and "the shallow graph of a --deep-cache lowering; use its full graph" in err


def test_evaluate_compares_cache_intervals(capsys, tmp_path, pair):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(data / f"{i}.png")
    rc, out, err = cli(capsys, "evaluate", pair[0], "--data", data, "--masks", "box", "-o", tmp_path / "r.json",
                       "--run", "ddnm:steps=6", "--run", "ddnm:steps=6,cache_interval=3")
    assert rc == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["runs"][1]["settings"]["cache_interval"] == 3
    assert "cache_interval" not in report["runs"][0]["settings"]
    assert [len(r["cases"]) for r in report["runs"]] == [2, 2]


def test_cached_sampling_on_openvino_matches_onnx_runtime(capsys, tmp_path, pair):
    from fxpass.denoisers import runtime_unavailable_reason

    reason = runtime_unavailable_reason("openvino")
    if reason:
        pytest.skip(f"OpenVINO cannot run here: {reason}")
    from PIL import Image

    rc, ort_png, _ = _sample(capsys, tmp_path, pair[0], "ort.png", "--cache-interval", "2")
    assert rc == 0
    img, mask = gray_image_and_half_mask(tmp_path, 32)
    ov_png = tmp_path / "ov.png"
    # OpenVINO in a fresh interpreter: once loaded it takes over SIGINT in the process that loaded it
    assert sample_in_a_fresh_process([str(pair[0]), "--image", str(img), "--mask", str(mask), "-o", str(ov_png),
                                      "--sampler", "ddnm", "--steps", "6", "--seed", "3", "--cache-interval", "2",
                                      "--runtime", "openvino"], "openvino") == "torch-free"
    a = np.asarray(Image.open(ort_png), dtype=np.int16)
    b = np.asarray(Image.open(ov_png), dtype=np.int16)
    assert np.abs(a - b).max() <= 2  # 8-bit levels: OpenVINO f32 and ONNX Runtime round differently at most
