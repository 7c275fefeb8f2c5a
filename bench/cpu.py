"""The CPU sections: eager PyTorch vs the naive dynamo export vs fxpass, all float32, batch 1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .harness import LoadSampler, measure_interleaved, ort_session, short_error, timing_from

SECTIONS = ("eager", "naive", "fxpass", "cli", "schedule", "precision", "flops", "gpu")


@dataclass
class Options:
    runs: int = 7
    warmup: int = 2
    schedule: str = "sample"  # "full" or "sample"
    schedule_steps: int = 25  # sample mode: how many evenly spaced steps are timed
    skip: frozenset = field(default_factory=frozenset)
    threads: int | None = None  # None: every core
    seed: int = 0
    precision_images: int = 32  # precision section: held-out digits the eps-MSE is measured on
    precision_rows: str | None = None  # precision section: comma-separated row keys (None: every row)
    repaint_full: str | None = None  # precision section: "auto" or a row key: time a whole RePaint run on it


@dataclass
class Setup:
    """The model and the inputs every CPU section shares."""

    cfg: Any
    model: torch.nn.Module
    kept: list  # schedule, original timesteps
    seen: list  # what the U-Net sees for each t_index
    t_index: int  # the schedule entry used for per-step latency (the middle one)
    inputs: dict[str, torch.Tensor]  # x, timesteps (= seen[t_index]), y when class-conditional
    fxpass_proto: Any = None  # the fxpass fp32 ONNX of the fxpass section, kept for the precision section

    def eager_args(self) -> tuple:
        args = (self.inputs["x"], self.inputs["timesteps"])
        return args + ((self.inputs["y"],) if "y" in self.inputs else ())

    def timestep_tensor(self, i: int) -> torch.Tensor:
        return torch.full_like(self.inputs["timesteps"], self.seen[i])


def make_setup(cfg, seed: int = 0) -> Setup:
    from fxpass.checkpoint import init_model
    from fxpass.diffusion import schedule_for
    from fxpass.pipeline import example_inputs_for

    model = init_model(cfg, seed=seed).float().eval()
    _, kept, seen = schedule_for(cfg, "respaced")
    i = len(kept) // 2
    inputs = example_inputs_for(cfg, seen[i], seed=seed, batch=1)
    return Setup(cfg, model, kept, seen, i, inputs)


def op_counts(proto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in proto.graph.node).most_common())


def _graph_summary(proto) -> dict[str, Any]:
    opsets = {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import}
    return {"nodes": len(proto.graph.node), "ops": op_counts(proto), "opset": opsets.get("ai.onnx"),
            "functions": len(proto.functions), "inputs": [i.name for i in proto.graph.input],
            "bytes": proto.ByteSize()}


def _diff(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    err = float(np.max(np.abs(out.astype(np.float64) - ref.astype(np.float64))))
    scale = float(np.max(np.abs(ref))) or 1.0
    return {"max_abs_vs_eager": err, "max_rel_to_scale_vs_eager": err / scale}


def _ort_feed(session, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise RuntimeError(f"ONNX inputs {missing} have no value (graph inputs: {names})")
    return {n: arrays[n] for n in names}


def run_cpu(setup: Setup, opts: Options, *, config_path: str | None, load: LoadSampler,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every CPU section; a section that fails records ``{"error": ...}`` and the rest go on."""
    out: dict[str, Any] = {"batch": 1, "image_size": setup.cfg.image_size, "t_index": setup.t_index,
                           "timestep": setup.kept[setup.t_index], "schedule_length": len(setup.kept)}
    skip = opts.skip
    with torch.inference_mode():
        ref = setup.model(*setup.eager_args()).numpy()

    # ---- build: fxpass in process, and the naive export -----------------------------------------
    fx_session = _build_fxpass(setup, opts, out, load, log) if "fxpass" not in skip else None
    naive_session = _build_naive(setup, opts, out, load, log) if "naive" not in skip else None

    # ---- per-step latency, batch 1, interleaved (alternating rounds) -------------------------------------
    _time_steps(setup, opts, out, ref, {"naive_ort": naive_session, "fxpass_ort": fx_session}, load, log)
    for key, section in (("fxpass_build", "fxpass"), ("fxpass_ort", "fxpass"), ("naive_build", "naive"),
                         ("naive_ort", "naive"), ("eager", "eager")):
        if section in skip:
            out[key] = {"skipped": f"--skip {section}"}
    out["ratios"] = ratios(out)
    out["nodes"] = {
        "naive": out.get("naive_build", {}).get("graph", {}).get("nodes"),
        "fxpass": out.get("fxpass_build", {}).get("graph", {}).get("nodes"),
    }

    # ---- fxpass lower, end to end, as a user runs it --------------------------------------------
    if "cli" not in skip:
        log("fxpass init + fxpass lower (subprocess) ...")
        try:
            out["lower_cli"] = lower_cli(config_path, seed=opts.seed)
        except Exception as exc:  # a timeout, or no way to start the command
            out["lower_cli"] = {"error": short_error(exc)}
        load.sample("after fxpass lower CLI")
    else:
        out["lower_cli"] = {"skipped": "--skip cli"}

    # ---- the sampler's whole schedule ------------------------------------------------------------
    if "schedule" not in skip:
        if fx_session is None:
            out["schedule"] = {"skipped": "the fxpass ORT session is not available"}
        else:
            log(f"schedule ({opts.schedule}) ...")
            try:
                out["schedule"] = run_schedule(setup, fx_session, opts)
            except Exception as exc:
                out["schedule"] = {"error": short_error(exc)}
            load.sample("after schedule")
    else:
        out["schedule"] = {"skipped": "--skip schedule"}
    return out


