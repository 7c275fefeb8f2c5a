"""``fxpass check`` (an ONNX model against PyTorch, ONNX Runtime, TensorRT, golden sets) and ``fxpass golden``.

Both go through Polygraphy: runners from ``targets/`` run seeded feeds with ``Comparator.run``;
golden sets are Polygraphy's own JSON (a list of feed dicts, a ``RunResults``), so that
``polygraphy run MODEL.onnx --onnxrt --load-inputs ... --load-outputs ...`` replays them.

Exit codes of ``check``: 0 every requested comparison passed; 1 a numeric failure (or a target that
failed to run); 3 a requested target is unavailable here (and nothing failed); 2 usage/file errors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FxpassError
from .fileio import atomic_write_bytes, check_writable_target

TARGETS = ("torch", "ort", "trt")
REFERENCE_NAME = "torch-fp32"
GOLDEN_FORMAT = 1
EXIT_FAILED = 1
EXIT_UNAVAILABLE = 3
#: placeholder for the model path in a golden set's regression command when no --onnx was given
ONNX_PLACEHOLDER = "MODEL.onnx"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# ---- the ONNX model's own description (metadata written by fxpass lower) ----------------------------
@dataclass
class OnnxInfo:
    path: Path
    mode: str  # "table" or "fixed"
    timesteps: list  # original timestep per t_index (table) or [T] (fixed)
    model_timesteps: list | None  # what the U-Net sees, when the metadata says
    config: dict | None
    precision: str
    inputs: dict[str, tuple[str, list]]  # name -> (numpy dtype name, shape with -1 for symbolic dims)


_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 11: "float64"}


def read_onnx_info(path: str | os.PathLike) -> OnnxInfo:
    import onnx

    path = Path(path)
    if not path.exists():
        raise FxpassError(f"{path}: no such file")
    if path.is_dir():
        raise FxpassError(f"{path}: is a directory, expected an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise FxpassError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if "fxpass.mode" not in meta or "fxpass.timesteps" not in meta:
        raise FxpassError(f"{path}: not an fxpass model (no fxpass.mode / fxpass.timesteps metadata); "
                          "lower it with fxpass lower")

    def load(key, kind):
        try:
            value = json.loads(meta[key])
        except json.JSONDecodeError:
            raise FxpassError(f"{path}: metadata {key} is not valid JSON") from None
        if not isinstance(value, kind):
            raise FxpassError(f"{path}: metadata {key} must be a JSON {kind.__name__}")
        return value

    mode = meta["fxpass.mode"]
    if mode == "step":
        raise FxpassError(f"{path}: a step graph (fxpass lower --step-graph); fxpass check compares table and fixed "
                          "models — step graphs are checked by fxpass lower itself, against the eager model and the "
                          "NumPy posterior")
    if mode not in ("table", "fixed"):
        raise FxpassError(f"{path}: metadata fxpass.mode is {mode!r}, expected 'table' or 'fixed'")
    timesteps = load("fxpass.timesteps", list)
    if not timesteps:
        raise FxpassError(f"{path}: metadata fxpass.timesteps is empty")
    seen = load("fxpass.model_timesteps", list) if "fxpass.model_timesteps" in meta else None
    if seen is not None and len(seen) != len(timesteps):
        raise FxpassError(f"{path}: metadata fxpass.model_timesteps has {len(seen)} entries, "
                          f"fxpass.timesteps {len(timesteps)}")
    config = load("fxpass.config", dict) if "fxpass.config" in meta else None
    initializers = {init.name for init in model.graph.initializer}
    inputs = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        inputs[inp.name] = (_ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)), shape)
    if "x" not in inputs:
        raise FxpassError(f"{path}: has no input named x (inputs: {', '.join(inputs)})")
    if mode == "table" and "t_index" not in inputs:
        raise FxpassError(f"{path}: table-mode model without a t_index input")
    precision = meta.get("fxpass.precision", "fp32")
    return OnnxInfo(path, mode, timesteps, seen, config, precision, inputs)


def resolve_config(config_path: str | None, info: OnnxInfo | None):
    """--config if given, else the ONNX model's fxpass.config metadata, else the built-in CAMUS."""
    from .config import CAMUS, from_dict, load_config

    if config_path:
        return load_config(config_path)
    if info is not None and info.config is not None:
        return from_dict(info.config, source=f"{info.path}: metadata fxpass.config")
    return CAMUS


