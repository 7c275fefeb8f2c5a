"""Timing, thread settings, machine description and the results file: the mechanics every section shares."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MIN_RUNS = 7
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def measure(fn: Callable[[], object], *, runs: int = MIN_RUNS, warmup: int = 2,
            sync: Callable[[], object] | None = None) -> dict[str, Any]:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times timed; the median is the figure.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before the clock starts and before it stops,
    so asynchronous devices are timed to completion.  Returns seconds: ``median_s`` and every sample.
    """
    if runs < MIN_RUNS:
        raise ValueError(f"runs must be at least {MIN_RUNS} (got {runs})")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter() - start)
    return timing_from(samples, warmup=warmup)


def measure_interleaved(fns: dict[str, Callable[[], object]], *, runs: int = MIN_RUNS, warmup: int = 2
                        ) -> dict[str, dict[str, Any]]:
    """Like :func:`measure` for several functions, timed in alternating rounds (a, b, c, c, b, a, ...).

    Interleaving spreads slow drifts of the machine (other load, clock changes) over every
    contender instead of biasing whichever ran last, so their ratios are fairer; reversing every
    other round stops one contender from always running right after the same other one (whose
    runtime's worker threads may still be spinning when it starts).
    """
    if runs < MIN_RUNS:
        raise ValueError(f"runs must be at least {MIN_RUNS} (got {runs})")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for round_index in range(runs):
        for name, fn in (order if round_index % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: {**timing_from(values, warmup=warmup), "interleaved": True} for name, values in samples.items()}


def timing_from(samples: list[float], *, warmup: int = 0) -> dict[str, Any]:
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "runs": len(samples),
        "warmup": warmup,
        "samples_s": list(samples),
    }


def set_threads(threads: int | None = None) -> int:
    """torch intra-op threads = ``threads`` (default: every core); returns the number used."""
    import torch

    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def ort_session(model, threads: int | None = None):
    """An ONNX Runtime CPU session with ``intra_op_num_threads`` = every core (or ``threads``)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


class LoadSampler:
    """Records the 1-minute load average at named points of a run (the machine may be shared)."""

    def __init__(self) -> None:
        self.points: list[dict[str, Any]] = []

    def sample(self, where: str) -> None:
        try:
            one, five, fifteen = os.getloadavg()
        except OSError:  # not on every platform
            return
        self.points.append({"at": where, "load1": round(one, 2), "load5": round(five, 2), "load15": round(fifteen, 2)})

    def summary(self) -> dict[str, Any]:
        ones = [p["load1"] for p in self.points]
        return {"samples": self.points, "max_load1": max(ones) if ones else None,
                "mean_load1": round(sum(ones) / len(ones), 2) if ones else None}


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found.group(1).strip() if found else (platform.processor() or platform.machine())


def _ram_bytes() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text(encoding="utf-8")
    except OSError:
        return None
    found = re.search(r"^MemTotal:\s*(\d+)\s*kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def gpu_info() -> dict[str, Any] | None:
    """The CUDA device torch sees, or None."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        return {"name": props.name, "capability": f"{props.major}.{props.minor}",
                "memory_bytes": int(props.total_memory), "cuda": torch.version.cuda}
    except Exception:
        return None


def machine_info() -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    import fxpass

    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": _ram_bytes(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnxscript": _version("onnxscript"),
            "onnxslim": _version("onnxslim"),
            "tensorrt": _version("tensorrt"),
            "openvino": _version("openvino"),
            "nncf": _version("nncf"),
            "fxpass": fxpass.__version__,
        },
        "gpu": gpu_info(),
    }


def host_kind(machine: dict[str, Any]) -> str:
    """``cpu2``, ``cpu16-nvidia-h100-80gb-hbm3``: how many cores, and the GPU if any."""
    kind = f"cpu{machine.get('cores') or 0}"
    gpu = machine.get("gpu")
    if gpu:
        kind += "-" + re.sub(r"[^a-z0-9]+", "-", gpu["name"].lower()).strip("-")
    return kind


def now_utc() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def results_path(results: dict[str, Any], directory: Path = RESULTS_DIR) -> Path:
    """``<dir>/<date>-<host-kind>.json`` for the CAMUS config; other configs add their name."""
    date = results["date"][:10]
    name = f"{date}-{host_kind(results['machine'])}"
    if results["config"]["name"] != "CAMUS":
        name += "-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", results["config"]["name"])
    return directory / f"{name}.json"


def write_results(results: dict[str, Any], path: Path) -> Path:
    from fxpass.fileio import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, sort_keys=False, default=_json_default) + "\n"
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))
    return path


def _json_default(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:
        pass
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def short_error(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