def _build_fxpass(setup: Setup, opts: Options, out: dict[str, Any], load: LoadSampler,
                  log: Callable[[str], None]):
    """fxpass's lowering, in process: ``out["fxpass_build"]``, and an ONNX Runtime session on it (None when
    either fails); keeps the ONNX in ``setup`` for the precision section."""
    from fxpass.pipeline import lower_with_report

    log("fxpass: lower_with_report (table mode) ...")
    session = None
    try:
        start = time.perf_counter()
        lowered = lower_with_report(setup.model, config=setup.cfg)
        out["fxpass_build"] = {"lower_s": time.perf_counter() - start, "stages_s": dict(lowered.stages),
                               "mode": lowered.mode, "report": _small_report(lowered.report),
                               "graph": _graph_summary(lowered.model)}
        session = ort_session(lowered.model, opts.threads)
        if "precision" not in opts.skip:
            setup.fxpass_proto = lowered.model
        del lowered
    except Exception as exc:
        out["fxpass_build"] = {"error": short_error(exc)}
    load.sample("after fxpass lower")
    return session


def _build_naive(setup: Setup, opts: Options, out: dict[str, Any], load: LoadSampler,
                 log: Callable[[str], None]):
    """The naive export: ``out["naive_build"]``, and an ONNX Runtime session on it (None when either fails)."""
    log("naive: torch.onnx.export(dynamo=True) of the hand-patched model ...")
    session = None
    try:
        from .naive import export_naive

        proto, seconds = export_naive(setup.model, setup.eager_args())
        out["naive_build"] = {"export_s": seconds, "graph": _graph_summary(proto)}
        session = ort_session(proto, opts.threads)
        del proto
    except Exception as exc:
        out["naive_build"] = {"error": short_error(exc)}
    load.sample("after naive export")
    return session


