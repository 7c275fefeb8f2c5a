"""``fxpass sample MODEL --images DIR (--masks DIR | --mask FILE) -o OUTDIR``: a directory of images in process.

On the tiny lowered U-Net (``tiny_onnx``, conftest) with 3-call samplers, so an image costs milliseconds:
each PNG is the single-image ``fxpass sample`` PNG for the seed the manifest records (byte for byte); a
re-run touches nothing finished; an interrupted run resumes without writing a finished image again; bad
inputs are failed entries while the others are written (exit 1); an output directory among the inputs, or
one made by another job, is refused in one line; torch stays out of the process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from check_helpers import cli, sample_in_a_fresh_process
from PIL import Image

from fxpass.batch import BatchJob, case_seed
from fxpass.samplers import Settings

SIZE = 32  # conftest.TINY's image_size
NAMES = ["a.png", "b.png", "c.png", "d.png"]
DDIM = ["--sampler", "ddim", "--steps", "3"]
REPAINT = ["--sampler", "repaint", "--t-T", "3", "--jump-length", "2", "--jump-n-sample", "2"]


def _write_set(root: Path, names=NAMES) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(5)
    for k, name in enumerate(names):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(images / name)
        keep = np.zeros((SIZE, SIZE), np.uint8)
        keep[:, : 8 + 4 * (k % 5)] = 255
        Image.fromarray(keep).save(masks / name)
    return images, masks


@pytest.fixture
def data(tmp_path) -> tuple[Path, Path]:
    return _write_set(tmp_path)


def _batch(capsys, model, images, masks, out, *flags):
    return cli(capsys, "sample", model, "--images", images, "--masks", masks, "-o", out, *flags)


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _stamps(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(out.glob("*.png"))}


@pytest.mark.parametrize("flags", [DDIM, REPAINT, ["--sampler", "diffpir", "--steps", "3"], ["--preset", "fast"]],
                         ids=["ddim", "repaint", "diffpir", "preset-fast"])
def test_batch_png_is_the_single_image_png(capsys, tiny_onnx, data, tmp_path, flags):
    images, masks = data
    out = tmp_path / "out"
    rc, stdout, err = _batch(capsys, tiny_onnx, images, masks, out, "--seed", "7", *flags)
    assert rc == 0, err
    assert "4 written, 0 failed, 0 already done" in stdout
    doc = _manifest(out)
    assert sorted(doc["images"]) == NAMES
    assert doc["job"]["seed"] == 7 and doc["job"]["settings"]["sampler"] == {"fast": "diffpir"}.get(flags[1], flags[1])
    for name in ("a.png", "c.png"):
        entry = doc["images"][name]
        assert entry["status"] == "done" and entry["error"] is None and entry["seconds"] >= 0
        assert entry["seed"] == case_seed(7, name)  # from the job's seed and the name alone
        single = tmp_path / f"single-{name}"
        rc, _, err = cli(capsys, "sample", tiny_onnx, "--image", images / name, "--mask", masks / name, "-o", single,
                         "--seed", entry["seed"], *flags)
        assert rc == 0, err
        assert (out / name).read_bytes() == single.read_bytes()
    assert len({e["seed"] for e in doc["images"].values()}) == len(NAMES)


def test_case_seed_depends_on_the_seed_and_name_only():
    assert case_seed(0, "a.png") == case_seed(0, "a.png")
    assert len({case_seed(0, "a.png"), case_seed(1, "a.png"), case_seed(0, "b.png")}) == 3
    assert 0 <= case_seed(2**63 - 1, "x" * 300) < 2**63


def test_rerun_skips_finished_images(capsys, tiny_onnx, data, tmp_path):
    images, masks = data
    out = tmp_path / "out"
    assert _batch(capsys, tiny_onnx, images, masks, out, *DDIM)[0] == 0
    before, manifest = _stamps(out), _manifest(out)
    rc, stdout, err = _batch(capsys, tiny_onnx, images, masks, out, *DDIM)
    assert rc == 0, err
    assert "0 written, 0 failed, 4 already done" in stdout
    assert _stamps(out) == before  # not one output rewritten
    assert _manifest(out)["images"] == manifest["images"]


def test_interrupted_run_resumes_without_rewriting(capsys, tiny_onnx, data, tmp_path):
    """Ctrl-C after two images: those two stay as written, the re-run does the other two, and every PNG equals
    an uninterrupted run's."""
    from fxpass.batch_run import run_batch

    images, masks = data
    whole = tmp_path / "whole"
    assert _batch(capsys, tiny_onnx, images, masks, whole, *DDIM)[0] == 0
    out = tmp_path / "out"
    job = BatchJob(model=tiny_onnx, images=images, masks=masks, out=out, settings=Settings("ddim", steps=3))

    def interrupt(case, result, summary):
        if summary.done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(job, on_result=interrupt)
    first = _stamps(out)
    assert len(first) == 2 and sorted(n for n, e in _manifest(out)["images"].items() if e["status"] == "done") == sorted(first)
    summary = run_batch(job)
    assert (summary.skipped, summary.done, summary.failed) == (2, 2, 0)
    after = _stamps(out)
    assert {n: after[n] for n in first} == first
    assert sorted(after) == NAMES
    assert all((out / n).read_bytes() == (whole / n).read_bytes() for n in NAMES)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_png_without_its_manifest_entry_is_recovered_not_rewritten(capsys, tiny_onnx, data, tmp_path):
    """A crash between writing a PNG and the manifest: the PNG decodes and the job matches, so it is kept."""
    images, masks = data
    out = tmp_path / "out"
    assert _batch(capsys, tiny_onnx, images, masks, out, *DDIM)[0] == 0
    doc = _manifest(out)
    del doc["images"]["b.png"]
    (out / "manifest.json").write_text(json.dumps(doc))
    (out / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # a PNG that does not decode is redone
    before = _stamps(out)
    rc, stdout, err = _batch(capsys, tiny_onnx, images, masks, out, *DDIM)
    assert rc == 0, err
    assert "1 written, 0 failed, 3 already done" in stdout
    after = _stamps(out)
    assert after["b.png"] == before["b.png"] and after["c.png"] != before["c.png"]
    assert _manifest(out)["images"]["b.png"]["recovered"] is True


def test_bad_inputs_fail_alone(capsys, tiny_onnx, tmp_path):
    images, masks = _write_set(tmp_path, ["good.png", "small.png", "broken.png", "nomask.png"])
    Image.new("RGB", (16, 16)).save(images / "small.png")
    (images / "broken.png").write_bytes(b"not a png at all")
    (masks / "nomask.png").unlink()
    out = tmp_path / "out"
    rc, stdout, err = _batch(capsys, tiny_onnx, images, masks, out, *DDIM)
    assert rc == 1, err
    assert "1 written, 3 failed" in stdout
    assert sorted(p.name for p in out.glob("*.png")) == ["good.png"]
    entries = _manifest(out)["images"]
    assert entries["good.png"]["status"] == "done"
    expected = {"small.png": "16x16 pixels, the model takes 32x32", "broken.png": "not an image file",
                "nomask.png": "no mask nomask.*"}
    for name, words in expected.items():
        assert entries[name]["status"] == "failed" and words in entries[name]["error"], entries[name]
        assert f"failed {name}:" in stdout
    # fixing the inputs and running again does only the failed ones
    (masks / "nomask.png").write_bytes((masks / "good.png").read_bytes())
    rc, stdout, _ = _batch(capsys, tiny_onnx, images, masks, out, *DDIM)
    assert rc == 1 and "1 written, 2 failed, 1 already done" in stdout


def test_one_mask_for_every_image(capsys, tiny_onnx, data, tmp_path):
    images, masks = data
    out = tmp_path / "out"
    rc, stdout, err = cli(capsys, "sample", tiny_onnx, "--images", images, "--mask", masks / "b.png", "-o", out, *DDIM)
    assert rc == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == NAMES


@pytest.mark.parametrize("where", ["inside-images", "holds-images"])
def test_outdir_among_the_inputs_is_refused(capsys, tiny_onnx, tmp_path, where):
    if where == "inside-images":
        images, masks = _write_set(tmp_path)
        out = images / "out"
    else:
        out = tmp_path / "out"
        images, masks = _write_set(out)
    before = sorted(p.name for p in images.iterdir())
    rc, stdout, err = _batch(capsys, tiny_onnx, images, masks, out, *DDIM)
    assert rc == 2 and "refusing" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in images.iterdir()) == before