def _model_timesteps(info: OnnxInfo, cfg) -> list:
    from .schedule import model_timesteps

    if info.model_timesteps is not None:
        return list(info.model_timesteps)
    return model_timesteps(cfg.diffusion_steps, info.timesteps, cfg.rescale_timesteps)


# ---- seeded feeds ---------------------------------------------------------------------------------
@dataclass
class Feeds:
    feeds: list[dict]
    labels: list[dict]  # per feed: t_index / timestep / model_timestep


def make_feeds(*, mode: str, timesteps: list, model_ts: list, x_shape: list, class_cond: bool, seed: int,
               t_indices: list[int] | None = None, count: int = 3) -> Feeds:
    """One seeded ``x`` (standard normal, float32) per t_index (table mode) or ``count`` of them (fixed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = [1 if d is None or d < 0 else int(d) for d in x_shape]
    batch = shape[0]
    feeds, labels = [], []
    items = t_indices if mode == "table" else list(range(count))
    for item in items:
        feed = {"x": rng.standard_normal(shape, dtype=np.float32)}
        if mode == "table":
            feed["t_index"] = np.full((batch,), item, dtype=np.int64)
            label = {"t_index": int(item), "timestep": timesteps[item], "model_timestep": model_ts[item]}
        else:
            label = {"input": int(item), "timestep": timesteps[0], "model_timestep": model_ts[0]}
        if class_cond:
            feed["y"] = rng.integers(0, 1000, size=(batch,), dtype=np.int64)
        feeds.append(feed)
        labels.append(label)
    return Feeds(feeds, labels)


def spread(n: int, k: int = 5) -> list[int]:
    """``k`` t_index values spread evenly over ``0..n-1`` (both ends included)."""
    import numpy as np

    return sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n, k))})


def reference_runner(model, *, mode: str, model_ts: list, image_size: int):
    from targets.torch_ref import TorchReferenceRunner

    if mode == "table":
        return TorchReferenceRunner(model, timesteps=model_ts, image_size=image_size, name=REFERENCE_NAME)
    return TorchReferenceRunner(model, fixed_timestep=model_ts[0], image_size=image_size, name=REFERENCE_NAME)


# ---- fxpass check -----------------------------------------------------------------------------------
def parse_targets(text: str | None) -> list[str]:
    items = [t.strip().lower() for t in (text or "").split(",") if t.strip()]
    if not items:
        raise FxpassError(f"--targets {text!r}: give one or more of {', '.join(TARGETS)}")
    aliases = {"onnxrt": "ort", "onnxruntime": "ort", "tensorrt": "trt", "pytorch": "torch"}
    out: list[str] = []
    for item in items:
        item = aliases.get(item, item)
        if item not in TARGETS:
            raise FxpassError(f"--targets {text}: unknown target '{item}' (choose from {', '.join(TARGETS)})")
        if item not in out:
            out.append(item)
    return out


def _tolerance(text: str) -> tuple[float, float]:
    from targets.compare import parse_tolerance

    try:
        return parse_tolerance(text)
    except ValueError as exc:
        raise FxpassError(f"--tolerance: {exc}") from None


@dataclass
class Row:
    """One line of the check's table."""

    reference: str
    target: str
    status: str  # "pass", "FAIL", "unavailable", "error"
    detail: str = ""
    inputs: int = 0
    max_abs: float | None = None
    max_rel: float | None = None
    tolerance: tuple[float, float] | None = None
    per_iteration: list = field(default_factory=list)