def _time_steps(setup: Setup, opts: Options, out: dict[str, Any], ref: np.ndarray, sessions: dict[str, Any],
                load: LoadSampler, log: Callable[[str], None]) -> None:
    """One step of eager and of each ONNX Runtime session (``naive_ort``, ``fxpass_ort``; None: not built),
    timed in alternating rounds; each output's difference from eager's ``ref`` beside its timing."""
    x_np = setup.inputs["x"].numpy()
    contenders: dict[str, Callable[[], object]] = {}
    results: dict[str, dict[str, Any]] = {}
    if "eager" not in opts.skip:
        args = setup.eager_args()

        def eager_step():
            with torch.inference_mode():
                return setup.model(*args)

        contenders["eager"] = eager_step
    for key, arrays in (
        ("naive_ort", {"x": x_np, "timesteps": setup.inputs["timesteps"].numpy()}),
        ("fxpass_ort", {"x": x_np, "t_index": np.array([setup.t_index], dtype=np.int64)}),
    ):
        session = sessions[key]
        if session is None:
            continue
        if "y" in setup.inputs:
            arrays["y"] = setup.inputs["y"].numpy()
        try:
            feed = _ort_feed(session, arrays)
            results[key] = _diff(session.run(None, feed)[0], ref)
            contenders[key] = (lambda s=session, f=feed: s.run(None, f))
        except Exception as exc:
            out[key] = {"error": short_error(exc)}
    if contenders:
        log(f"{', '.join(contenders)}: {opts.runs} timed runs each, interleaved ...")
        for key, timing in measure_interleaved(contenders, runs=opts.runs, warmup=opts.warmup).items():
            out[key] = {**timing, **results.get(key, {})}
        load.sample("after per-step timings")


def _small_report(report: dict[str, Any]) -> dict[str, Any]:
    keep = ("opset", "precision", "mode", "fx_nodes_captured", "fx_nodes_rewritten", "fx_rewrites",
            "onnx_nodes_exported", "onnx_nodes")
    return {k: report[k] for k in keep if k in report}


def ratios(out: dict[str, Any]) -> dict[str, float | None]:
    def median(key):
        return out.get(key, {}).get("median_s")

    eager, naive, fx = median("eager"), median("naive_ort"), median("fxpass_ort")
    return {
        "fxpass_over_eager": fx / eager if fx and eager else None,
        "fxpass_over_naive": fx / naive if fx and naive else None,
        "naive_over_eager": naive / eager if naive and eager else None,
    }


def fxpass_command() -> list[str]:
    """The ``fxpass`` console script when it is installed beside this Python, else ``python -m fxpass``."""
    script = Path(sys.executable).with_name("fxpass")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("fxpass")
    return [found] if found else [sys.executable, "-m", "fxpass"]


