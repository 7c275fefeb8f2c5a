"""The GPU section: runs only where torch sees a CUDA device; otherwise it records why it was skipped.

Per-step latency at batch 1 and batch 8 of:
- eager float32, and eager float16 the way upstream ``use_fp16`` runs (convolutions of the torso in
  float16, GroupNorm and the time MLP in float32);
- fxpass's rewritten GraphModule (``fxpass.rewrite(fxpass.capture(...))``, table mode, fed
  ``t_index``) of that float16 model under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs);
- TensorRT fp16 through ``targets/trt.py`` where both TensorRT and that module exist;
with utilisation against the FLOPs counted on the CPU (``bench.flops``).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .flops import gpu_peak, utilisation
from .harness import gpu_info, measure, short_error

BATCHES = (1, 8)


def skip_reason() -> str | None:
    """Why the GPU section cannot run here, or None."""
    if not torch.cuda.is_available():
        build = torch.version.cuda
        why = f"torch {torch.__version__} is a CPU-only build" if build is None else "no CUDA device visible"
        return f"no CUDA device: torch.cuda.is_available() is False ({why})"
    return None


def fp16_model(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` as upstream ``use_fp16=True`` runs it: torso convolutions in float16."""
    half = copy.deepcopy(model)
    half.convert_to_fp16()
    half.dtype = torch.float16
    return half.eval()


def fx_graph(model: torch.nn.Module, cfg, seen: list, batch: int, device: torch.device | str):
    """``rewrite(capture(model, example), timesteps=seen)``: the table-mode GraphModule and its inputs."""
    from fxpass import capture, rewrite
    from fxpass.pipeline import example_inputs_for

    example = {k: v.to(device) for k, v in example_inputs_for(cfg, seen[-1], batch=batch).items()}
    gm = rewrite(capture(model, example), timesteps=seen)
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    return gm, names


def fx_args(names: list[str], x: torch.Tensor, t_index: int, y: torch.Tensor | None = None) -> tuple:
    values = {"x": x, "t_index": torch.full((x.shape[0],), t_index, dtype=torch.int64, device=x.device)}
    if y is not None:
        values["y"] = y
    missing = [n for n in names if n not in values]
    if missing:
        raise RuntimeError(f"graph inputs {missing} have no value")
    return tuple(values[n] for n in names)


def run_gpu(setup, opts, *, flops_per_step: float | None, log: Callable[[str], None] = print,
            device: str = "cuda", compile_mode: str | None = "reduce-overhead") -> dict[str, Any]:
    """Every GPU row; a row that fails records its error and the others go on.

    ``device="cpu"`` (with ``compile_mode=None``, no TensorRT) walks the same code on the CPU: a dry
    run of the section's logic for machines without a GPU, not a measurement to report.
    """
    on_cuda = device == "cuda"
    if on_cuda:
        reason = skip_reason()
        if reason:
            return {"skipped": reason}
    info = (gpu_info() or {}) if on_cuda else {"name": "cpu (dry run)", "cuda": None}
    peak = gpu_peak(info.get("name", ""))
    out: dict[str, Any] = {"device": info, "peak": {"matched": peak[0], **{k: v / 1e12 for k, v in peak[1].items()}}
                           if peak else None, "rows": [],
                           "settings": {"cudnn_benchmark": torch.backends.cudnn.benchmark,
                                        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                                        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                                        "compile_mode": compile_mode}}
    rows = _Rows(out["rows"], opts, torch.cuda.synchronize if on_cuda else None, flops_per_step, peak, log)
    model32 = copy.deepcopy(setup.model).to(device)  # setup.model stays on the CPU
    model16 = fp16_model(setup.model).to(device)
    trt_state = _trt_available() if on_cuda else "dry run on the CPU"
    compiled_name = f"fxpass fx graph + torch.compile({compile_mode})" if compile_mode else "fxpass fx graph (eager)"
    try:
        for batch in BATCHES:
            gen = torch.Generator().manual_seed(opts.seed)
            x = torch.randn(batch, 3, setup.cfg.image_size, setup.cfg.image_size, generator=gen).to(device)
            t = torch.full((batch,), setup.seen[setup.t_index], dtype=setup.inputs["timesteps"].dtype, device=device)
            y = torch.zeros(batch, dtype=torch.int64, device=device) if setup.cfg.class_cond else None
            eager_args = (x, t) + ((y,) if y is not None else ())
            rows.add("eager PyTorch", "fp32", batch, _eager_step(model32, eager_args))
            rows.add("eager PyTorch (use_fp16)", "fp16", batch, _eager_step(model16, eager_args))
            # fxpass GraphModule, float16, torch.compile reduce-overhead (CUDA graphs)
            _fx_row(rows, compiled_name, model16, setup, batch, x, y, device=device, compile_mode=compile_mode,
                    count_cudagraph_skips=compile_mode == "reduce-overhead" and on_cuda)
            torch.compiler.reset()
            # TensorRT fp16 through targets/trt.py
            _trt_row(rows, trt_state, setup, batch, x, y)
    finally:
        del model32, model16
        if on_cuda:
            torch.cuda.empty_cache()
    return out