def test_other_settings_need_force(capsys, tiny_onnx, data, tmp_path):
    images, masks = data
    out = tmp_path / "out"
    assert _batch(capsys, tiny_onnx, images, masks, out, *DDIM)[0] == 0
    before = _stamps(out)
    rc, _, err = _batch(capsys, tiny_onnx, images, masks, out, "--sampler", "ddim", "--steps", "2")
    assert rc == 2 and "made by another job (settings differ)" in err
    assert _stamps(out) == before
    rc, stdout, err = _batch(capsys, tiny_onnx, images, masks, out, "--sampler", "ddim", "--steps", "2", "--force")
    assert rc == 0 and "4 written" in stdout, err
    assert _manifest(out)["job"]["settings"]["steps"] == 2


def test_stray_output_without_manifest_is_refused(capsys, tiny_onnx, data, tmp_path):
    images, masks = data
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"mine")
    rc, _, err = _batch(capsys, tiny_onnx, images, masks, out, *DDIM)
    assert rc == 2 and "a.png: already exists" in err
    assert (out / "a.png").read_bytes() == b"mine"


@pytest.mark.parametrize("flags, words", [
    (["--masks", "M"], "--masks goes with --images"),
    (["--ray"], "--ray goes with --images"),
])
def test_directory_flags_without_images(capsys, tiny_onnx, tmp_path, flags, words):
    rc, _, err = cli(capsys, "sample", tiny_onnx, "--image", "x.png", "--mask", "m.png", "-o", tmp_path / "o.png", *flags)
    assert rc == 2 and words in err


