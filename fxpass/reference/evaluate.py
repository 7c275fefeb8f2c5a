"""Evidence that the digits reference model learned: held-out eps-MSE, samples, a classifier's view.

    python -m fxpass.reference.evaluate [--checkpoint fxpass/reference/digits.pt] [--seed 0]

1. eps-MSE of the eager (PyTorch) model on the held-out images at each respaced step i: x_t =
   sqrt(abar) x0 + sqrt(1 - abar) eps, abar that of the ORIGINAL timestep ``diffusion.timesteps[i]``
   (which the model is given), eps seeded.  Compared with trivial predictors that need no model:
   ``zero`` (eps_hat = 0, MSE about 1); ``shrink`` (eps_hat = sqrt(1 - abar) x_t, the optimum when
   x0 ~ N(0, 1) independently of everything, MSE about abar); and ``gaussian`` (the optimum when
   each pixel of x0 were an independent Gaussian with the training split's per-pixel mean and
   variance, a stronger baseline).  The same model MSE on 197 training images shows the
   generalisation gap.
2. 64 samples with fxpass's NumPy DDPM sampler over the respaced schedule, as ``samples.png``.
3. A logistic-regression classifier trained on the training split (8x8 average-pooled images):
   its held-out accuracy, and on the samples the fraction labelled with probability >= 0.8 and the
   histogram of labels; plus how far samples are from their nearest training image (copies?), and
   diagnostics of colour casts / background offsets (a contrast-stretched grey version of each
   image classified the same way, and the level of the outer 2 px).

Writes ``evaluation.json`` next to the checkpoint unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_model
from ..config import load_config
from ..sampler import GeneratorNoise, ddpm
from .data import load_split, to_uint8
from ..diffusion import Diffusion, base_betas

HERE = Path(__file__).resolve().parent


def eager_denoiser(model: torch.nn.Module, diffusion: Diffusion, batch: int = 256):
    """The sampler's ``model(x, t_index)`` for an eager U-Net: maps respaced index -> original timestep."""
    timesteps = torch.tensor(diffusion.timesteps, dtype=torch.int64)

    @torch.no_grad()
    def fn(x: np.ndarray, t_index: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        t = timesteps[torch.from_numpy(np.asarray(t_index, dtype=np.int64))]
        outs = [model(x[i:i + batch], t[i:i + batch]) for i in range(0, x.shape[0], batch)]
        return torch.cat(outs).numpy()

    return fn


def eps_mse_table(fn, diffusion: Diffusion, x0: np.ndarray, x0_train: np.ndarray, train_stats, seed: int, *,
                  noise_schedule: str = "linear", diffusion_steps: int = 1000) -> list[dict]:
    mu, var = train_stats
    rows = []
    rng = np.random.default_rng(seed)
    rng_train = np.random.default_rng(seed + 1)
    full_alpha_bar = np.cumprod(1.0 - base_betas(noise_schedule, diffusion_steps))
    for i, t in enumerate(diffusion.timesteps):
        a = float(full_alpha_bar[t])  # alpha_bar of the ORIGINAL timestep t
        assert abs(a - diffusion.alphas_cumprod[i]) < 1e-12  # the respaced chain keeps it
        eps = rng.standard_normal(x0.shape, dtype=np.float32)
        x_t = (np.sqrt(a) * x0 + np.sqrt(1 - a) * eps).astype(np.float32)
        pred = fn(x_t, np.full(len(x0), i, dtype=np.int64))[:, :3]
        shrink = np.sqrt(1 - a) * x_t
        gauss = np.sqrt(1 - a) * (x_t - np.sqrt(a) * mu) / (a * var + 1 - a)
        eps_tr = rng_train.standard_normal(x0_train.shape, dtype=np.float32)
        x_t_tr = (np.sqrt(a) * x0_train + np.sqrt(1 - a) * eps_tr).astype(np.float32)
        pred_tr = fn(x_t_tr, np.full(len(x0_train), i, dtype=np.int64))[:, :3]
        rows.append({
            "index": i, "timestep": int(t), "alpha_bar": a,
            "model": float(np.mean((pred - eps) ** 2)),
            "model_train_subset": float(np.mean((pred_tr - eps_tr) ** 2)),
            "zero": float(np.mean(eps ** 2)),
            "shrink": float(np.mean((shrink - eps) ** 2)),
            "gaussian": float(np.mean((gauss - eps) ** 2)),
        })
    return rows


def save_grid(images: np.ndarray, path: Path, cols: int = 8, scale: int = 3, gap: int = 2) -> None:
    from PIL import Image

    pix = to_uint8(images)  # [N, H, W, 3]
    n, h, w, _ = pix.shape
    rows = -(-n // cols)
    canvas = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 128, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = pix[k]
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)


def features(images: np.ndarray) -> np.ndarray:
    """[N, 3, 32, 32] in [-1, 1] -> [N, 64]: channel mean, 4x4 average pooling to 8x8."""
    x = np.clip(np.asarray(images, dtype=np.float64), -1, 1).mean(axis=1)
    n, h, w = x.shape
    return x.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4)).reshape(n, 64)