@dataclass
class _Rows:
    """Measures the section's rows into ``rows`` (utilisation from the FLOPs and the device's peak where
    known); a row that fails, or cannot run here, records why."""

    rows: list
    opts: Any
    sync: Callable[[], object] | None
    flops_per_step: float | None
    peak: tuple[str, dict[str, float]] | None
    log: Callable[[str], None]

    def add(self, name: str, precision: str, batch: int, fn: Callable[[], object] | None, error: str | None = None,
            **extra) -> None:
        entry: dict[str, Any] = {"name": name, "precision": precision, "batch": batch, **extra}
        if error is None and fn is not None:
            try:
                entry.update(measure(fn, runs=self.opts.runs, warmup=max(self.opts.warmup, 3), sync=self.sync))
                if self.flops_per_step:
                    entry.update(utilisation(self.flops_per_step, batch, entry["median_s"],
                                             self.peak[1][precision] if self.peak else None))
            except Exception as exc:
                entry["error"] = short_error(exc)
        elif error is not None:
            entry["skipped" if error.startswith("skipped: ") else "error"] = error.removeprefix("skipped: ")
        self.rows.append(entry)
        self.log(f"gpu: {name} batch {batch}: " + (f"{entry['median_s'] * 1e3:.2f} ms" if "median_s" in entry
                                                   else entry.get("error") or entry.get("skipped")))


def _eager_step(model: torch.nn.Module, args: tuple) -> Callable[[], object]:
    def step():
        with torch.inference_mode():
            return model(*args)
    return step


def _fx_row(rows: _Rows, name: str, model16: torch.nn.Module, setup, batch: int, x: torch.Tensor, y, *,
            device: str, compile_mode: str | None, count_cudagraph_skips: bool) -> None:
    """fxpass's rewritten GraphModule of the float16 model, under ``torch.compile(mode=compile_mode)``."""
    try:
        gm, names = fx_graph(model16, setup.cfg, setup.seen, batch, device)
        compiled = torch.compile(gm, mode=compile_mode) if compile_mode else gm
        args = fx_args(names, x, setup.t_index, y)

        def fx_step(c=compiled, a=args):
            with torch.no_grad():  # CUDA graph trees and inference-mode tensors do not always mix
                return c(*a)

        skips_before = _cudagraph_skips()
        rows.add(name, "fp16", batch, fx_step)
        if count_cudagraph_skips:
            # non-zero: inductor fell back to running without CUDA graphs (the log says why)
            rows.rows[-1]["cudagraph_skips"] = _cudagraph_skips() - skips_before
        del compiled, gm
    except Exception as exc:
        rows.add(name, "fp16", batch, None, short_error(exc))


def _trt_row(rows: _Rows, trt_state: str | None, setup, batch: int, x: torch.Tensor, y) -> None:
    """TensorRT fp16 through targets/trt.py, or why it is skipped (``trt_state``)."""
    name = "TensorRT (fxpass ONNX)"
    if trt_state is not None:
        rows.add(name, "fp16", batch, None, f"skipped: {trt_state}")
        return
    try:
        step, cleanup = _trt_step(setup, batch, x, setup.t_index, y)
    except Exception as exc:
        rows.add(name, "fp16", batch, None, short_error(exc))
        return
    try:
        rows.add(name, "fp16", batch, step)
    finally:
        cleanup()


def _cudagraph_skips() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"].get("cudagraph_skips", 0))
    except Exception:
        return 0


def _trt_available() -> str | None:
    """None when TensorRT fp16 can be tried, else the reason it is skipped."""
    try:
        import targets.trt as trt_target
    except ModuleNotFoundError:
        return "targets/trt.py does not exist"
    if not callable(getattr(trt_target, "trt_runner", None)) or not hasattr(trt_target, "TrtSettings"):
        return "targets/trt.py has no trt_runner(onnx_path, TrtSettings(...)); adapt bench/gpu.py"
    reason = getattr(trt_target, "trt_unavailable_reason", lambda: None)()
    if reason:
        return reason
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install -e '.[trt]')"
    return None


def _trt_step(setup, batch: int, x: torch.Tensor, t_index: int, y):
    """Lower at this batch (fp32 ONNX, static shapes), build an fp16 engine via targets.trt, and a step fn.

    The engine allows fp16 kernels with normalization and softmax pinned to float32 (``TrtSettings``'s
    default islands).  Feeds torch CUDA tensors, which Polygraphy's ``TrtRunner.infer`` takes as they are.
    """
    import targets.trt as trt_target
    from fxpass.pipeline import example_inputs_for, lower_with_report

    cfg = setup.cfg
    example = example_inputs_for(cfg, setup.seen[-1], batch=batch)
    lowered = lower_with_report(setup.model, example, config=cfg)
    tmp = tempfile.TemporaryDirectory(prefix="fxpass-bench-trt-")
    path = Path(tmp.name, f"unet-b{batch}.onnx")
    path.write_bytes(lowered.model.SerializeToString())
    del lowered
    runner = trt_target.trt_runner(str(path), trt_target.TrtSettings(fp16=True))
    try:
        runner.activate()
    except BaseException:
        tmp.cleanup()
        raise
    feed = {"x": x.contiguous(), "t_index": torch.full((batch,), t_index, dtype=torch.int64, device=x.device)}
    if y is not None:
        feed["y"] = y

    def step():
        return runner.infer(feed)

    def cleanup():
        runner.deactivate()
        tmp.cleanup()

    return step, cleanup
