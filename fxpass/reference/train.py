"""Train the digits reference model (issue #14) on CPU.

    python -m fxpass.reference.train --out fxpass/reference/digits.pt [--minutes 24] [--seed 0]

Model: fxpass's guided-diffusion U-Net built from ``digits.yml``.  Data: the training split of
:mod:`fxpass.reference.data` (the held-out images are never loaded here).  Objective: the hybrid
loss of :mod:`fxpass.reference.losses` with t uniform in [0, 1000).  AdamW (no weight decay, as
guided-diffusion), linear warm-up then a constant learning rate (with ``--steps`` and
``--decay-steps``: decayed linearly to 0 over the last steps), gradient-norm clipping, random
horizontal shifts of up to ``--shift`` pixels (background -1 fills in), EMA of the weights with
guided-diffusion-style warm-up ``min(rate, (1 + n) / (10 + n))``; the EMA weights are saved, as a
float32 state dict through :func:`fxpass.checkpoint.save_checkpoint`.

Reproducible: everything random comes from one seeded ``torch.Generator`` and the model's
initialisation from ``torch.manual_seed(seed)``; one thread.  Because the learning rate is constant
after warm-up, a run stopped by ``--minutes`` after N steps is the same as ``--steps N`` (the step
count is printed and written to the log JSON); ``--state`` / ``--resume`` continue a run exactly
(the log JSON lists each phase's arguments and steps).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import save_checkpoint
from ..config import build_model, load_config
from ..models.layers import AttentionBlock
from .data import load_train
from .losses import Tables, hybrid_losses

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "digits.yml"


def skip_attention_recompute(model: torch.nn.Module) -> None:
    """Training speed-up: call each AttentionBlock's ``_forward`` directly.

    Upstream's AttentionBlock always goes through gradient checkpointing, which recomputes the
    attention in the backward pass; the maths is the same without it, only faster.  Patches the
    instances of this training model, nothing else.
    """
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.forward = module._forward


def shift_horizontally(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by an integer in [-max_shift, max_shift] pixels; -1 (background) fills in."""
    if max_shift <= 0:
        return x
    shifts = torch.randint(-max_shift, max_shift + 1, (x.shape[0],), generator=gen)
    padded = torch.nn.functional.pad(x, (max_shift, max_shift), value=-1.0)
    width = x.shape[-1]
    return torch.stack([padded[i, ..., max_shift - s:max_shift - s + width] for i, s in enumerate(shifts.tolist())])


class EMA:
    def __init__(self, model: torch.nn.Module, rate: float):
        self.rate = rate
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, num_updates: int) -> None:
        decay = min(self.rate, (1.0 + num_updates) / (10.0 + num_updates))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(decay).add_(v.detach(), alpha=1.0 - decay)
            else:
                self.shadow[k].copy_(v)


def lr_at(step: int, lr: float, warmup: int, total: int = 0, decay: int = 0) -> float:
    """Linear warm-up over ``warmup`` steps, constant, then (with ``decay`` and ``total``) linear
    decay to 0 over the last ``decay`` of ``total`` steps."""
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if decay > 0 and total > 0:
        factor *= min(1.0, max(0.0, (total - step) / decay))
    return lr * factor


def save_ema(cfg, ema: EMA, path: Path) -> None:
    model = build_model(cfg)
    model.load_state_dict(ema.shadow, strict=True)
    save_checkpoint(model, path)