def stretched(images: np.ndarray) -> np.ndarray:
    """Diagnostic only: each image's channel mean min-max stretched to [-1, 1], as 3 equal channels.

    Removes a sample's colour cast and background offset, keeping its shape."""
    x = np.clip(np.asarray(images, dtype=np.float64), -1, 1).mean(axis=1)
    lo = x.min(axis=(1, 2), keepdims=True)
    hi = x.max(axis=(1, 2), keepdims=True)
    x = 2 * (x - lo) / np.maximum(hi - lo, 1e-6) - 1
    return np.repeat(x[:, None], 3, axis=1)


def border_mean(images: np.ndarray, width: int = 2) -> np.ndarray:
    """Mean of each image's outer ``width`` pixels (all channels): the background level."""
    x = np.clip(np.asarray(images, dtype=np.float64), -1, 1)
    mask = np.ones(x.shape[-2:], dtype=bool)
    mask[width:-width, width:-width] = False
    return x[..., mask].mean(axis=(1, 2))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fxpass.reference.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=HERE / "digits.pt")
    p.add_argument("--config", type=Path, default=HERE / "digits.yml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--samples-png", type=Path, default=None, help="default: samples.png next to the checkpoint")
    p.add_argument("--json", type=Path, default=None, help="default: evaluation.json next to the checkpoint")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-mse", action="store_true", help="only sample and classify")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    samples_png = args.samples_png or args.checkpoint.with_name("samples.png")
    out_json = args.json or args.checkpoint.with_name("evaluation.json")
    cfg = load_config(args.config)
    model = load_model(args.checkpoint, config=cfg)
    diffusion = Diffusion.from_config(cfg.to_dict())
    fn = eager_denoiser(model, diffusion)
    train, held = load_split()
    report: dict = {"checkpoint": str(args.checkpoint), "config": str(args.config), "seed": args.seed,
                    "timestep_respacing": cfg.timestep_respacing, "num_heldout": len(held.images)}
    start = time.monotonic()

    # 1. held-out eps-MSE per respaced step
    if not args.skip_mse:
        report.update(heldout_eps_mse(fn, diffusion, cfg, train, held, args.seed))
        print(f"({time.monotonic() - start:.0f} s)", flush=True)

    # 2. samples
    t0 = time.monotonic()
    shape = (args.num_samples, 3, cfg.image_size, cfg.image_size)
    samples = ddpm(fn, diffusion, shape, noise=GeneratorNoise(args.seed))
    save_grid(samples, samples_png)
    report["samples"] = {"count": args.num_samples, "png": str(samples_png), "sampler": "fxpass.sampler.ddpm",
                         "noise": f"GeneratorNoise({args.seed})", "steps": diffusion.num_steps,
                         "min": float(samples.min()), "max": float(samples.max()),
                         "channel_spread": float(np.abs(samples - samples.mean(axis=1, keepdims=True)).max())}
    print(f"sampled {args.num_samples} digits in {time.monotonic() - t0:.0f} s -> {samples_png}", flush=True)

    # 3. classifier
    report.update(classify(train, held, samples))
    print_classification(report)
    report["seconds"] = round(time.monotonic() - start, 1)
    out_json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out_json}")
    return 0


def heldout_eps_mse(fn, diffusion: Diffusion, cfg, train, held, seed: int) -> dict:
    """The eager model's eps-MSE on the held-out images at each respaced step, beside the trivial
    predictors' and the same model's on as many training images; printed every 5 steps."""
    stats = (train.images.mean(axis=0), train.images.var(axis=0))
    sub = np.random.default_rng(seed).choice(len(train.images), size=len(held.images), replace=False)
    rows = eps_mse_table(fn, diffusion, held.images, train.images[np.sort(sub)], stats, seed,
                         noise_schedule=cfg.noise_schedule, diffusion_steps=cfg.diffusion_steps)
    keys = ("model", "model_train_subset", "zero", "shrink", "gaussian")
    means = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    print(f"held-out eps-MSE ({len(held.images)} images, seeded eps), eager model vs trivial predictors")
    print(f"{'i':>3} {'t':>4} {'abar':>7} {'model':>8} {'train197':>8} {'zero':>7} {'shrink':>7} {'gauss':>7} "
          f"{'model/shrink':>12}")
    show = sorted(set(range(0, len(rows), 5)) | {len(rows) - 1})
    for i in show:
        r = rows[i]
        print(f"{r['index']:3d} {r['timestep']:4d} {r['alpha_bar']:7.4f} {r['model']:8.4f} "
              f"{r['model_train_subset']:8.4f} {r['zero']:7.4f} {r['shrink']:7.4f} {r['gaussian']:7.4f} "
              f"{r['model'] / r['shrink']:12.3f}")
    print(f"mean over the {len(rows)} steps: " + "  ".join(f"{k} {v:.4f}" for k, v in means.items()))
    return {"eps_mse": rows, "eps_mse_mean_over_steps": means}


def _nearest_rms(x: np.ndarray, flat_train: np.ndarray) -> np.ndarray:
    """RMS distance of each image (channel mean) to its nearest training image."""
    flat = np.clip(x, -1, 1).mean(axis=1).reshape(len(x), -1)
    d = ((flat[:, None, :] - flat_train[None]) ** 2).mean(-1)
    return np.sqrt(d.min(1))


