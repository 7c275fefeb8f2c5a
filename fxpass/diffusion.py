"""The diffusion maths, NumPy only (no torch, no ONNX): respacing, betas, the posterior.

guided-diffusion's Gaussian diffusion as sampling and lowering need it: ``respaced`` picks the kept
timesteps of ``timestep_respacing``; ``base_betas``/``respaced_betas`` give the chain over them;
:class:`Diffusion` holds the float64 tables (alpha_bar, posterior coefficients, log variances) and
one step's maths (q_sample, p_mean_variance, p_sample).  ``schedule_for`` turns a ``--timesteps``
value into (mode, original timesteps, model timesteps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import FxpassError

Model = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ---- respacing -------------------------------------------------------------------------------
def respaced(diffusion_steps: int, section_counts: str | int | Sequence[int] = "") -> list[int]:
    """Timesteps kept from ``range(diffusion_steps)``, increasing.

    ``section_counts`` is ``""`` (keep all), ``"ddimN"`` (a uniform integer stride giving exactly N
    steps), or comma-separated counts ``"10,15,20"``: the steps are split into that many equal
    sections and each section is sampled at evenly rounded fractional strides.

    >>> respaced(1000, "ddim4")
    [0, 250, 500, 750]
    >>> respaced(100, "10,5")[:3]
    [0, 5, 11]
    """
    if diffusion_steps < 1:
        raise ValueError(f"diffusion_steps must be positive, got {diffusion_steps}")
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text == "":
            return list(range(diffusion_steps))
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"'{text}': expected ddimN with an integer N") from None
            for stride in range(1, diffusion_steps):
                if len(range(0, diffusion_steps, stride)) == desired:
                    return list(range(0, diffusion_steps, stride))
            raise ValueError(f"cannot take exactly {desired} steps of {diffusion_steps} with an integer stride")
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"'{text}': expected comma-separated step counts such as '250'") from None
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"section counts must be positive, got {counts}")
    if len(counts) > diffusion_steps:
        raise ValueError(f"{len(counts)} sections for {diffusion_steps} steps")
    size_per, extra = divmod(diffusion_steps, len(counts))
    steps: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            steps.add(start + round(position))
            position += stride
        start += size
    return sorted(steps)


def model_timesteps(diffusion_steps: int, kept: Sequence[int], rescale_timesteps: bool = False) -> list[float] | list[int]:
    """The timestep values the U-Net sees for each kept step (scaled to 0..1000 when rescaling)."""
    if rescale_timesteps:
        return [float(t) * (1000.0 / diffusion_steps) for t in kept]
    return list(kept)


#: what a continuous-timestep model (Palette / SR3 style) is fed for timestep t: "index" is t itself
TIMESTEP_VALUES = ("index", "alpha_bar", "sqrt_alpha_bar")


def noise_levels(config: Any, kept: Sequence[int], kind: str) -> list[float]:
    """The noise level a continuous-timestep model sees at each kept timestep: ᾱ_t ("alpha_bar",
    Palette's ``gammas``) or sqrt(ᾱ_t) ("sqrt_alpha_bar", SR3's ``noise_level``), from the config's
    noise schedule over its full diffusion chain."""
    if kind not in TIMESTEP_VALUES[1:]:
        raise FxpassError(f"--timestep-values {kind}: expected one of {', '.join(TIMESTEP_VALUES)}")
    betas = config_betas(config)
    alpha_bar = np.cumprod(1.0 - betas)
    values = alpha_bar if kind == "alpha_bar" else np.sqrt(alpha_bar)
    return [float(values[int(t)]) for t in kept]


def schedule_for(config: Any, timesteps: str | int | Sequence[int] | None = "respaced") -> tuple[str, list, list]:
    """(mode, original timesteps, model timesteps) of a config for a ``--timesteps`` value.

    ``"respaced"``/``None``: the config's whole respaced schedule ("table"); an int: that one
    timestep ("fixed"); a sequence: those timesteps ("table").  A config with no schedule (a user's
    network with no timestep, ``config.plain``): ("plain", [], []).
    """
    if getattr(config, "plain", False):
        return "plain", [], []
    steps = int(config.diffusion_steps)
    if timesteps is None or timesteps == "respaced":
        kept = respaced(steps, config.timestep_respacing)
        return "table", kept, model_timesteps(steps, kept, config.rescale_timesteps)
    if isinstance(timesteps, str):
        try:
            timesteps = int(timesteps)
        except ValueError:
            raise FxpassError(f"--timesteps {timesteps}: expected 'respaced' or an integer timestep") from None
    if isinstance(timesteps, int):
        if not 0 <= timesteps < steps:
            raise FxpassError(f"--timesteps {timesteps}: must be in 0..{steps - 1}")
        return "fixed", [timesteps], model_timesteps(steps, [timesteps], config.rescale_timesteps)
    kept = [int(t) for t in timesteps]
    return "table", kept, model_timesteps(steps, kept, config.rescale_timesteps)


# ---- betas -------------------------------------------------------------------------------------
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


def base_betas(noise_schedule: str, diffusion_steps: int, beta_start: float = 0.0, beta_end: float = 0.0) -> np.ndarray:
    """The schedule's betas over the whole chain: guided-diffusion's linear (scaled to the step count) or
    cosine; with ``beta_start``/``beta_end`` a library's linear (evenly spaced betas) or scaled_linear
    (evenly spaced square roots, diffusers' and Stable Diffusion's)."""
    if diffusion_steps < 1:
        raise ValueError(f"diffusion_steps must be positive, got {diffusion_steps}")
    if noise_schedule == "cosine":
        return cosine_betas(diffusion_steps)
    if noise_schedule == "scaled_linear":
        start, end = (beta_start, beta_end) if beta_end else (0.00085, 0.012)
        return np.linspace(start ** 0.5, end ** 0.5, diffusion_steps, dtype=np.float64) ** 2
    if noise_schedule == "linear":
        if beta_end:
            return np.linspace(beta_start, beta_end, diffusion_steps, dtype=np.float64)
        return linear_betas(diffusion_steps)
    raise ValueError(f"unknown noise_schedule {noise_schedule!r} (expected linear, scaled_linear or cosine)")


def config_betas(cfg: Any) -> np.ndarray:
    """:func:`base_betas` of a ModelConfig or its ``to_dict()``."""
    return base_betas(str(_get(cfg, "noise_schedule", "linear")), int(_get(cfg, "diffusion_steps", 1000)),
                      float(_get(cfg, "beta_start", 0.0) or 0.0), float(_get(cfg, "beta_end", 0.0) or 0.0))


def respaced_betas(betas: np.ndarray, kept: Sequence[int]) -> np.ndarray:
    """Betas of the chain that visits only ``kept`` timesteps and keeps their alpha_bar values."""
    alpha_bar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    out = np.empty(len(kept), dtype=np.float64)
    previous = 1.0
    for i, t in enumerate(kept):
        out[i] = 1.0 - alpha_bar[t] / previous
        previous = alpha_bar[t]
    return out


# ---- the diffusion -----------------------------------------------------------------------------
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
        #: what the model's output is (``as_eps`` turns v and x0 into eps): set by ``from_config``
        self.prediction_type = "epsilon"

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
        betas = respaced_betas(config_betas(cfg), kept)
        made = cls(betas, timesteps=kept, learn_sigma=bool(_get(cfg, "learn_sigma", True)),
                   fixed_variance=fixed_variance)
        made.prediction_type = str(_get(cfg, "prediction_type", "epsilon") or "epsilon")
        return made

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

    def as_eps(self, model_out: np.ndarray, x: np.ndarray, t_index) -> np.ndarray:
        """The model's output with its prediction (``prediction_type``: v or x0) turned into the eps the
        samplers take, per batch entry's ``t_index``; a learned-variance half stays as it is."""
        if self.prediction_type == "epsilon":
            return model_out
        c = x.shape[1]
        index = np.asarray(t_index, dtype=np.int64).reshape(-1)
        shape = (-1,) + (1,) * (x.ndim - 1)
        a = self.sqrt_alphas_cumprod[index].astype(np.float32).reshape(shape)
        s = self.sqrt_one_minus_alphas_cumprod[index].astype(np.float32).reshape(shape)
        pred = model_out[:, :c]
        if self.prediction_type == "v_prediction":  # v = a eps - s x0  =>  eps = a v + s x
            eps = a * pred + s * x
        elif self.prediction_type == "sample":  # x = a x0 + s eps
            eps = (x - a * pred) / s
        else:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}")
        return np.concatenate([eps.astype(np.float32), model_out[:, c:]], axis=1)

    def predict_eps(self, x: np.ndarray, t: int, xstart: np.ndarray) -> np.ndarray:
        """The eps that :meth:`predict_xstart` maps to ``xstart`` at ``t`` (its inverse)."""
        return (self._at(self.sqrt_recip_alphas_cumprod, t) * x - xstart) / self._at(self.sqrt_recipm1_alphas_cumprod, t)

    def output_shape(self, x_shape) -> tuple[int, ...]:
        """The model's output shape for an ``x`` of ``x_shape``: eps (and v with a learned sigma) per channel."""
        return (x_shape[0], (2 if self.learn_sigma else 1) * x_shape[1], *x_shape[2:])

    def check_output(self, model_out: np.ndarray, x: np.ndarray) -> None:
        """ValueError unless ``model_out`` is what the model gives for ``x``: eps (and v with a learned sigma)."""
        want = self.output_shape(x.shape)
        if model_out.shape != want:
            raise ValueError(f"model output has shape {tuple(model_out.shape)}, expected {want}")

    def p_mean_variance(self, model_out: np.ndarray, x: np.ndarray, t: int, clip: bool = True):
        """(mean, log variance, pred_xstart) of p(x_{t-1} | x_t) from the model's output at ``t``."""
        self.check_output(model_out, x)
        c = x.shape[1]
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
        return self.p_step(np.asarray(out, dtype=np.float32), x, t, noise, clip=clip)

    def p_step(self, model_out: np.ndarray, x: np.ndarray, t: int, noise: np.ndarray, clip: bool = True):
        """:meth:`p_sample` from the model's output at ``t`` already computed (the samplers' step)."""
        mean, log_var, pred_xstart = self.p_mean_variance(model_out, x, t, clip=clip)
        if t == 0:
            return mean, pred_xstart
        return mean + np.exp(np.float32(0.5) * log_var) * noise, pred_xstart