def _run_each(runners: list, feeds: list[dict]):
    """Run each runner on its own (one failing runner does not lose the others' results).

    Returns (RunResults of those that ran, {runner name: error line})."""
    from polygraphy.comparator import RunResults

    from targets.compare import run_runners

    merged, errors = RunResults(), {}
    for runner in runners:
        try:
            results = run_runners([runner], feeds)
        except Exception as exc:  # Polygraphy reports runner failures as its own exception type
            errors[runner.name] = _first_line(exc)
            continue
        for name, iterations in results.items():
            merged[name] = iterations
    return merged, errors


def _compare_rows(results, reference: str, tol: tuple[float, float], labels: list[dict],
                  ref_label: str | None = None) -> list[Row]:
    from targets.compare import compare

    rows = []
    for pair in compare(results, reference=reference, atol_scale=tol[0], rtol=tol[1], meta=labels):
        rows.append(Row(ref_label or reference, pair.target, "pass" if pair.passed else "FAIL", "",
                        len(labels), pair.max_abs, pair.max_rel_to_scale, tol, pair.per_iteration))
    return rows


def load_golden(directory: str | os.PathLike):
    """(manifest, feeds, RunResults) of a golden set written by ``fxpass golden``."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    from targets.compare import polygraphy_severity

    directory = Path(directory)
    if not directory.is_dir():
        raise FxpassError(f"{directory}: no such golden set (expected a directory with manifest.json)")
    paths = {name: directory / f"{name}.json" for name in ("manifest", "inputs", "outputs")}
    for name, p in paths.items():
        if not p.is_file():
            raise FxpassError(f"{p}: missing from the golden set")
    try:
        manifest = json.loads(paths["manifest"].read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FxpassError(f"{paths['manifest']}: not valid JSON ({exc})") from None
    try:
        with polygraphy_severity(False):
            feeds = load_json(str(paths["inputs"]), description="input data")
    except Exception as exc:
        raise FxpassError(f"{paths['inputs']}: not Polygraphy input data ({_first_line(exc)})") from None
    if not isinstance(feeds, list) or not feeds or not all(isinstance(f, dict) for f in feeds):
        raise FxpassError(f"{paths['inputs']}: expected a non-empty list of feed dicts")
    try:
        with polygraphy_severity(False):
            outputs = RunResults.load(str(paths["outputs"]))
    except Exception as exc:
        raise FxpassError(f"{paths['outputs']}: not Polygraphy RunResults ({_first_line(exc)})") from None
    if len(outputs) != 1:
        raise FxpassError(f"{paths['outputs']}: expected the results of one reference runner, found {len(outputs)}")
    name, iterations = outputs[0]
    if len(iterations) != len(feeds):
        raise FxpassError(f"{paths['outputs']}: {len(iterations)} iterations for {len(feeds)} inputs")
    return manifest, feeds, outputs


def _golden_labels(manifest: dict, feeds: list[dict], info: OnnxInfo, directory: Path) -> list[dict]:
    """Per-feed labels, after checking that the set fits the model (input shapes, schedule)."""
    import numpy as np

    for name, (dtype, shape) in info.inputs.items():
        for feed in feeds:
            if name not in feed:
                raise FxpassError(f"{directory}: inputs lack {name}, which {info.path.name} needs")
            arr = np.asarray(feed[name])
            if len(arr.shape) != len(shape) or any(s >= 0 and s != a for s, a in zip(shape, arr.shape)):
                raise FxpassError(f"{directory}: input {name} has shape {tuple(arr.shape)}, "
                                  f"{info.path.name} expects {tuple(shape)}")
    iterations = manifest.get("iterations") or [{} for _ in feeds]
    labels = []
    for k, (feed, it) in enumerate(zip(feeds, iterations)):
        label = {"iteration": k}
        if info.mode == "table":
            indices = {int(v) for v in np.asarray(feed["t_index"]).ravel()}
            if any(not 0 <= i < len(info.timesteps) for i in indices):
                raise FxpassError(f"{directory}: t_index {sorted(indices)} outside {info.path.name}'s schedule "
                                  f"of {len(info.timesteps)} steps")
            i = min(indices)
            label.update(t_index=i, timestep=info.timesteps[i])
            if "timestep" in it and it.get("t_index") == i and it["timestep"] != info.timesteps[i]:
                raise FxpassError(f"{directory}: golden t_index {i} is timestep {it['timestep']}, "
                                  f"{info.path.name} maps it to {info.timesteps[i]} (different schedule)")
        else:
            if "timestep" in it and it["timestep"] != info.timesteps[0]:
                raise FxpassError(f"{directory}: golden timestep {it['timestep']}, {info.path.name} is "
                                  f"fixed at {info.timesteps[0]}")
            label.update(timestep=info.timesteps[0])
        labels.append(label)
    return labels


def _plot(path: Path, rows: list[Row], info: OnnxInfo, tol: tuple[float, float]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for row in rows:
        points = sorted((e["timestep"], max(e["rel_to_scale"], 1e-12)) for e in row.per_iteration)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", linewidth=1,
                label=f"{row.target} vs {row.reference}")
    ax.axhline(tol[0], color="tab:red", linestyle="--", linewidth=1, label=f"tolerance {tol[0]:g}·max|ref|")
    ax.set_yscale("log")
    ax.set_xlabel("timestep" + (" (fixed)" if info.mode == "fixed" else f" ({len(info.timesteps)} steps, every t_index)"))
    ax.set_ylabel("max |diff| / max |reference|")
    ax.set_title(f"{info.path.name}: error against PyTorch over the schedule")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, lambda fh: fh.write(buffer.getvalue()))


def _timing_cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fxpass"
    return base / "trt-timing.cache"


def cmd_check(args) -> int:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    info = read_onnx_info(args.onnx)
    targets = parse_targets(args.targets) if args.targets else (
        ["torch", "ort"] if args.model or not args.golden else ["ort"])
    if "torch" in targets and not args.model:
        raise FxpassError("--model MODEL.pt is needed for the torch reference (or give --golden DIR "
                          "and --targets without torch)")
    if len(targets) == 1 and targets[0] != "torch" and not args.golden:
        raise FxpassError(f"--targets {targets[0]}: nothing to compare against; add torch or give --golden DIR")
    if targets == ["torch"] and not args.golden:
        raise FxpassError("--targets torch: nothing to compare against; add ort or trt")
    if args.plot:
        if "torch" not in targets or "ort" not in targets:
            raise FxpassError("--plot draws ONNX Runtime against PyTorch: it needs the torch and ort targets")
        if importlib.util.find_spec("matplotlib") is None:
            raise FxpassError("--plot: matplotlib is not installed (pip install 'fxpass[plot]')")
        check_writable_target(args.plot)
    cfg = resolve_config(args.config, info)
    precision = info.precision
    tol = _tolerance(args.tolerance) if args.tolerance else None
    fp16_build = precision == "fp16" or args.tolerance == "fp16"

    runners: list = []
    rows: list[Row] = []
    unavailable: dict[str, str] = {}
    if "ort" in targets:
        from targets.ort import ort_runner

        runners.append(ort_runner(str(info.path), cuda=None))
    if "trt" in targets:
        from targets.trt import TrtSettings, trt_runner, trt_unavailable_reason

        reason = trt_unavailable_reason()
        if reason:
            unavailable["tensorrt"] = reason
        else:
            settings = TrtSettings(fp16=fp16_build, tf32=fp16_build, timing_cache=_timing_cache_path())
            _timing_cache_path().parent.mkdir(parents=True, exist_ok=True)
            runners.append(trt_runner(str(info.path), settings))
    t0 = time.perf_counter()

    # 1. against the eager model
    if "torch" in targets:
        from targets.compare import TOLERANCES

        from .checkpoint import load_model

        model = load_model(args.model, cfg, trust_pickle=args.trust_pickle)
        seen = _model_timesteps(info, cfg)
        n = len(info.timesteps)
        t_indices = (list(range(n)) if args.plot else spread(n)) if info.mode == "table" else None
        feeds = make_feeds(mode=info.mode, timesteps=info.timesteps, model_ts=seen, x_shape=info.inputs["x"][1],
                           class_cond="y" in info.inputs, seed=args.seed, t_indices=t_indices)
        x_size = info.inputs["x"][1][-1]
        err.print(f"running {len(feeds.feeds)} seeded inputs on {REFERENCE_NAME}"
                  + "".join(f", {r.name}" for r in runners) + " …", markup=False)
        reference = reference_runner(model, mode=info.mode, model_ts=seen, image_size=x_size)
        results, errors = _run_each([reference, *runners], feeds.feeds)
        if REFERENCE_NAME in errors:
            raise FxpassError(f"{args.model}: the PyTorch reference failed on {info.path.name}'s inputs "
                              f"({errors[REFERENCE_NAME]})")
        torch_tol = tol or TOLERANCES.get(precision, TOLERANCES["fp32"])
        torch_rows = _compare_rows(results, REFERENCE_NAME, torch_tol, feeds.labels)
        rows += torch_rows
        rows += [Row(REFERENCE_NAME, name, "error", why) for name, why in errors.items()]
        if args.plot:
            _plot(Path(args.plot), [r for r in torch_rows if r.target.startswith("onnxrt")], info, torch_tol)

    # 2. against a golden set
    if args.golden:
        golden_dir = Path(args.golden)
        manifest, gfeeds, gresults = load_golden(golden_dir)
        labels = _golden_labels(manifest, gfeeds, info, golden_dir)
        golden_runners = [r for r in runners]
        if not golden_runners and not unavailable:
            raise FxpassError("--golden: compares ONNX Runtime or TensorRT with the golden outputs; "
                              "add ort or trt to --targets")
        gname = "golden"
        combined = type(gresults)()
        combined[gname] = gresults[0][1]
        results, errors = _run_each(golden_runners, gfeeds)
        for name, iterations in results.items():
            combined[name] = iterations
        if tol is not None:
            golden_tol = tol
        else:
            entry = (manifest.get("tolerances") or {}).get(precision) or {}
            from targets.compare import TOLERANCES

            golden_tol = (float(entry.get("atol_scale", TOLERANCES.get(precision, TOLERANCES["fp32"])[0])),
                          float(entry.get("rtol", TOLERANCES.get(precision, TOLERANCES["fp32"])[1])))
        rows += _compare_rows(combined, gname, golden_tol, labels)
        rows += [Row(gname, name, "error", why) for name, why in errors.items()]

    for name, reason in unavailable.items():
        rows.append(Row("—", name, "unavailable", reason))

    title = escape(f"fxpass check {info.path}" + (f" (golden: {args.golden})" if args.golden else ""))
    counts = sorted({(r.reference, r.inputs) for r in rows if r.inputs})
    caption = ("rel = max|diff| / max|reference|, which the tolerance bounds; inputs: "
               + ", ".join(f"{n} against {ref}" for ref, n in counts))
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, caption=escape(caption),
                  caption_justify="left")
    for column in ("reference", "target", "max abs", "max rel", "tolerance", "result"):
        table.add_column(column, justify="right" if column in ("max abs", "max rel", "tolerance") else "left",
                         no_wrap=True)
    for row in rows:
        if row.status in ("pass", "FAIL"):
            colour = "green" if row.status == "pass" else "red"
            table.add_row(escape(row.reference), escape(row.target), f"{row.max_abs:.3g}", f"{row.max_rel:.3g}",
                          f"{row.tolerance[0]:.3g}" + (f", rtol {row.tolerance[1]:g}" if row.tolerance[1] else ""),
                          f"[{colour}]{row.status}[/]")
        else:
            table.add_row(escape(row.reference), escape(row.target), "", "", "", f"[yellow]{row.status}[/]")
    console.print(table)
    for row in rows:
        if row.status == "FAIL":
            worst = max(row.per_iteration, key=lambda e: e["rel_to_scale"])
            where = ", ".join(f"{k} {worst[k]}" for k in ("t_index", "timestep", "input") if k in worst)
            console.print(f"{row.target} vs {row.reference}: FAIL, worst at {where}: {worst['max_abs']:.3g} abs = "
                          f"{worst['rel_to_scale']:.3g}·max|ref| > {row.tolerance[0]:g}", soft_wrap=True, markup=False)
        elif row.status in ("unavailable", "error"):
            console.print(f"{row.target}: {row.status}: {row.detail}", soft_wrap=True, markup=False)
    if args.plot:
        console.print(f"wrote {args.plot}", soft_wrap=True, markup=False)
    failed = any(r.status in ("FAIL", "error") for r in rows)
    status = "FAIL" if failed else ("incomplete (unavailable targets)" if unavailable else "pass")
    console.print(f"check: {status} ({time.perf_counter() - t0:.1f} s)", markup=False)
    if failed:
        return EXIT_FAILED
    return EXIT_UNAVAILABLE if unavailable else 0


# ---- fxpass golden ----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("fxpass", "torch", "onnx", "onnxruntime", "polygraphy", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def parse_t_indices(values: list[str] | None) -> list[int] | None:
    if not values:
        return None
    out: list[int] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                index = int(part)
            except ValueError:
                raise FxpassError(f"--t-index {part}: expected integers such as 0 249") from None
            if index not in out:
                out.append(index)
    return out


def _plain(value):
    """numpy scalars (and arrays) as plain JSON values."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _nice(value: float) -> float:
    """``value`` to two significant digits (tolerances people read and type)."""
    return float(f"{value:.2g}")