def test_images_needs_one_kind_of_mask(capsys, tiny_onnx, data, tmp_path):
    images, masks = data
    rc, _, err = cli(capsys, "sample", tiny_onnx, "--images", images, "-o", tmp_path / "out")
    assert rc == 2 and "--masks DIR" in err
    rc, _, err = cli(capsys, "sample", tiny_onnx, "--images", images, "--masks", masks, "--workers", "2",
                     "-o", tmp_path / "out")
    assert rc == 2 and "--workers is for --ray" in err


def test_missing_ray_is_one_line(capsys, tiny_onnx, data, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    images, masks = data
    rc, _, err = _batch(capsys, tiny_onnx, images, masks, tmp_path / "out", "--ray", *DDIM)
    assert rc == 2
    assert err.strip() == "fxpass: error: --ray needs Ray: pip install 'fxpass[ray]'"
    assert not (tmp_path / "out").exists()


def test_batch_path_is_torch_free(tiny_onnx, data, tmp_path):
    images, masks = data
    args = [str(tiny_onnx), "--images", str(images), "--masks", str(masks), "-o", str(tmp_path / "out"), *DDIM]
    assert sample_in_a_fresh_process(args, "onnxruntime") == "torch-free"
    assert len(list((tmp_path / "out").glob("*.png"))) == len(NAMES)
    shutil.rmtree(tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("flags, words", [
    (["--run", "ddim", "--ray"], "evaluate --ray runs one sampler's cases"),
    (["--workers", "2"], "--workers is for --ray"),
])
def test_evaluate_ray_flags_refused(capsys, tiny_onnx, data, flags, words):
    images, _ = data
    rc, _, err = cli(capsys, "evaluate", tiny_onnx, "--data", images, *flags)
    assert rc == 2 and words in err


def test_evaluate_without_ray_is_one_line(capsys, tiny_onnx, data, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    images, _ = data
    rc, _, err = cli(capsys, "evaluate", tiny_onnx, "--data", images, "--ray", *DDIM)
    assert rc == 2 and err.strip() == "fxpass: error: --ray needs Ray: pip install 'fxpass[ray]'"


@pytest.mark.slow  # a subprocess and three runs of a 38-call sampler: about 10 s (the fast tier has Ctrl-C above)
def test_killed_process_resumes(capsys, tiny_onnx, tmp_path):
    """``kill -9`` of a batch process after its first image: the re-run writes only the missing images, leaves
    the finished ones untouched and no temporary behind, and the whole equals an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    from check_helpers import REPO

    names = [f"{k:02d}.png" for k in range(12)]
    images, masks = _write_set(tmp_path, names)
    out = tmp_path / "out"
    slow = ["--sampler", "repaint", "--t-T", "10", "--jump-length", "2", "--jump-n-sample", "2"]
    args = [str(tiny_onnx), "--images", str(images), "--masks", str(masks), "-o", str(out), *slow]
    code = f"from fxpass.cli import main; raise SystemExit(main(['sample', *{args!r}]))"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):  # polls the manifest (at most 60 s) for a finished image; asserts no time
            done = []
            if (out / "manifest.json").exists():
                done = [n for n, e in _manifest(out)["images"].items() if e["status"] == "done"]
            if done or proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    first = _stamps(out)
    assert first and len(first) < len(names), "the job finished before it was killed"
    rc, stdout, err = _batch(capsys, tiny_onnx, images, masks, out, *slow)
    assert rc == 0, err
    after = _stamps(out)
    assert sorted(after) == names and {n: after[n] for n in first} == first
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    whole = tmp_path / "whole"
    assert _batch(capsys, tiny_onnx, images, masks, whole, *slow)[0] == 0
    assert all((out / n).read_bytes() == (whole / n).read_bytes() for n in names)
