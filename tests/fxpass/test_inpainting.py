"""fxpass.inpainting and ``fxpass evaluate``: fixed masks, image directories, trivial fills, masked metrics,
the torch-free command, its errors, and RePaint on the trained digits reference against the trivial fills.

The reference model (``fxpass/reference/digits.pt``) is lowered once per module (about 10 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fxpass.cli import main
from fxpass.errors import FxpassError
from fxpass.inpainting import (
    MASK_KINDS,
    METHODS,
    PSNR_MAX,
    evaluate,
    fill_mean,
    fill_nearest,
    fixed_masks,
    image_files,
    load_image_dir,
    masked_psnr,
    masked_ssim,
    unknown_fraction,
)
from fxpass.reference import HELDOUT_DIR

REPO = Path(__file__).resolve().parents[2]


def _png(path: Path, pixels: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)
    return path


def _heldout_dir(tmp_path: Path, count: int) -> Path:
    """A directory with the first ``count`` held-out digits (32x32 RGB PNGs)."""
    d = tmp_path / "data"
    d.mkdir()
    for p in sorted(HELDOUT_DIR.glob("*.png"))[:count]:
        shutil.copy(p, d / p.name)
    return d


# ---- masks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 64, 256])
def test_masks_have_their_coverage(size):
    masks = fixed_masks(size, MASK_KINDS, seed=0)
    assert list(masks) == list(MASK_KINDS)
    for m in masks.values():
        assert m.shape == (1, 1, size, size) and m.dtype == np.float32
        assert set(np.unique(m)) == {0.0, 1.0}
    box = masks["box"][0, 0]
    lo, hi = size // 4, size // 4 + size // 2
    assert (box[lo:hi, lo:hi] == 0).all() and box.sum() == size * size - (size // 2) ** 2
    assert unknown_fraction(masks["box"]) == 0.25
    half = masks["half"][0, 0]
    assert (half[:, : size // 2] == 1).all() and (half[:, size // 2:] == 0).all()
    assert unknown_fraction(masks["half"]) == 0.5
    for seed in range(10):
        strokes = fixed_masks(size, "strokes", seed=seed)["strokes"]
        assert 0.05 < unknown_fraction(strokes) < 0.6, (size, seed)


def test_masks_are_deterministic():
    a, b = fixed_masks(32, MASK_KINDS, seed=3), fixed_masks(32, MASK_KINDS, seed=3)
    for kind in MASK_KINDS:
        np.testing.assert_array_equal(a[kind], b[kind])
    other = fixed_masks(32, MASK_KINDS, seed=4)
    assert not np.array_equal(a["strokes"], other["strokes"])  # the strokes follow the seed ...
    np.testing.assert_array_equal(a["box"], other["box"])  # ... the geometric masks do not
    assert list(fixed_masks(32, "strokes,box,strokes", seed=0)) == ["strokes", "box"]


def test_unknown_mask_kind_is_one_line_error():
    with pytest.raises(FxpassError, match="unknown mask kind 'circle'"):
        fixed_masks(32, "box,circle")


# ---- trivial fills -------------------------------------------------------------------------
def test_fill_mean_on_a_tiny_image():
    gt = np.arange(2 * 3 * 3, dtype=np.float32).reshape(1, 2, 3, 3)
    mask = np.ones((1, 1, 3, 3), np.float32)
    mask[0, 0, 1, 1] = mask[0, 0, 0, 2] = 0
    out = fill_mean(gt, mask)
    known = mask[0, 0] == 1
    np.testing.assert_array_equal(out[0][:, known], gt[0][:, known])
    for c in range(2):
        want = gt[0, c][known].mean()
        assert out[0, c, 1, 1] == pytest.approx(want) and out[0, c, 0, 2] == pytest.approx(want)
    assert out[0, 0, 1, 1] == pytest.approx((0 + 1 + 3 + 5 + 6 + 7 + 8) / 7)


def test_fill_nearest_on_a_tiny_image():
    # columns 0 and 4 known; 1 takes column 0, 3 takes column 4; column 2 is equally far from both
    gt = np.array([[[1, 0, 0, 0, 5], [2, 0, 0, 0, 6]]], dtype=np.float32)[:, None].repeat(2, axis=1)
    gt[:, 1] *= 10
    mask = np.zeros((1, 1, 2, 5), np.float32)
    mask[..., [0, 4]] = 1
    out = fill_nearest(gt, mask)
    np.testing.assert_array_equal(out[0, :, :, 1], gt[0, :, :, 0])
    np.testing.assert_array_equal(out[0, :, :, 3], gt[0, :, :, 4])
    assert any(np.array_equal(out[0, :, :, 2], gt[0, :, :, c]) for c in (0, 4))
    np.testing.assert_array_equal(out[..., [0, 4]], gt[..., [0, 4]])
    # a single known pixel fills everything with its value
    one = np.zeros((1, 1, 4, 4), np.float32)
    one[0, 0, 3, 0] = 1
    img = np.random.default_rng(0).uniform(-1, 1, (1, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(fill_nearest(img, one)[0], np.broadcast_to(img[0, :, 3:4, 0:1], (3, 4, 4)))


def test_fills_batch_with_one_mask_per_image_or_one_for_all():
    rng = np.random.default_rng(1)
    gt = rng.uniform(-1, 1, (3, 3, 8, 8)).astype(np.float32)
    mask = fixed_masks(8, "box")["box"]
    for fill in (fill_mean, fill_nearest):
        batched = fill(gt, mask)
        for n in range(3):
            np.testing.assert_array_equal(batched[n:n + 1], fill(gt[n:n + 1], mask))


# ---- metrics -------------------------------------------------------------------------------
def test_identical_images_score_max_in_the_masked_region():
    rng = np.random.default_rng(0)
    gt = rng.uniform(-1, 1, (3, 32, 32)).astype(np.float32)
    mask = fixed_masks(32, "box")["box"][0]
    assert masked_psnr(gt, gt, mask) == PSNR_MAX >= 100
    assert masked_ssim(gt, gt, mask) == pytest.approx(1.0, abs=1e-9)
    # a change far outside the unknown region (beyond SSIM's 7x7 windows) changes neither
    other = gt.copy()
    other[:, :2, :2] = 0
    assert masked_psnr(gt, other, mask) == PSNR_MAX
    assert masked_ssim(gt, other, mask) == pytest.approx(1.0, abs=1e-9)


def test_psnr_and_ssim_see_only_the_unknown_pixels():
    rng = np.random.default_rng(0)
    gt = rng.uniform(-1, 1, (3, 32, 32)).astype(np.float64)
    mask = fixed_masks(32, "half")["half"][0]
    pred = gt.copy()
    pred[:, :, 16:] += 0.1  # MSE 0.01 in the unknown half: 10 log10(4 / 0.01)
    assert masked_psnr(gt, pred, mask) == pytest.approx(10 * np.log10(400), abs=1e-9)
    pred = gt.copy()
    pred[:, :, 16:] = rng.uniform(-1, 1, (3, 32, 16))  # unrelated pixels in the unknown half
    assert abs(masked_ssim(gt, pred, mask)) < 0.1
    assert masked_ssim(gt, pred, 1 - mask) > 0.5  # the left half is unchanged but for windows at the seam


# ---- image directories ---------------------------------------------------------------------
def test_load_image_dir_sorted_counted_and_in_range(tmp_path):
    for name, value in (("b.png", 255), ("a.png", 0), ("c.PNG", 128)):
        _png(tmp_path / name, np.full((8, 8, 3), value))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "report.json").write_text("{}")
    assert [p.name for p in image_files(tmp_path)] == ["a.png", "b.png", "c.PNG"]
    x = load_image_dir(tmp_path, 8, count=2)
    assert x.shape == (2, 3, 8, 8) and x.dtype == np.float32
    assert (x[0] == -1).all() and (x[1] == 1).all()
    with pytest.raises(FxpassError, match="3 images in this directory, 5 asked for"):
        load_image_dir(tmp_path, 8, count=5)


def test_load_image_dir_errors_name_the_problem(tmp_path):
    with pytest.raises(FxpassError, match="no such directory"):
        load_image_dir(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FxpassError, match="no images"):
        load_image_dir(tmp_path / "empty", 8)
    d = tmp_path / "mixed"
    d.mkdir()
    _png(d / "a.png", np.zeros((8, 8, 3)))
    _png(d / "b.png", np.zeros((8, 9, 3)))
    with pytest.raises(FxpassError, match=r"b\.png: image is 9x8 pixels, the model takes 8x8"):
        load_image_dir(d, 8)
    assert load_image_dir(d, 8, count=1).shape == (1, 3, 8, 8)  # only the first count images are read


# ---- the command ---------------------------------------------------------------------------
def _evaluate_cli(capsys, *args):
    rc = main(["evaluate", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_missing_data_dir(tmp_path, capsys):
    rc, _, err = _evaluate_cli(capsys, tmp_path / "model.onnx", "--data", tmp_path / "nope")
    assert rc != 0
    assert err.strip() == f"fxpass: error: {tmp_path / 'nope'}: no such directory"


def test_cli_existing_report_needs_force(tmp_path, capsys):
    out = tmp_path / "report.json"
    out.write_text("previous")
    rc, _, err = _evaluate_cli(capsys, tmp_path / "model.onnx", "--data", _heldout_dir(tmp_path, 1), "-o", out)
    assert rc != 0 and "already exists (pass --force to overwrite)" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "previous"


def test_cli_wrong_image_size_names_the_file(tmp_path, capsys, digits_onnx):
    d = _heldout_dir(tmp_path, 2)
    _png(d / "zz-small.png", np.zeros((16, 16, 3)))
    out = tmp_path / "report.json"
    rc, _, err = _evaluate_cli(capsys, digits_onnx(), "--data", d, "-o", out)
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "zz-small.png: image is 16x16 pixels, the model takes 32x32" in err
    assert not out.exists()


def test_cli_rejects_unknown_mask_kind_and_bad_numbers(tmp_path, capsys):
    for flag, value in (("--masks", "box,ring"), ("--count", "0"), ("--jump-length", "-1")):
        with pytest.raises(SystemExit) as exc:
            main(["evaluate", "m.onnx", "--data", str(tmp_path), flag, value])
        assert exc.value.code == 2
    assert "unknown mask kind 'ring'" in capsys.readouterr().err


def test_cli_t_T_beyond_the_schedule(tmp_path, capsys, digits_onnx):
    rc, _, err = _evaluate_cli(capsys, digits_onnx(), "--data", _heldout_dir(tmp_path, 1), "--t-T", "51")
    assert rc != 0 and "--t-T 51 is more than the model's 50 respaced steps" in err


def test_evaluate_path_does_not_import_torch(tmp_path, digits_onnx):
    data = _heldout_dir(tmp_path, 1)
    out = tmp_path / "report.json"
    code = (
        "import sys\n"
        "from fxpass.cli import main\n"
        f"rc = main(['evaluate', {str(digits_onnx())!r}, '--data', {str(data)!r}, '-o', {str(out)!r},"
        " '--masks', 'box,strokes', '--t-T', '4', '--jump-length', '2', '--jump-n-sample', '2'])\n"
        "assert rc == 0, rc\n"
        "assert 'onnxruntime' in sys.modules and 'skimage.metrics' in sys.modules\n"
        "print('torch imported' if any(m == 'torch' or m.startswith('torch.') for m in sys.modules) else 'torch-free')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "torch-free"
    report = json.loads(out.read_text())  # strict JSON: no Infinity/NaN
    assert report["image_files"] == ["digit-0000-label7.png"]
    assert report["settings"]["model_calls_per_case"] == 6  # t_T 4 + one jump point x 1 extra pass x 2 steps
    assert [c["mask"] for c in report["cases"]] == ["box", "strokes"]
    assert [c["seed"] for c in report["cases"]] == [0, 1]
    assert set(report["per_mask"]) == {"box", "strokes"}
    for means in (*report["per_mask"].values(), report["overall"]):
        assert set(METHODS) <= set(means) and set(means["repaint_margin"]) >= {"psnr", "ssim"}


# ---- the trained reference: RePaint beats the trivial fills ---------------------------------
@pytest.mark.slow
def test_repaint_beats_trivial_fills_on_the_digits_reference(digits_onnx):
    """4 held-out digits x 3 masks, t_T 50, jump_length 5, jump_n_sample 2 (95 model calls a case):
    about 7 s on one thread."""
    from fxpass.denoisers import OnnxDenoiser

    model = OnnxDenoiser(digits_onnx(), threads=1)
    images = load_image_dir(HELDOUT_DIR, model.image_size, 4)
    masks = fixed_masks(model.image_size, MASK_KINDS, seed=0)
    calls = []
    report = evaluate(model, images, masks, seed=0, jump_length=5, jump_n_sample=2, t_T=None,
                      progress=lambda done, total: calls.append((done, total)))
    assert len(report["cases"]) == 12 and report["settings"]["model_calls_per_case"] == 95
    assert calls[-1] == (12 * 95, 12 * 95) and len(calls) == 12 * 95
    overall = report["overall"]
    # measured at seed 0: RePaint 18.57 dB, mean fill 9.67 dB, nearest fill 12.59 dB, so a margin of
    # 5.97 dB over the better fill (seeds 1-3: 6.4, 9.5, 9.6 dB); SSIM 0.643 vs 0.163 / 0.370 (margin 0.27).
    # Single masks are noisier over 4 images (the box's margin ranged -0.3..7.1 dB), so only the
    # overall means are asserted.
    for fill in ("mean_fill", "nearest_fill"):
        assert overall["repaint"]["psnr"] > overall[fill]["psnr"] + 3.0, overall
        assert overall["repaint"]["ssim"] > overall[fill]["ssim"] + 0.1, overall
    assert overall["repaint_margin"]["psnr"] > 3.0
    # the fills need no model: their numbers are those of the images and masks alone
    assert overall["mean_fill"]["psnr"] == pytest.approx(9.67, abs=0.01)
    assert overall["nearest_fill"]["psnr"] == pytest.approx(12.59, abs=0.01)