def regression_command(onnx: str, directory: str, atol: float, rtol: float = 0.0) -> str:
    d = directory.rstrip("/")
    return (f"polygraphy run {shlex.quote(onnx)} --onnxrt --load-inputs {shlex.quote(d + '/inputs.json')} "
            f"--load-outputs {shlex.quote(d + '/outputs.json')} --atol {atol:g} --rtol {rtol:g}")


def write_dir_atomically(out: Path, fill, force: bool) -> None:
    """``fill(tmpdir)`` writes the files; then the temp dir becomes ``out`` (replacing it with ``force``)."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FxpassError(f"{out}: directory {parent} does not exist")
    if out.exists() and not force:
        raise FxpassError(f"{out}: already exists (pass --force to overwrite)")
    if out.exists() and not out.is_dir():
        raise FxpassError(f"{out}: exists and is not a directory")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise FxpassError(f"{out}: cannot write ({exc.strerror or exc})") from None
    old = None
    try:
        fill(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
        if out.exists():
            old = parent / f".{out.name}.{os.getpid()}.old"
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)
        raise FxpassError(f"{out}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cmd_golden(args) -> int:
    import numpy as np
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json
    from rich.console import Console

    from targets.compare import TOLERANCES, polygraphy_severity, run_runners

    from . import __version__
    from .checkpoint import load_model
    from .pipeline import schedule_for

    console = Console(highlight=False)
    out = Path(args.output)
    if out.exists() and not args.force:
        raise FxpassError(f"{out}: already exists (pass --force to overwrite)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FxpassError(f"{out}: directory {parent} does not exist")
    info = read_onnx_info(args.onnx) if args.onnx else None
    cfg = resolve_config(args.config, info)
    if info is not None:
        mode, kept, seen = info.mode, list(info.timesteps), _model_timesteps(info, cfg)
        x_shape = [1 if d < 0 else d for d in info.inputs["x"][1]]
        if x_shape[-1] != cfg.image_size:
            raise FxpassError(f"{info.path}: input x is {x_shape[-1]} px, the config says image_size {cfg.image_size}")
        class_cond = "y" in info.inputs
    else:
        mode, kept, seen = schedule_for(cfg, "respaced")
        x_shape = [1, 3, cfg.image_size, cfg.image_size]
        class_cond = cfg.class_cond
    t_indices = parse_t_indices(args.t_index)
    if mode == "fixed":
        if t_indices:
            raise FxpassError(f"--t-index: {info.path} is a fixed-timestep model (no t_index input)")
    else:
        t_indices = t_indices or [0, len(kept) - 1]
        bad = [i for i in t_indices if not 0 <= i < len(kept)]
        if bad:
            raise FxpassError(f"--t-index {bad[0]}: out of range 0..{len(kept) - 1} ({len(kept)}-step schedule)")
    model_path = Path(args.model)
    model = load_model(model_path, cfg, trust_pickle=args.trust_pickle)
    feeds = make_feeds(mode=mode, timesteps=kept, model_ts=seen, x_shape=x_shape, class_cond=class_cond,
                       seed=args.seed, t_indices=t_indices, count=2)
    reference = reference_runner(model, mode=mode, model_ts=seen, image_size=cfg.image_size)
    t0 = time.perf_counter()
    live = run_runners([reference], feeds.feeds)
    golden = RunResults()
    # runtime 0: the files depend only on the model and the seed (regenerating gives the same bytes)
    golden.add([dict(it.items()) for it in live[REFERENCE_NAME]], runtime=0.0, runner_name=REFERENCE_NAME)
    outputs = [dict(it.items()) for it in golden[REFERENCE_NAME]]
    scale = max(float(np.abs(np.asarray(v, dtype=np.float64)).max()) for it in outputs for v in it.values())
    tolerances = {p: {"atol_scale": a, "rtol": r, "atol": _nice(a * scale)} for p, (a, r) in TOLERANCES.items()}
    onnx_for_command = str(args.onnx) if args.onnx else ONNX_PLACEHOLDER
    commands = {p: regression_command(onnx_for_command, str(out), t["atol"], t["rtol"]) for p, t in tolerances.items()}

    verified = None
    if info is not None:
        from targets.compare import compare
        from targets.ort import ort_runner

        runner = ort_runner(str(info.path), cuda=False, name="onnxrt-cpu")
        live_ort = run_runners([runner], feeds.feeds)
        combined = RunResults()
        combined[REFERENCE_NAME] = golden[REFERENCE_NAME]
        combined["onnxrt-cpu"] = live_ort["onnxrt-cpu"]
        tol = TOLERANCES.get(info.precision, TOLERANCES["fp32"])
        pair = compare(combined, reference=REFERENCE_NAME, atol_scale=tol[0], rtol=tol[1], meta=feeds.labels)[0]
        if not pair.passed:
            raise FxpassError(f"{info.path}: ONNX Runtime differs from the eager model on the golden inputs by "
                              f"{pair.max_rel_to_scale:.3g}·max|ref| (tolerance {tol[0]:g}); golden set not written",
                              exit_code=EXIT_FAILED)
        verified = {"onnx": str(info.path), "sha256": _sha256(info.path), "precision": info.precision,
                    "max_abs": float(pair.max_abs), "max_rel_to_scale": float(pair.max_rel_to_scale), "passed": bool(pair.passed)}

    iterations = []
    for label, it in zip(feeds.labels, outputs):
        entry = dict(label)
        entry["max_abs_output"] = {k: float(np.abs(np.asarray(v)).max()) for k, v in it.items()}
        iterations.append(entry)
    manifest: dict[str, Any] = {
        "format": GOLDEN_FORMAT,
        "name": out.name,
        "fxpass_version": __version__,
        "checkpoint": {"file": model_path.name, "sha256": _sha256(model_path), "bytes": model_path.stat().st_size},
        "config": cfg.to_dict(),
        "mode": mode,
        "seed": args.seed,
        "batch": int(x_shape[0]),
        "inputs": {"file": "inputs.json", "count": len(feeds.feeds),
                   "tensors": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in feeds.feeds[0].items()},
                   "x": f"standard normal, numpy.random.default_rng({args.seed}), one draw per iteration"},
        "outputs": {"file": "outputs.json", "runner": REFERENCE_NAME,
                    "what": "the eager float32 PyTorch model (fxpass's U-Net loaded from the checkpoint)",
                    "tensors": {k: {"dtype": str(np.asarray(v).dtype), "shape": list(np.asarray(v).shape)}
                                for k, v in outputs[0].items()},
                    "max_abs": scale},
        "t_index": [it["t_index"] for it in iterations] if mode == "table" else None,
        "timesteps": [it["timestep"] for it in iterations],
        "model_timesteps": [it["model_timestep"] for it in iterations],
        "iterations": iterations,
        "tolerances": tolerances,
        "regression": {"onnx": onnx_for_command, "commands": commands},
        "verified_with": verified,
        "versions": _versions(),
    }

    def fill(tmp: Path) -> None:
        with polygraphy_severity(False):
            save_json(feeds.feeds, str(tmp / "inputs.json"), description="input data")
            golden.save(str(tmp / "outputs.json"))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=_plain) + "\n", encoding="utf-8")

    write_dir_atomically(out, fill, args.force)
    size = sum(p.stat().st_size for p in out.iterdir())
    console.print(f"wrote {out}: {len(feeds.feeds)} inputs "
                  + (f"(t_index {', '.join(map(str, t_indices))}) " if mode == "table" else "")
                  + f"and {REFERENCE_NAME} outputs, {size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s",
                  soft_wrap=True, markup=False)
    if verified:
        console.print(f"{info.path}: matches the golden outputs ({verified['max_rel_to_scale']:.3g}·max|ref|)",
                      soft_wrap=True, markup=False)
    console.print(f"regression (fp32): {commands['fp32']}", soft_wrap=True, markup=False)
    return 0


# ---- parser ----------------------------------------------------------------------------------------
def add_commands(sub, common) -> None:
    p = sub.add_parser("check", parents=[common],
                       help="compare an ONNX model with PyTorch, ONNX Runtime, TensorRT or a golden set",
                       epilog="exit status: 0 every requested comparison passed; 1 a numeric failure; "
                              "3 a requested target cannot run here (TensorRT missing, no CUDA device) and "
                              "nothing failed; 2 a usage or file error")
    p.add_argument("onnx", metavar="OUT.onnx")
    p.add_argument("--model", metavar="MODEL.pt", help="the checkpoint it was lowered from (the torch reference)")
    p.add_argument("--config", metavar="FILE",
                   help="YAML config (default: the ONNX model's fxpass.config metadata, else built-in CAMUS)")
    p.add_argument("--targets", metavar="LIST",
                   help="comma-separated of torch, ort, trt (default: torch,ort; ort alone with only --golden)")
    p.add_argument("--golden", metavar="DIR", help="also compare against a golden set written by fxpass golden")
    p.add_argument("--tolerance", metavar="fp32|fp16|ATOL,RTOL",
                   help="ATOL is a fraction of max|reference| (default: by the model's precision)")
    p.add_argument("--plot", metavar="FILE.png", help="plot ONNX Runtime's error against timestep, every t_index")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--trust-pickle", action="store_true", help="allow checkpoints that are full pickled modules")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("golden", parents=[common], help="write a golden input/output set (Polygraphy JSON)")
    p.add_argument("model", metavar="MODEL.pt")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="the golden set's directory, e.g. golden/NAME")
    p.add_argument("--config", metavar="FILE", help="YAML config (default: --onnx's metadata, else built-in CAMUS)")
    p.add_argument("--onnx", metavar="OUT.onnx",
                   help="the lowered model the set is for: schedule and inputs from its metadata; checked "
                        "against the new outputs before writing; named in the regression command")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--t-index", nargs="+", metavar="I", help="t_index values (default: first and last)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--trust-pickle", action="store_true", help="allow checkpoints that are full pickled modules")
    p.set_defaults(func=cmd_golden)
