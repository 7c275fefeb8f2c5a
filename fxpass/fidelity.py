"""Fidelity on real data: the predicted noise's error along the schedule, per runtime and precision.

Held-out images x0 are noised to every schedule step, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
with seeded eps (the same eps for every runtime), and each denoiser's predicted eps is scored against
the true one: eps-MSE per ``t_index``, and its ratio to the reference's (the eager float32 model).
This is the task metric reduced precision is judged by: random inputs through random weights say
nothing about how a trained network's activations survive float16 or int8.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

Denoiser = Callable[[np.ndarray, np.ndarray], np.ndarray]


def eps_mse_along_t(denoisers: Mapping[str, Denoiser], x0: np.ndarray, diffusion, *, reference: str,
                    seed: int = 0, t_indices: Sequence[int] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One row per ``t_index``: ``{"t_index", "timestep", "eps_mse": {name: mse}, "ratio": {name: mse / ref}}``.

    ``denoisers`` map a name to ``fn(x_t, t_index) -> model output`` (the first C channels are eps);
    ``reference`` names the one the ratios divide by.
    """
    x0 = np.asarray(x0, dtype=np.float32)
    n, c = x0.shape[0], x0.shape[1]
    steps = list(range(diffusion.num_steps)) if t_indices is None else [int(i) for i in t_indices]
    rng = np.random.default_rng(seed)
    rows = []
    for k, i in enumerate(steps):
        eps = rng.standard_normal(x0.shape, dtype=np.float32)
        x_t = diffusion.q_sample(x0, i, eps).astype(np.float32)
        index = np.full((n,), i, dtype=np.int64)
        mse = {}
        for name, fn in denoisers.items():
            out = np.asarray(fn(x_t, index), dtype=np.float64)
            mse[name] = float(np.mean((out[:, :c] - eps) ** 2))
        ref = mse[reference]
        ratio = {name: (v / ref if ref > 0 else float("inf")) for name, v in mse.items() if name != reference}
        rows.append({"t_index": i, "timestep": int(diffusion.timesteps[i]), "eps_mse": mse, "ratio": ratio})
        if progress:
            progress(k + 1, len(steps))
    return rows


def summarize(rows: list[dict]) -> dict:
    """Worst ratio per runtime over the schedule (and where), and the mean eps-MSE per runtime."""
    names = list(rows[0]["eps_mse"]) if rows else []
    out: dict = {"mean_eps_mse": {n: float(np.mean([r["eps_mse"][n] for r in rows])) for n in names},
                 "worst_ratio": {}}
    for name in rows[0]["ratio"] if rows else []:
        worst = max(rows, key=lambda r: abs(r["ratio"][name] - 1.0))
        out["worst_ratio"][name] = {"ratio": worst["ratio"][name], "t_index": worst["t_index"],
                                    "timestep": worst["timestep"]}
    return out


def check_data(info, model, data_dir, *, count: int | None = 32, seed: int = 0, budget: float | None = None,
               images: np.ndarray | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """``fxpass check --data``: the eager model (reference ``torch-fp32``) and ONNX Runtime on the held-out
    images of ``data_dir``, eps-MSE at every ``t_index``.  ``budget`` (e.g. 0.05): the run fails where
    a runtime's eps-MSE exceeds the reference's by more than that fraction at any step."""
    from .denoisers import OnnxDenoiser, TorchDenoiser
    from .errors import FxpassError
    from .images import load_image_dir

    if info.mode != "table":
        raise FxpassError(f"{info.path}: --data needs a table-mode model (every schedule step in one graph)")
    onnx_model = OnnxDenoiser(info.path)
    x0 = images if images is not None else load_image_dir(data_dir, onnx_model.image_size, count)
    diffusion = onnx_model.diffusion
    denoisers = {"torch-fp32": TorchDenoiser(model, diffusion, info.model_timesteps),
                 f"onnxrt-{info.precision}": onnx_model}
    rows = eps_mse_along_t(denoisers, x0, diffusion, reference="torch-fp32", seed=seed, progress=progress)
    summary = summarize(rows)
    failed = []
    if budget is not None:
        for name, worst in summary["worst_ratio"].items():
            if worst["ratio"] > 1.0 + budget or not np.isfinite(worst["ratio"]):
                failed.append(f"{name}: eps-MSE {worst['ratio']:.4g}× the reference's at t_index {worst['t_index']} "
                              f"(budget {1 + budget:g}×)")
    return {"images": int(x0.shape[0]), "data": str(data_dir), "seed": seed, "rows": rows, "summary": summary,
            "budget": budget, "failed": failed}
