"""RePaint inpainting and plain DDPM sampling on a lowered fxpass model, with NumPy alone.

Nothing here imports torch: the model is any callable

    model(x: float32 [N, 3, H, W], t_index: int64 [N]) -> float32 [N, 6 or 3, H, W]

where ``t_index`` indexes the respaced schedule (0 = least noisy).  :class:`OnnxDenoiser` is that
callable for an ONNX file written by ``fxpass lower`` in table mode; it reads the schedule from the
model's metadata.

The maths follows guided-diffusion's Gaussian diffusion (epsilon prediction, learned-range or fixed
variance, x0 clipped to [-1, 1]) on the respaced betas, and RePaint's resampling schedule: a pass
down the schedule that jumps ``jump_length`` steps back up ``jump_n_sample - 1`` times at every
``jump_length``-th step, each step up being forward noising q(x_{t+1} | x_t).  Before every model
call but the first, the known pixels (mask 1) of the current image are replaced by the ground truth
noised to the current step, q(x_t | x_0) (RePaint's ``inpa_inj_sched_prev``).

All randomness comes from a :class:`NoiseSource`, drawn in a fixed order that does not depend on
the model's outputs, so that one seed gives one image and two runs can be fed the very same noise:
the start image, then per model call the step noise followed (when injecting) by the ground-truth
noise, and one draw per step up.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import FxpassError
from .schedule import respaced

Model = Callable[[np.ndarray, np.ndarray], np.ndarray]
Progress = Callable[[int, int], None]

METADATA_CONFIG = "fxpass.config"
METADATA_TIMESTEPS = "fxpass.timesteps"
METADATA_MODE = "fxpass.mode"
CONFIG_KEYS = ("diffusion_steps", "timestep_respacing", "noise_schedule", "learn_sigma", "image_size")


# ---- noise schedules -----------------------------------------------------------------------
def linear_betas(diffusion_steps: int) -> np.ndarray:
    """guided-diffusion's linear schedule, scaled so any step count matches the 1000-step one."""
    scale = 1000.0 / diffusion_steps
    return np.linspace(scale * 0.0001, scale * 0.02, diffusion_steps, dtype=np.float64)