def _fmt_time(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60:d}:{seconds % 60:02d}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fxpass.reference.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="checkpoint to write (EMA weights, float32 state dict)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--minutes", type=float, default=24.0, help="wall-clock budget of the training loop")
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: only --minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--decay-steps", type=int, default=0,
                   help="with --steps: decay the learning rate linearly to 0 over the last this many steps")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--shift", type=int, default=1, help="largest random horizontal shift in pixels (0: off)")
    p.add_argument("--print-every", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--save-every", type=float, default=300.0, help="seconds between intermediate checkpoints")
    p.add_argument("--log-json", type=Path, default=None, help="loss log (default: OUT with .train.json)")
    p.add_argument("--state", type=Path, default=None, help="also write a resumable training state here")
    p.add_argument("--resume", type=Path, default=None, help="continue from a --state file")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


class Trainer:
    """One training run (or the continuation of one): the model, its optimiser, EMA weights and random
    generator, the step it is at and the loss history; everything random comes from ``--seed``."""

    def __init__(self, args, cfg):
        self.args, self.cfg = args, cfg
        self.data = torch.from_numpy(load_train().images)
        self.tables = Tables(cfg.noise_schedule, cfg.diffusion_steps)
        torch.manual_seed(args.seed)
        self.model = build_model(cfg).train()
        skip_attention_recompute(self.model)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.0)
        self.ema = EMA(self.model, args.ema)
        self.gen = torch.Generator().manual_seed(args.seed)
        self.step = 0
        self.history: list[dict] = []
        self.prior_seconds = 0.0
        self.phases: list[dict] = []
        if args.resume is not None:
            state = torch.load(args.resume, map_location="cpu", weights_only=False)
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
            self.ema.shadow = state["ema"]
            self.gen.set_state(state["gen"])
            self.step, self.history, self.prior_seconds = state["step"], state["history"], state["seconds"]
            self.phases = state.get("phases", [])
        self.first_step = self.step
        self.seconds = 0.0  # of this run's training loop
        self.recent: list[float] = []  # the last 200 losses

    def this_phase(self, seconds: float) -> dict:
        return {"args": {k: str(v) for k, v in vars(self.args).items()}, "start_step": self.first_step,
                "end_step": self.step, "seconds": round(seconds, 1)}

    def write_state(self, path: Path, seconds: float) -> None:
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "ema": self.ema.shadow,
                    "gen": self.gen.get_state(), "step": self.step, "history": self.history, "seconds": seconds,
                    "phases": self.phases + [self.this_phase(seconds - self.prior_seconds)]}, path)

    def save(self, seconds: float) -> None:
        """The EMA checkpoint, and with ``--state`` the resumable state, ``seconds`` into this run."""
        save_ema(self.cfg, self.ema, self.args.out)
        if self.args.state is not None:
            self.write_state(self.args.state, self.prior_seconds + seconds)

    def losses(self) -> dict[str, torch.Tensor]:
        """The hybrid loss terms of one batch at this step's learning rate (draws the batch, t and noise)."""
        args = self.args
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, args.lr, args.warmup, args.steps, args.decay_steps)
        idx = torch.randint(0, len(self.data), (args.batch,), generator=self.gen)
        x0 = shift_horizontally(self.data[idx], args.shift, self.gen)
        t = torch.randint(0, self.cfg.diffusion_steps, (args.batch,), generator=self.gen)
        noise = torch.randn(x0.shape, generator=self.gen)
        x_t = self.tables.q_sample(x0, t, noise)
        return hybrid_losses(self.tables, self.model(x_t, t), x0, x_t, t, noise)

    def update(self, loss: torch.Tensor) -> torch.Tensor:
        """One optimiser step on ``loss`` (gradient-norm clipping, then EMA); the gradient norm."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.args.clip if self.args.clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.opt.step()
        self.step += 1
        self.ema.update(self.model, self.step)
        return grad_norm

    def train(self) -> bool:
        """Train until ``--steps`` or ``--minutes``, printing progress and saving on the way; False when the
        loss stops being finite."""
        args = self.args
        start = time.monotonic()
        last_print = last_save = start
        budget = args.minutes * 60.0
        window = {"loss": 0.0, "mse": 0.0, "vb": 0.0, "n": 0}
        while True:
            elapsed = time.monotonic() - start
            if (args.steps and self.step >= args.steps) or elapsed >= budget:
                break
            terms = self.losses()
            loss = terms["loss"].mean()
            if not torch.isfinite(loss):
                print(f"step {self.step}: loss is {loss.item()}; stopping", flush=True)
                return False
            grad_norm = self.update(loss)
            window["loss"] += loss.item()
            window["mse"] += terms["mse"].mean().item()
            window["vb"] += terms["vb"].mean().item()
            window["n"] += 1
            self.recent = (self.recent + [loss.item()])[-200:]
            now = time.monotonic()
            if now - last_print >= args.print_every:
                self.progress(window, grad_norm, now - start, budget)
                window = {"loss": 0.0, "mse": 0.0, "vb": 0.0, "n": 0}
                last_print = now
            if now - last_save >= args.save_every:
                self.save(now - start)
                last_save = now
        self.seconds = time.monotonic() - start
        return True

    def progress(self, window: dict, grad_norm: torch.Tensor, elapsed: float, budget: float) -> None:
        """A history entry of the mean losses since the last one, and its progress line."""
        n = window["n"]
        rate = elapsed / max(1, self.step - self.first_step)
        left = budget - elapsed
        if self.args.steps:
            left = min(left, (self.args.steps - self.step) * rate)
        entry = {"step": self.step, "seconds": round(self.prior_seconds + elapsed, 1),
                 "lr": self.opt.param_groups[0]["lr"], "loss": window["loss"] / n, "mse": window["mse"] / n,
                 "vb": window["vb"] / n, "grad_norm": float(grad_norm)}
        self.history.append(entry)
        print(f"step {self.step:5d}  loss {entry['loss']:.4f}  mse {entry['mse']:.4f}  vb {entry['vb']:.4f}  "
              f"|g| {entry['grad_norm']:.2f}  lr {entry['lr']:.2e}  {rate:.2f} s/step  "
              f"elapsed {_fmt_time(elapsed)}  ETA {_fmt_time(left)}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    if args.decay_steps and not args.steps:
        raise SystemExit("--decay-steps needs --steps")
    cfg = load_config(args.config)
    log_json = args.log_json or args.out.with_suffix(".train.json")
    run = Trainer(args, cfg)
    print(f"fxpass.reference.train: {run.n_params:,} parameters, {len(run.data)} training images, "
          f"batch {args.batch}, lr {args.lr:g} (warm-up {args.warmup}), EMA {args.ema}, shift {args.shift}, "
          f"seed {args.seed}, {torch.get_num_threads()} thread(s); budget {args.minutes:g} min"
          + (f", {args.steps} steps" if args.steps else "")
          + (f"; resumed at step {run.step}" if args.resume else ""), flush=True)
    if not run.train():
        return 1
    run.save(run.seconds)
    seconds, prior_seconds = run.seconds, run.prior_seconds
    final = float(np.mean(run.recent)) if run.recent else float("nan")
    log = {
        "config": cfg.to_dict(), "parameters": run.n_params, "phases": run.phases + [run.this_phase(seconds)],
        "steps": run.step, "seconds_this_run": round(seconds, 1), "seconds_total": round(prior_seconds + seconds, 1),
        "final_loss_last_200_steps": final, "torch": torch.__version__, "python": sys.version.split()[0],
        "machine": platform.machine(), "history": run.history,
    }
    log_json.write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    print(f"done: {run.step} steps in {_fmt_time(prior_seconds + seconds)} (this run {_fmt_time(seconds)}); "
          f"mean loss of the last {len(run.recent)} steps {final:.4f}; wrote {args.out} (EMA) and {log_json}",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