def classify(train, held, samples: np.ndarray) -> dict:
    """A logistic-regression classifier's view of the samples (and of the held-out images), their
    backgrounds and colour casts, and how far they are from the nearest training image."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=5000)
    clf.fit(features(train.images), train.labels)
    held_prob = clf.predict_proba(features(held.images))
    acc = float(np.mean(clf.classes_[held_prob.argmax(1)] == held.labels))
    prob = clf.predict_proba(features(samples))
    labels = clf.classes_[prob.argmax(1)]
    confident = prob.max(1) >= 0.8
    hist = np.bincount(labels, minlength=10)
    hist_conf = np.bincount(labels[confident], minlength=10)
    # nearest training image (L2 on the 32x32 images), samples vs held-out images
    flat_train = train.images[:, 0].reshape(len(train.images), -1)
    nn_samples, nn_held = _nearest_rms(samples, flat_train), _nearest_rms(held.images, flat_train)
    stretched_held = clf.predict_proba(features(stretched(held.images))).max(1)
    stretched_samples = clf.predict_proba(features(stretched(samples))).max(1)
    bg_samples, bg_held = border_mean(samples), border_mean(held.images)
    spread = np.abs(samples - samples.mean(axis=1, keepdims=True)).mean(axis=(1, 2, 3))
    return {
        "classifier": {
            "model": "sklearn LogisticRegression(max_iter=5000) on 8x8 average-pooled images, training split",
            "heldout_accuracy": acc,
            "heldout_fraction_p_ge_0.8": float(np.mean(held_prob.max(1) >= 0.8)),
            "samples_fraction_p_ge_0.8": float(np.mean(confident)),
            "samples_mean_max_prob": float(prob.max(1).mean()),
            "samples_label_histogram": hist.tolist(),
            "samples_confident_label_histogram": hist_conf.tolist(),
            "samples_labels_grid_row_major": labels.tolist(),
            "diagnostic_stretched": {
                "what": "each image's channel mean min-max stretched to [-1, 1] before classifying: "
                        "removes colour casts and background offsets, keeps the shape",
                "heldout_fraction_p_ge_0.8": float(np.mean(stretched_held >= 0.8)),
                "samples_fraction_p_ge_0.8": float(np.mean(stretched_samples >= 0.8)),
            },
        },
        "colour_and_background": {
            "what": "border = mean of the outer 2 px (real digits: about -1); channel spread = mean |x_c - mean_c x|"
                    " per image (real digits: 0)",
            "samples_border_median": float(np.median(bg_samples)), "heldout_border_median": float(np.median(bg_held)),
            "samples_border_fraction_below_-0.8": float(np.mean(bg_samples < -0.8)),
            "heldout_border_fraction_below_-0.8": float(np.mean(bg_held < -0.8)),
            "samples_channel_spread_median": float(np.median(spread)),
        },
        "nearest_training_image_rms": {
            "samples_median": float(np.median(nn_samples)), "samples_min": float(nn_samples.min()),
            "heldout_median": float(np.median(nn_held)), "heldout_min": float(nn_held.min()),
        },
    }


def print_classification(report: dict) -> None:
    c = report["classifier"]
    labels = c["samples_labels_grid_row_major"]
    print(f"classifier held-out accuracy {c['heldout_accuracy']:.3f}; held-out images with p >= 0.8: "
          f"{c['heldout_fraction_p_ge_0.8']:.3f}; samples with p >= 0.8: {c['samples_fraction_p_ge_0.8']:.3f} "
          f"(mean max p {c['samples_mean_max_prob']:.3f})")
    print(f"sample labels 0..9: {c['samples_label_histogram']}; confident only: "
          f"{c['samples_confident_label_histogram']}")
    d = c["diagnostic_stretched"]
    print(f"diagnostic, contrast-stretched grey images: p >= 0.8 for {d['samples_fraction_p_ge_0.8']:.3f} of the "
          f"samples, {d['heldout_fraction_p_ge_0.8']:.3f} of the held-out images")
    cb = report["colour_and_background"]
    print(f"background (outer 2 px) median: samples {cb['samples_border_median']:.3f}, held-out "
          f"{cb['heldout_border_median']:.3f}; below -0.8: samples {cb['samples_border_fraction_below_-0.8']:.3f}, "
          f"held-out {cb['heldout_border_fraction_below_-0.8']:.3f}; sample channel spread median "
          f"{cb['samples_channel_spread_median']:.3f} (real: 0)")
    print("labels in the grid:\n" + "\n".join(" ".join(str(v) for v in labels[r * 8:r * 8 + 8])
                                             for r in range(-(-len(labels) // 8))))
    n = report["nearest_training_image_rms"]
    print(f"RMS distance to the nearest training image: samples median {n['samples_median']:.3f} "
          f"(min {n['samples_min']:.3f}), held-out median {n['heldout_median']:.3f} (min {n['heldout_min']:.3f})")


if __name__ == "__main__":
    raise SystemExit(main())