def cosine_betas(diffusion_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the cosine schedule alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2, capped."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    n = diffusion_steps
    return np.array(
        [min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=np.float64
    )


def base_betas(noise_schedule: str, diffusion_steps: int) -> np.ndarray:
    if diffusion_steps < 1:
        raise ValueError(f"diffusion_steps must be positive, got {diffusion_steps}")
    if noise_schedule == "linear":
        return linear_betas(diffusion_steps)
    if noise_schedule == "cosine":
        return cosine_betas(diffusion_steps)
    raise ValueError(f"unknown noise_schedule {noise_schedule!r} (expected 'linear' or 'cosine')")


def respaced_betas(betas: np.ndarray, kept: Sequence[int]) -> np.ndarray:
    """Betas of the chain that visits only ``kept`` timesteps and keeps their alpha_bar values."""
    alpha_bar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    out = np.empty(len(kept), dtype=np.float64)
    previous = 1.0
    for i, t in enumerate(kept):
        out[i] = 1.0 - alpha_bar[t] / previous
        previous = alpha_bar[t]
    return out


# ---- RePaint's resampling schedule ---------------------------------------------------------
def jump_schedule(t_T: int, jump_length: int = 10, jump_n_sample: int = 10) -> list[int]:
    """RePaint's time indices: from ``t_T - 1`` down to ``-1`` with jumps back up.

    Every index ``j`` in ``range(0, t_T - jump_length, jump_length)`` is a jump point: the first
    ``jump_n_sample - 1`` times the walk reaches it going down, it climbs back ``jump_length``
    steps one at a time.  A step down from ``t`` is a model call at ``t``; a step up to ``t`` is
    forward noising with beta_t.  ``jump_n_sample=1`` gives the plain descent.
    """
    for name, value in (("t_T", t_T), ("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    left = {j: jump_n_sample - 1 for j in range(0, t_T - jump_length, jump_length)}
    times: list[int] = []
    t = t_T
    while t > 0:
        t -= 1
        times.append(t)
        if left.get(t, 0) > 0:
            left[t] -= 1
            times.extend(range(t + 1, t + jump_length + 1))
            t += jump_length
    times.append(-1)
    return times


def descent_schedule(num_steps: int) -> list[int]:
    """The plain reverse pass ``num_steps - 1, ..., 0, -1`` (DDPM)."""
    return list(range(num_steps - 1, -2, -1))


def count_model_calls(times: Sequence[int]) -> int:
    """Model calls a schedule makes: one per step down."""
    return sum(1 for a, b in zip(times[:-1], times[1:]) if b < a)


# ---- randomness ----------------------------------------------------------------------------
class NoiseSource(Protocol):
    def normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """Standard normal float32 samples of ``shape``."""


class GeneratorNoise:
    """Noise from one ``np.random.Generator`` (seeded with an int, or one you pass)."""

    def __init__(self, seed: int | np.random.Generator = 0):
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def normal(self, shape):
        return self.rng.standard_normal(tuple(shape), dtype=np.float32)


class RecordingNoise:
    """Passes another source's draws through and keeps a copy of each, in order."""

    def __init__(self, source: NoiseSource):
        self.source = source
        self.draws: list[np.ndarray] = []

    def normal(self, shape):
        a = np.asarray(self.source.normal(shape), dtype=np.float32)
        self.draws.append(a.copy())
        return a


class ReplayNoise:
    """Hands back pre-drawn arrays in order (e.g. ``RecordingNoise.draws`` of another run)."""

    def __init__(self, draws: Sequence[np.ndarray]):
        self.draws = [np.asarray(d, dtype=np.float32) for d in draws]
        self.used = 0

    def normal(self, shape):
        if self.used >= len(self.draws):
            raise ValueError(f"replayed noise exhausted after {self.used} draws")
        a = self.draws[self.used]
        if a.shape != tuple(shape):
            raise ValueError(f"replayed draw {self.used} has shape {a.shape}, the sampler asks for {tuple(shape)}")
        self.used += 1
        return a.copy()

    @property
    def remaining(self) -> int:
        return len(self.draws) - self.used


# ---- the diffusion -------------------------------------------------------------------------
def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


class Diffusion:
    """guided-diffusion's Gaussian diffusion on (respaced) betas, as sampling needs it.

    ``timesteps[i]`` is the original timestep of index ``i``.  ``learn_sigma``: the model gives 6
    channels, epsilon and v in [-1, 1] interpolating the log variance between the clipped
    posterior log variance (v = -1) and log beta (v = 1); otherwise 3 channels of epsilon with a
    fixed variance, ``"large"`` (beta_t, the guided-diffusion default) or ``"small"`` (posterior).
    All tables are float64; a step extracts float32 scalars, as guided-diffusion does.
    """

    def __init__(self, betas, *, timesteps: Sequence[int] | None = None, learn_sigma: bool = True,
                 fixed_variance: str = "large"):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError("betas must be a non-empty 1-D array")
        if not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must lie in (0, 1]")
        if fixed_variance not in ("large", "small"):
            raise ValueError(f"fixed_variance must be 'large' or 'small', got {fixed_variance!r}")
        n = betas.size
        self.betas = betas
        self.num_steps = n
        self.timesteps = list(range(n)) if timesteps is None else [int(t) for t in timesteps]
        if len(self.timesteps) != n:
            raise ValueError(f"{len(self.timesteps)} timesteps for {n} betas")
        self.learn_sigma = bool(learn_sigma)
        self.fixed_variance = fixed_variance

        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1.0)
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # the variance at t = 0 is 0; its log is clipped to the value at t = 1
        clipped = np.append(self.posterior_variance[1], self.posterior_variance[1:]) if n > 1 else betas
        self.posterior_log_variance_clipped = np.log(clipped)
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        self.log_betas = np.log(betas)
        if fixed_variance == "large":
            large = np.append(self.posterior_variance[1], betas[1:]) if n > 1 else betas
            self.fixed_log_variance = np.log(large)
        else:
            self.fixed_log_variance = self.posterior_log_variance_clipped

    @classmethod
    def from_config(cls, cfg: Mapping | Any, *, fixed_variance: str = "large") -> "Diffusion":
        """From a ModelConfig or its ``to_dict()``: schedule, step count, respacing, learn_sigma."""
        steps = int(_get(cfg, "diffusion_steps", 1000))
        kept = respaced(steps, _get(cfg, "timestep_respacing", "") or "")
        betas = respaced_betas(base_betas(_get(cfg, "noise_schedule", "linear"), steps), kept)
        return cls(betas, timesteps=kept, learn_sigma=bool(_get(cfg, "learn_sigma", True)),
                   fixed_variance=fixed_variance)

    @property
    def out_channels(self) -> int:
        return 6 if self.learn_sigma else 3

    def _at(self, table: np.ndarray, t: int) -> np.float32:
        return np.float32(table[t])

    def q_sample(self, x0: np.ndarray, t: int, noise: np.ndarray) -> np.ndarray:
        """x0 noised to step ``t``: sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        return self._at(self.sqrt_alphas_cumprod, t) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t) * noise

    def forward_step(self, x: np.ndarray, t: int, noise: np.ndarray) -> np.ndarray:
        """One step of forward noising q(x_t | x_{t-1}) into step ``t`` (RePaint's undo)."""
        beta = self.betas[t]
        return np.float32(math.sqrt(1.0 - beta)) * x + np.float32(math.sqrt(beta)) * noise

    def predict_xstart(self, x: np.ndarray, t: int, eps: np.ndarray) -> np.ndarray:
        return self._at(self.sqrt_recip_alphas_cumprod, t) * x - self._at(self.sqrt_recipm1_alphas_cumprod, t) * eps

    def p_mean_variance(self, model_out: np.ndarray, x: np.ndarray, t: int, clip: bool = True):
        """(mean, log variance, pred_xstart) of p(x_{t-1} | x_t) from the model's output at ``t``."""
        c = x.shape[1]
        want = (x.shape[0], 2 * c if self.learn_sigma else c, *x.shape[2:])
        if model_out.shape != want:
            raise ValueError(f"model output has shape {tuple(model_out.shape)}, expected {want}")
        eps = model_out[:, :c]
        if self.learn_sigma:
            frac = (model_out[:, c:] + np.float32(1.0)) / np.float32(2.0)
            max_log = self._at(self.log_betas, t)
            min_log = self._at(self.posterior_log_variance_clipped, t)
            log_var = frac * max_log + (np.float32(1.0) - frac) * min_log
        else:
            log_var = np.full_like(x, self._at(self.fixed_log_variance, t))
        pred_xstart = self.predict_xstart(x, t, eps)
        if clip:
            pred_xstart = np.clip(pred_xstart, -1.0, 1.0)
        mean = self._at(self.posterior_mean_coef1, t) * pred_xstart + self._at(self.posterior_mean_coef2, t) * x
        return mean, log_var, pred_xstart

    def p_sample(self, model: Model, x: np.ndarray, t: int, noise: np.ndarray, clip: bool = True):
        """x_{t-1} ~ p(x_{t-1} | x_t), and the clipped x0 prediction; no noise is added at t = 0."""
        out = model(x, np.full((x.shape[0],), t, dtype=np.int64))
        out = np.asarray(out, dtype=np.float32)
        mean, log_var, pred_xstart = self.p_mean_variance(out, x, t, clip=clip)
        if t == 0:
            return mean, pred_xstart
        return mean + np.exp(np.float32(0.5) * log_var) * noise, pred_xstart


# ---- the loops -----------------------------------------------------------------------------
def sample_loop(model: Model, diffusion: Diffusion, times: Sequence[int], shape: tuple[int, ...], *,
                noise: NoiseSource, gt: np.ndarray | None = None, mask: np.ndarray | None = None,
                inpa_inj_sched_prev: bool = True, on_step: Progress | None = None) -> np.ndarray:
    """Walk ``times`` (RePaint's schedule: steps of +-1 ending at -1) from pure noise to x0.

    With ``gt`` and ``mask`` (1 = known pixel to keep, broadcastable to ``shape``) and
    ``inpa_inj_sched_prev``, every model call but the first sees the known pixels replaced by
    q(x_t | gt).  ``on_step(done, total)`` is called after each model call.
    """
    times = [int(t) for t in times]
    _check_times(times, diffusion.num_steps)
    inpaint = gt is not None and inpa_inj_sched_prev
    if (gt is None) != (mask is None):
        raise ValueError("pass both gt and mask, or neither")
    if inpaint:
        gt = np.broadcast_to(np.asarray(gt, dtype=np.float32), shape)
        keep = np.broadcast_to(np.asarray(mask, dtype=np.float32), shape)
        drop = np.float32(1.0) - keep
    total = count_model_calls(times)
    done = 0
    x = np.asarray(noise.normal(shape), dtype=np.float32)
    for t_last, t_cur in zip(times[:-1], times[1:]):
        if t_cur < t_last:
            step_noise = noise.normal(shape)
            if inpaint and done > 0:
                known = diffusion.q_sample(gt, t_last, noise.normal(shape))
                x = keep * known + drop * x
            x, _ = diffusion.p_sample(model, x, t_last, step_noise)
            done += 1
            if on_step is not None:
                on_step(done, total)
        else:
            x = diffusion.forward_step(x, t_cur, noise.normal(shape))
    return x


def _check_times(times: Sequence[int], num_steps: int) -> None:
    if len(times) < 2 or times[-1] != -1 or times[1] >= times[0]:
        raise ValueError("a schedule must start going down and end at -1")
    if any(abs(a - b) != 1 for a, b in zip(times[:-1], times[1:])):
        raise ValueError("a schedule moves by one step at a time")
    if max(times) >= num_steps:
        raise ValueError(f"schedule reaches index {max(times)}, the diffusion has {num_steps} steps")


def repaint(model: Model, diffusion: Diffusion, gt: np.ndarray, mask: np.ndarray, *, noise: NoiseSource,
            t_T: int | None = None, jump_length: int = 10, jump_n_sample: int = 10,
            inpa_inj_sched_prev: bool = True, on_step: Progress | None = None) -> np.ndarray:
    """Inpaint ``gt`` [N, 3, H, W] in [-1, 1] where ``mask`` is 0, keeping it where ``mask`` is 1."""
    gt = np.asarray(gt, dtype=np.float32)
    times = jump_schedule(diffusion.num_steps if t_T is None else t_T, jump_length, jump_n_sample)
    return sample_loop(model, diffusion, times, gt.shape, noise=noise, gt=gt, mask=mask,
                       inpa_inj_sched_prev=inpa_inj_sched_prev, on_step=on_step)


def ddpm(model: Model, diffusion: Diffusion, shape: tuple[int, ...], *, noise: NoiseSource,
         on_step: Progress | None = None) -> np.ndarray:
    """Plain generation over the whole respaced schedule: no resampling, no mask."""
    return sample_loop(model, diffusion, descent_schedule(diffusion.num_steps), shape, noise=noise,
                       on_step=on_step)


# ---- the ONNX model ------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _ort_reason(exc: BaseException) -> str:
    """ONNX Runtime's load error without its "[ONNXRuntimeError] ... Load model from X failed:" and
    C++ source-location prefixes."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.rsplit(" failed:", 1)[-1].strip() or text
    text = re.sub(r"^\S+\.(?:cc|h|cpp):\d+ .*?\(\)\s*", "", text)
    return text[:200]


class OnnxDenoiser:
    """An fxpass table-mode ONNX model on ONNX Runtime (CPU), as the sampler's ``model`` callable.

    Reads ``fxpass.mode`` (must be ``"table"``), ``fxpass.config`` (ModelConfig as JSON) and
    ``fxpass.timesteps`` (original timestep per ``t_index``) from the model's metadata_props; every
    problem with the file is an :class:`FxpassError` naming it.  ``calls`` counts model calls.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None):
        import onnxruntime as ort

        self.path = path = Path(path)
        if not path.exists():
            raise FxpassError(f"{path}: no such file")
        if path.is_dir():
            raise FxpassError(f"{path}: is a directory, expected an ONNX file")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
            reason = _ort_reason(exc)
            raise FxpassError(f"{path}: not a readable ONNX model ({reason})") from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        mode = meta.get(METADATA_MODE)
        if mode is None:
            raise FxpassError(f"{path}: not an fxpass model (no {METADATA_MODE} metadata); lower it with fxpass lower")
        if mode != "table":
            raise FxpassError(f"{path}: {METADATA_MODE} is {mode!r}; sampling needs a table-mode model "
                              "(one graph for every timestep, input t_index)")
        self.config = self._json(meta, METADATA_CONFIG, dict)
        missing = [k for k in CONFIG_KEYS if k not in self.config]
        if missing:
            raise FxpassError(f"{path}: metadata {METADATA_CONFIG} lacks {', '.join(missing)}")
        timesteps = self._json(meta, METADATA_TIMESTEPS, list)
        if not timesteps or not all(isinstance(t, int) and not isinstance(t, bool) for t in timesteps):
            raise FxpassError(f"{path}: metadata {METADATA_TIMESTEPS} must be a non-empty list of integers")
        try:
            self.diffusion = Diffusion.from_config(self.config)
        except (ValueError, TypeError) as exc:
            raise FxpassError(f"{path}: metadata {METADATA_CONFIG}: {_first_line(exc)}") from None
        if timesteps != self.diffusion.timesteps:
            raise FxpassError(
                f"{path}: metadata {METADATA_TIMESTEPS} ({len(timesteps)} steps) does not match timestep_respacing "
                f"{self.config['timestep_respacing']!r} of {self.config['diffusion_steps']} diffusion steps "
                f"({len(self.diffusion.timesteps)} steps)"
            )
        self.timesteps = timesteps
        size = self.config["image_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise FxpassError(f"{path}: metadata {METADATA_CONFIG}: image_size must be a positive integer, got {size!r}")
        self.image_size = size
        self._check_signature()
        self.calls = 0

    def _json(self, meta: dict, key: str, kind: type):
        if key not in meta:
            raise FxpassError(f"{self.path}: no {key} metadata; not an fxpass table-mode model")
        try:
            value = json.loads(meta[key])
        except ValueError:
            raise FxpassError(f"{self.path}: metadata {key} is not valid JSON") from None
        if not isinstance(value, kind):
            raise FxpassError(f"{self.path}: metadata {key} must be a JSON {kind.__name__}")
        return value

    def _check_signature(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if set(inputs) != {"x", "t_index"}:
            raise FxpassError(f"{self.path}: inputs are {sorted(inputs)}, expected x and t_index")
        if inputs["t_index"].type != "tensor(int64)":
            raise FxpassError(f"{self.path}: input t_index is {inputs['t_index'].type}, expected tensor(int64)")
        # float16 inputs (a model converted without keeping float32 I/O) are fed float16
        x_types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        if inputs["x"].type not in x_types:
            raise FxpassError(f"{self.path}: input x is {inputs['x'].type}, expected tensor(float)")
        self.x_dtype = x_types[inputs["x"].type]
        if "out" not in outputs:
            raise FxpassError(f"{self.path}: outputs are {outputs}, expected out")
        shape = inputs["x"].shape
        self.static_batch = shape[0] if shape and isinstance(shape[0], int) else None
        s = self.image_size
        if len(shape) != 4 or any(isinstance(d, int) and d != w for d, w in zip(shape[1:], (3, s, s))):
            raise FxpassError(f"{self.path}: input x has shape {shape}, expected [N, 3, {s}, {s}]")

    def __call__(self, x: np.ndarray, t_index: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        t_index = np.ascontiguousarray(t_index, dtype=np.int64)
        if self.static_batch == 1 and x.shape[0] != 1:
            return np.concatenate([self(x[i:i + 1], t_index[i:i + 1]) for i in range(x.shape[0])])
        self.calls += 1
        (out,) = self.session.run(["out"], {"x": x.astype(self.x_dtype, copy=False), "t_index": t_index})
        out = np.asarray(out, dtype=np.float32)
        want = (x.shape[0], self.diffusion.out_channels, *x.shape[2:])
        if out.shape != want:
            raise FxpassError(f"{self.path}: output out has shape {list(out.shape)}, expected {list(want)} "
                              f"(learn_sigma={self.diffusion.learn_sigma})")
        return out