def lower_cli(config_path: str | None, *, seed: int = 0, timeout: float = 1800) -> dict[str, Any]:
    """``fxpass init`` then ``fxpass lower --report``: wall time of the lower subprocess, and its stages."""
    base = fxpass_command()
    cfg_args = ["--config", str(config_path)] if config_path else []
    with tempfile.TemporaryDirectory(prefix="fxpass-bench-") as tmp:
        ckpt, onnx_path, report_path = Path(tmp, "model.pt"), Path(tmp, "model.onnx"), Path(tmp, "report.json")
        init_cmd = base + ["init", str(ckpt), "--seed", str(seed)] + cfg_args
        start = time.perf_counter()
        done = subprocess.run(init_cmd, capture_output=True, text=True, timeout=timeout)
        init_s = time.perf_counter() - start
        if done.returncode != 0:
            return {"error": f"fxpass init exited {done.returncode}: {_tail(done.stderr)}", "command": init_cmd}
        lower_cmd = base + ["lower", str(ckpt), "-o", str(onnx_path), "--report", str(report_path)] + cfg_args
        start = time.perf_counter()
        done = subprocess.run(lower_cmd, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - start
        shown = ["fxpass"] + lower_cmd[len(base):]
        shown = [a if not a.startswith(tmp) else Path(a).name for a in shown]
        result: dict[str, Any] = {"command": " ".join(shown), "init_s": init_s, "wall_s": wall,
                                  "returncode": done.returncode}
        if not report_path.is_file():
            result["error"] = f"fxpass lower exited {done.returncode} without a report: {_tail(done.stderr)}"
            return result
        report = json.loads(report_path.read_text(encoding="utf-8"))
        stages = ordered_stages(report.get("stages_s", {}))
        result.update({
            "report_total_s": report.get("total_s"),
            "stages_s": stages,
            # what the command's own clock saw beyond its stages: loading the checkpoint and the
            # ONNX Runtime-vs-PyTorch check (the report has no stage entry for either)
            "check_and_other_s": (report["total_s"] - sum(stages.values())) if "total_s" in report else None,
            # interpreter start and imports: outside the command's own clock
            "startup_s": (wall - report["total_s"]) if "total_s" in report else None,
            "onnx_nodes": report.get("onnx_nodes"),
            "file_bytes": report.get("file_bytes"),
            "check_passed": _as_bool(report.get("check", {}).get("passed")),
            "check_max_rel_to_scale": report.get("check", {}).get("max_rel_to_scale"),
            "check_ort_latency_s": report.get("check", {}).get("ort_latency_s"),
        })
        return result


STAGE_ORDER = ("load", "capture", "passes", "export", "surgery", "fp16", "check", "write")


def ordered_stages(stages: dict[str, float]) -> dict[str, float]:
    """Stages in pipeline order (the report JSON has them sorted by name), unknown ones last."""
    rank = {name: k for k, name in enumerate(STAGE_ORDER)}
    return dict(sorted(stages.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def _as_bool(value) -> bool | None:
    """The report writes numpy booleans through ``default=str``: "True" / "False"."""
    if value is None or isinstance(value, bool):
        return value
    return str(value).strip().lower() == "true"


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join((text or "").strip().splitlines()[-lines:])


def schedule_indices(n: int, mode: str, sample_steps: int) -> list[int]:
    if mode == "full" or sample_steps >= n:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, sample_steps)})


def run_schedule(setup: Setup, fx_session, opts: Options) -> dict[str, Any]:
    """One ORT session looping over t_index vs one eager call per step (every step, or a sample)."""
    n = len(setup.kept)
    indices = schedule_indices(n, opts.schedule, opts.schedule_steps)
    full = len(indices) == n
    x_np = setup.inputs["x"].numpy()
    extra = {"y": setup.inputs["y"].numpy()} if "y" in setup.inputs else {}
    feeds = [_ort_feed(fx_session, {"x": x_np, "t_index": np.array([i], dtype=np.int64), **extra}) for i in indices]
    eager_args = [(setup.inputs["x"], setup.timestep_tensor(i)) + ((setup.inputs["y"],) if extra else ())
                  for i in indices]

    def loop(step_fns) -> tuple[float, list[float]]:
        times = []
        start = time.perf_counter()
        for fn in step_fns:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return time.perf_counter() - start, times

    ort_wall, ort_steps = loop([lambda f=f: fx_session.run(None, f) for f in feeds])
    with torch.inference_mode():
        eager_wall, eager_steps = loop([lambda a=a: setup.model(*a) for a in eager_args])

    def side(wall: float, steps: list[float]) -> dict[str, Any]:
        total = wall if full else float(np.mean(steps)) * n
        return {"total_s": total, "measured_wall_s": wall, "per_step": timing_from(steps)}

    ort_side, eager_side = side(ort_wall, ort_steps), side(eager_wall, eager_steps)
    return {
        "mode": "full" if full else "sample",
        "extrapolated": not full,
        "steps_total": n,
        "steps_timed": len(indices),
        "t_indices": indices,
        "how": ("every step timed" if full else
                f"{len(indices)} evenly spaced steps timed; total = mean step × {n} (extrapolated)"),
        "fxpass_ort": ort_side,
        "eager": eager_side,
        "fxpass_over_eager": ort_side["total_s"] / eager_side["total_s"],
    }
