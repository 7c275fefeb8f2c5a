"""The golden-set format: seeded inputs and the eager model's outputs in Polygraphy's JSON, and a manifest.

A golden set is a directory with ``inputs.json`` (a list of feed dicts, ``polygraphy run
--load-inputs``), ``outputs.json`` (a ``RunResults`` of one runner, ``--load-outputs``) and
``manifest.json`` (config, schedule positions, tolerances, the regression command, versions, hashes).
:func:`make_golden` computes one, :func:`write_golden` writes it atomically, :func:`load_golden`
reads and checks one, :func:`golden_labels` matches it to an ONNX model.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PARSE_ERRORS, FxpassError, first_line, parse_reason
from .fileio import file_sha256

GOLDEN_FORMAT = 1
#: placeholder for the model path in a golden set's regression command when no ONNX was given
ONNX_PLACEHOLDER = "MODEL.onnx"
FILES = ("manifest", "inputs", "outputs")


@dataclass
class GoldenSet:
    manifest: dict
    feeds: list[dict]
    outputs: Any  # polygraphy RunResults with one runner
    directory: Path | None = None

    def tolerance(self, precision: str, *, trust: bool = False) -> tuple[tuple[float, float], str | None]:
        """(the manifest's bound for ``precision``, validated, never looser than the precision's own unless
        ``trust``; a note for the output saying what was done, or None): :func:`fxpass.expected.golden_tolerance`."""
        from .expected import golden_tolerance
        from .gate import default_tolerance

        return golden_tolerance(self.manifest, precision, default_tolerance(precision), trust=trust,
                                source=str(self.directory or "golden set"))


def versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("fxpass", "torch", "onnx", "onnxruntime", "polygraphy", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _plain(value):
    """numpy scalars (and arrays) as plain JSON values."""
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


def is_golden_dir(directory: Path) -> bool:
    """An existing directory that ``write_golden --force`` may replace: empty, or holding a golden manifest."""
    if not directory.is_dir() or directory.is_symlink():
        return False
    entries = list(directory.iterdir())
    if not entries:
        return True
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, *PARSE_ERRORS):
        return False
    return isinstance(data, dict) and data.get("format") == GOLDEN_FORMAT and \
        {p.name for p in entries} <= {f"{n}.json" for n in FILES}


def refuse_replacing_other(out: Path) -> None:
    """An existing ``out`` may be replaced (with ``--force``) only when it is empty or a golden set."""
    if out.exists() and not is_golden_dir(out):
        raise FxpassError(f"{out}: exists and is not a golden set (no golden manifest.json, or other files in it); "
                          "not replacing it, even with --force")


# ---- making one -------------------------------------------------------------------------------------
def make_golden(model, cfg, *, name: str, checkpoint: Path, info=None, seed: int = 0,
                t_indices: list[int] | None = None, output_dir: str = "", specs=None,
                model_timesteps=None) -> GoldenSet:
    """Run the eager model on seeded inputs; with ``info`` (the lowered model) also check ONNX Runtime
    against those outputs first (nothing is returned when it disagrees).

    Without ``info``: the inputs are ``specs`` (:class:`~fxpass.inputs.InputSpec`, a user class's
    inferred inputs; default x, t_index and y as fxpass's U-Net takes them) and the model sees
    ``model_timesteps`` (default the config's schedule; a continuous model's noise levels)."""
    from .inputs import num_classes_of, seeded_feeds

    mode, kept, seen, specs = _golden_schedule(cfg, info, specs, model_timesteps)
    t_indices = _golden_t_indices(mode, kept, t_indices, info)
    feeds = seeded_feeds(specs, seed=seed, timesteps=kept, model_timesteps=seen,
                         t_indices=t_indices if mode not in ("fixed", "plain") else None, count=2,
                         num_classes=num_classes_of(model))
    golden, outputs, scale = _eager_outputs(model, cfg, mode, seen, specs, feeds, checkpoint)
    tolerances = _tolerances(scale)
    onnx_for_command = str(info.path) if info is not None else ONNX_PLACEHOLDER
    commands = {p: regression_command(onnx_for_command, output_dir or name, t["atol"], t["rtol"])
                for p, t in tolerances.items()}

    verified = None
    if info is not None:
        verified = _verify_onnx(info, golden, feeds)

    manifest = _manifest(cfg, feeds, outputs, name=name, checkpoint=checkpoint, mode=mode, seed=seed, scale=scale,
                         tolerances=tolerances, regression={"onnx": onnx_for_command, "commands": commands},
                         verified=verified)
    return GoldenSet(manifest, feeds.feeds, golden)


def _golden_schedule(cfg, info, specs, model_timesteps) -> tuple[str, list, list, list]:
    """(mode, kept timesteps, model timesteps, input specs): the lowered model's (``info``), else the
    config's respaced schedule with ``specs`` (default x, t_index and y as fxpass's U-Net takes them)."""
    from .diffusion import schedule_for
    from .inputs import InputSpec, input_specs

    if info is not None:
        mode, kept, seen = info.mode, info.timesteps, info.model_timesteps
        if mode == "step":
            raise FxpassError(f"{info.path}: golden sets are for table and fixed models, not step graphs")
        specs = input_specs(info)
        if specs[0].shape[-1] != cfg.image_size:
            raise FxpassError(f"{info.path}: input x is {specs[0].shape[-1]} px, the config says image_size "
                              f"{cfg.image_size}")
    else:
        mode, kept, seen = schedule_for(cfg, "respaced")
        if model_timesteps is not None:
            seen = list(model_timesteps)
        if specs is None:
            specs = [InputSpec("x", "float32", (1, 3, cfg.image_size, cfg.image_size)),
                     InputSpec("t_index", "int64", (1,))]
            if cfg.class_cond:
                specs.append(InputSpec("y", "int64", (1,)))
        specs = list(specs)
    return mode, kept, seen, specs


def _golden_t_indices(mode: str, kept, t_indices: list[int] | None, info) -> list[int] | None:
    """The schedule positions (default the first and the last), checked against the schedule."""
    if mode in ("fixed", "plain"):
        if t_indices:
            raise FxpassError(f"--t-index: {info.path} is a {'fixed-timestep' if mode == 'fixed' else 'plain'} "
                              "model (no t_index input)")
    else:
        t_indices = t_indices or [0, len(kept) - 1]
        bad = [i for i in t_indices if not 0 <= i < len(kept)]
        if bad:
            raise FxpassError(f"--t-index {bad[0]}: out of range 0..{len(kept) - 1} ({len(kept)}-step schedule)")
    return t_indices


def _eager_outputs(model, cfg, mode: str, seen, specs, feeds, checkpoint: Path) -> tuple[Any, list[dict], float]:
    """(the eager model's RunResults on ``feeds``, its outputs per feed, their largest magnitude);
    refuses NaN or Inf outputs."""
    from polygraphy.comparator import RunResults

    from targets.compare import run_runners

    from .gate import REFERENCE_NAME, reference_runner

    reference = reference_runner(model, mode=mode, model_timesteps=seen, image_size=cfg.image_size, specs=specs)
    live = run_runners([reference], feeds.feeds)
    golden = RunResults()
    # runtime 0: the files depend only on the model and the seed (regenerating gives the same bytes)
    golden.add([dict(it.items()) for it in live[REFERENCE_NAME]], runtime=0.0, runner_name=REFERENCE_NAME)
    outputs = [dict(it.items()) for it in golden[REFERENCE_NAME]]
    values = [np.asarray(v, dtype=np.float64) for it in outputs for v in it.values()]
    bad = next((k for k, v in enumerate(values) if not np.isfinite(v).all()), None)
    if bad is not None:
        raise FxpassError(f"{checkpoint}: the eager model's output has NaN or Inf values on the golden inputs; "
                          "no golden set written", exit_code=1)
    return golden, outputs, max(float(np.abs(v).max()) for v in values)


def _tolerances(scale: float) -> dict[str, dict[str, float]]:
    """Per precision: the relative tolerances and the absolute one they give at ``scale``."""
    from targets.compare import TOLERANCES

    return {p: {"atol_scale": a, "rtol": r, "atol": _nice(a * scale)} for p, (a, r) in TOLERANCES.items()}


def _manifest(cfg, feeds, outputs: list[dict], *, name: str, checkpoint: Path, mode: str, seed: int, scale: float,
              tolerances: dict, regression: dict, verified: dict | None) -> dict[str, Any]:
    from . import __version__
    from .gate import REFERENCE_NAME

    iterations = []
    for label, it in zip(feeds.labels, outputs):
        entry = dict(label)
        entry["max_abs_output"] = {k: float(np.abs(np.asarray(v)).max()) for k, v in it.items()}
        iterations.append(entry)
    return {
        "format": GOLDEN_FORMAT,
        "name": name,
        "fxpass_version": __version__,
        "checkpoint": {"file": checkpoint.name, "sha256": file_sha256(checkpoint), "bytes": checkpoint.stat().st_size},
        "config": cfg.to_dict(),
        "mode": mode,
        "seed": seed,
        "batch": int(feeds.feeds[0]["x"].shape[0]),
        "inputs": {"file": "inputs.json", "count": len(feeds.feeds),
                   "tensors": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in feeds.feeds[0].items()},
                   "x": f"standard normal, numpy.random.default_rng({seed}), one draw per iteration"},
        "outputs": {"file": "outputs.json", "runner": REFERENCE_NAME,
                    "what": "the eager float32 PyTorch model ("
                            + (f"{cfg.model_class}" if cfg.model_class else "fxpass's U-Net") + " loaded from the checkpoint)",
                    "tensors": {k: {"dtype": str(np.asarray(v).dtype), "shape": list(np.asarray(v).shape)}
                                for k, v in outputs[0].items()},
                    "max_abs": scale},
        "t_index": [it["t_index"] for it in iterations] if mode == "table" else None,
        "timesteps": [it["timestep"] for it in iterations] if mode != "plain" else None,
        "model_timesteps": [it["model_timestep"] for it in iterations] if mode != "plain" else None,
        "iterations": iterations,
        "tolerances": tolerances,
        "regression": regression,
        "verified_with": verified,
        "versions": versions(),
    }


def _verify_onnx(info, golden, feeds) -> dict:
    from polygraphy.comparator import RunResults

    from targets.compare import compare, run_runners
    from targets.ort import ort_runner

    from .gate import REFERENCE_NAME, default_tolerance

    runner = ort_runner(str(info.path), cuda=False, name="onnxrt-cpu")
    live_ort = run_runners([runner], feeds.feeds)
    combined = RunResults()
    combined[REFERENCE_NAME] = golden[REFERENCE_NAME]
    combined["onnxrt-cpu"] = live_ort["onnxrt-cpu"]
    tol = default_tolerance(info.precision)
    pair = compare(combined, reference=REFERENCE_NAME, atol_scale=tol[0], rtol=tol[1], meta=feeds.labels)[0]
    if not pair.passed:
        raise FxpassError(f"{info.path}: ONNX Runtime differs from the eager model on the golden inputs by "
                          f"{pair.max_rel_to_scale:.3g}·max|ref| (tolerance {tol[0]:g}); golden set not written",
                          exit_code=1)
    return {"onnx": str(info.path), "sha256": file_sha256(info.path), "precision": info.precision,
            "max_abs": float(pair.max_abs), "max_rel_to_scale": float(pair.max_rel_to_scale),
            "passed": bool(pair.passed)}


def write_golden(out: Path, golden: GoldenSet, *, force: bool) -> None:
    """Write the set to ``out`` atomically; ``force`` replaces only an empty dir or another golden set."""
    from polygraphy.json import save_json

    from targets.compare import polygraphy_severity

    from .fileio import write_dir_atomically

    if force:
        refuse_replacing_other(out)

    def fill(tmp: Path) -> None:
        with polygraphy_severity(False):
            save_json(golden.feeds, str(tmp / "inputs.json"), description="input data")
            golden.outputs.save(str(tmp / "outputs.json"))
        text = json.dumps(golden.manifest, indent=2, default=_plain) + "\n"
        (tmp / "manifest.json").write_text(text, encoding="utf-8")

    write_dir_atomically(out, fill, force)


# ---- reading one ------------------------------------------------------------------------------------
def load_golden(directory: str | os.PathLike) -> GoldenSet:
    """A golden set written by ``fxpass golden``, checked for shape."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    from targets.compare import polygraphy_severity

    directory = Path(directory)
    if not directory.is_dir():
        raise FxpassError(f"{directory}: no such golden set (expected a directory with manifest.json)")
    paths = {name: directory / f"{name}.json" for name in FILES}
    for p in paths.values():
        if not p.is_file():
            raise FxpassError(f"{p}: missing from the golden set")
    try:
        manifest = json.loads(paths["manifest"].read_text(encoding="utf-8"))
    except PARSE_ERRORS as exc:
        raise FxpassError(f"{paths['manifest']}: not valid JSON ({parse_reason(exc)})") from None
    if not isinstance(manifest, dict):
        raise FxpassError(f"{paths['manifest']}: expected a JSON object")
    try:
        with polygraphy_severity(False):
            feeds = load_json(str(paths["inputs"]), description="input data")
    except Exception as exc:
        raise FxpassError(f"{paths['inputs']}: not Polygraphy input data ({first_line(exc)})") from None
    if not isinstance(feeds, list) or not feeds or not all(isinstance(f, dict) for f in feeds):
        raise FxpassError(f"{paths['inputs']}: expected a non-empty list of feed dicts")
    try:
        with polygraphy_severity(False):
            outputs = RunResults.load(str(paths["outputs"]))
    except Exception as exc:
        raise FxpassError(f"{paths['outputs']}: not Polygraphy RunResults ({first_line(exc)})") from None
    if len(outputs) != 1:
        raise FxpassError(f"{paths['outputs']}: expected the results of one reference runner, found {len(outputs)}")
    name, iterations = outputs[0]
    if len(iterations) != len(feeds):
        raise FxpassError(f"{paths['outputs']}: {len(iterations)} iterations for {len(feeds)} inputs")
    return GoldenSet(manifest, feeds, outputs, directory)


def golden_labels(golden: GoldenSet, info) -> list[dict]:
    """Per-feed labels, after checking that the set fits the model (input shapes, schedule)."""
    directory = golden.directory
    for name, (dtype, shape) in info.inputs.items():
        for feed in golden.feeds:
            if name not in feed:
                raise FxpassError(f"{directory}: inputs lack {name}, which {info.path.name} needs")
            arr = np.asarray(feed[name])
            if len(arr.shape) != len(shape) or any(s >= 0 and s != a for s, a in zip(shape, arr.shape)):
                raise FxpassError(f"{directory}: input {name} has shape {tuple(arr.shape)}, "
                                  f"{info.path.name} expects {tuple(shape)}")
    iterations = golden.manifest.get("iterations") or [{} for _ in golden.feeds]
    labels = []
    for k, (feed, it) in enumerate(zip(golden.feeds, iterations)):
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
        elif info.mode == "plain":
            if "timestep" in it or "t_index" in feed:
                raise FxpassError(f"{directory}: a golden set of a diffusion model; {info.path.name} takes no timestep")
        else:
            if "timestep" in it and it["timestep"] != info.timesteps[0]:
                raise FxpassError(f"{directory}: golden timestep {it['timestep']}, {info.path.name} is "
                                  f"fixed at {info.timesteps[0]}")
            label.update(timestep=info.timesteps[0])
        labels.append(label)
    return labels
