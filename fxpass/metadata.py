"""The ONNX metadata contract: what ``fxpass lower`` writes into ``metadata_props`` and how it is read.

Every key string lives here and nowhere else.  :func:`encode` is the one writer (``dict[str, str]``,
values JSON with sorted keys); :func:`parse` is the one parser, over a plain ``dict[str, str]`` (from
``onnx``'s ``metadata_props`` or ONNX Runtime's ``custom_metadata_map``), importing neither onnx nor
torch, so the torch-free sample path uses it too.  It is strict: types, ranges, known values, and a
schedule that matches the config it carries.  Every problem is an :class:`FxpassError` naming the
file and the key.

Keys: ``fxpass.version``; ``fxpass.mode`` ("table": inputs ``x``, ``t_index``; "fixed": input ``x``;
"step": a whole denoising step); ``fxpass.timesteps`` (the original timestep of each ``t_index``, or
``[T]``); ``fxpass.model_timesteps`` (what the U-Net sees for each, rescaled when
``rescale_timesteps``); ``fxpass.config`` (the ModelConfig as a JSON object); ``fxpass.precision``;
``fxpass.request`` (the lowering request it was made from, :meth:`fxpass.request.LowerRequest.to_dict`
without this machine's paths: a record, never read to decide anything); ``fxpass.deep_cache`` (a
``--deep-cache`` lowering: ``{"role": "full"|"shallow", "level", "feature", "shallow_sha256"}``; the
shallow graph is the file ``NAME.shallow.onnx`` beside the full graph ``NAME.onnx``, its SHA-256 recorded
in the full graph's entry).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import PARSE_ERRORS, FxpassError, parse_reason
from .limits import MAX_SCHEDULE  # the longest schedule a metadata entry may declare

PREFIX = "fxpass."
VERSION = "fxpass.version"
MODE = "fxpass.mode"
TIMESTEPS = "fxpass.timesteps"
MODEL_TIMESTEPS = "fxpass.model_timesteps"
CONFIG = "fxpass.config"
PRECISION = "fxpass.precision"
REQUEST = "fxpass.request"
DEEP_CACHE = "fxpass.deep_cache"
#: "sha256:HEX" of the verified float32 ONNX graph a file was made from (:func:`graph_digest`): a mobile file's
#: link to the graph ``fxpass check`` re-derives from the model it is given
FLOAT32_GRAPH = "fxpass.float32_graph"
KEYS = (VERSION, MODE, TIMESTEPS, MODEL_TIMESTEPS, CONFIG, PRECISION, REQUEST, DEEP_CACHE, FLOAT32_GRAPH)
#: the roles of a --deep-cache pair's files
CACHE_ROLES = ("full", "shallow")

#: plain: a network with no timestep (a segmentation U-Net): input x (and extras), nothing folded
MODES = ("table", "fixed", "step", "plain")
#: fp32, fp16 (float32 islands), bf16 (a float32 file meant to run at bf16 inference precision, OpenVINO),
#: int8 (QDQ W8A8 with the float layers of a precision plan)
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class ModelMeta:
    """What an fxpass ONNX model says about itself."""

    mode: str
    timesteps: tuple[int, ...]
    model_timesteps: tuple[float, ...]
    config: dict[str, Any] | None = None
    precision: str = "fp32"
    version: str | None = None
    request: dict[str, Any] | None = None
    deep_cache: dict[str, Any] | None = None
    float32_graph: str | None = None  # FLOAT32_GRAPH: the digest of the float32 graph the file was made from

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def encode(meta: ModelMeta) -> dict[str, str]:
    """The ``metadata_props`` entries for ``meta`` (the one writer)."""
    from . import __version__

    props = {
        VERSION: meta.version or __version__,
        MODE: meta.mode,
        TIMESTEPS: _json(list(meta.timesteps)),
        PRECISION: meta.precision,
    }
    if meta.mode != "fixed" or list(meta.model_timesteps) != list(meta.timesteps):
        props[MODEL_TIMESTEPS] = _json(list(meta.model_timesteps))  # fixed mode: only where the model saw other values
    if meta.config is not None:
        props[CONFIG] = _json(meta.config)
    if meta.request is not None:
        props[REQUEST] = _json(meta.request)
    if meta.deep_cache is not None:
        props[DEEP_CACHE] = _json(meta.deep_cache)
    if meta.float32_graph is not None:
        props[FLOAT32_GRAPH] = meta.float32_graph
    return props


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def graph_digest(model) -> str:
    """"sha256:HEX" of an ``onnx.ModelProto``'s graph (nodes, weights, inputs and outputs; not the model's
    metadata), serialized deterministically: the same lowering of the same weights gives the same digest."""
    import hashlib

    return "sha256:" + hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def is_fxpass(props: Mapping[str, str]) -> bool:
    return MODE in props and TIMESTEPS in props


def _load(props: Mapping[str, str], key: str, kind: type, source: str):
    text = props[key]
    if not isinstance(text, str) or len(text) > 50_000_000:
        raise FxpassError(f"{source}: metadata {key} is not a readable string")
    try:
        value = json.loads(text)
    except PARSE_ERRORS as exc:
        raise FxpassError(f"{source}: metadata {key} is not valid JSON ({parse_reason(exc)})") from None
    if not isinstance(value, kind):
        raise FxpassError(f"{source}: metadata {key} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _int_list(values: list, key: str, source: str, *, empty: bool = False) -> tuple[int, ...]:
    if not values and not empty:
        raise FxpassError(f"{source}: metadata {key} is empty")
    if len(values) > MAX_SCHEDULE:
        raise FxpassError(f"{source}: metadata {key} has {len(values):,} entries (at most {MAX_SCHEDULE:,})")
    bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 0), None)
    if bad is not None or any(isinstance(v, bool) for v in values):
        raise FxpassError(f"{source}: metadata {key} must list non-negative integers (found {bad!r})")
    return tuple(values)


def parse(props: Mapping[str, str], source: str = "model", *, require: tuple[str, ...] = ()) -> ModelMeta:
    """The fxpass metadata of a model, checked; ``require``: the modes the caller accepts (all if empty)."""
    if not is_fxpass(props):
        raise FxpassError(f"{source}: not an fxpass model (no {MODE} / {TIMESTEPS} metadata); "
                          "lower it with fxpass lower")
    unknown = sorted(k for k in props if k.startswith(PREFIX) and k not in KEYS)
    if unknown:
        raise FxpassError(f"{source}: unknown metadata key {unknown[0]} (known: {', '.join(KEYS)})")
    mode = props[MODE]
    if mode not in MODES:
        raise FxpassError(f"{source}: metadata {MODE} is {mode!r}, expected one of {', '.join(MODES)}")
    if require and mode not in require:
        raise FxpassError(f"{source}: metadata {MODE} is {mode!r}; this needs a {' or '.join(require)}-mode model")
    timesteps = _int_list(_load(props, TIMESTEPS, list, source), TIMESTEPS, source, empty=mode == "plain")
    if mode == "fixed" and len(timesteps) != 1:
        raise FxpassError(f"{source}: metadata {TIMESTEPS} of a fixed-mode model must hold one timestep")
    if (mode == "plain") != (len(timesteps) == 0):
        raise FxpassError(f"{source}: metadata {TIMESTEPS} must be empty exactly for a plain-mode model (no timestep)")
    if MODEL_TIMESTEPS in props:
        seen = _load(props, MODEL_TIMESTEPS, list, source)
        if len(seen) != len(timesteps):
            raise FxpassError(f"{source}: metadata {MODEL_TIMESTEPS} has {len(seen)} entries, "
                              f"{TIMESTEPS} {len(timesteps)}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in seen):
            raise FxpassError(f"{source}: metadata {MODEL_TIMESTEPS} must list finite numbers")
        model_ts = tuple(seen)
    else:
        model_ts = tuple(timesteps)
    precision = props.get(PRECISION, "fp32")
    if precision not in PRECISIONS:
        raise FxpassError(f"{source}: metadata {PRECISION} is {precision!r}, expected one of {', '.join(PRECISIONS)}")
    config = None
    if CONFIG in props:
        config = _load(props, CONFIG, dict, source)
        _check_config(config, timesteps, mode, source)
    elif mode == "step":
        raise FxpassError(f"{source}: a step graph without {CONFIG} metadata")
    request = _load(props, REQUEST, dict, source) if REQUEST in props else None
    deep_cache = _deep_cache(_load(props, DEEP_CACHE, dict, source), mode, source) if DEEP_CACHE in props else None
    digest = props.get(FLOAT32_GRAPH)
    if digest is not None and (not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest)):
        raise FxpassError(f"{source}: metadata {FLOAT32_GRAPH} is not a sha256:HEX digest")
    return ModelMeta(mode, timesteps, model_ts, config, precision, props.get(VERSION), request, deep_cache, digest)


def _deep_cache(entry: dict, mode: str, source: str) -> dict:
    """A ``fxpass.deep_cache`` entry, checked: a table-mode file, a known role, a level (1 or more, or null
    for a cut at a named tensor), the feature's name, and (the full graph) the shallow file's SHA-256."""
    where = f"{source}: metadata {DEEP_CACHE}"
    if mode != "table":
        raise FxpassError(f"{where} on a {mode}-mode model (only table-mode models are cut)")
    if entry.get("role") not in CACHE_ROLES:
        raise FxpassError(f"{where}: role must be one of {', '.join(CACHE_ROLES)}, got {entry.get('role')!r}")
    level = entry.get("level")
    if level is not None and (isinstance(level, bool) or not isinstance(level, int) or level < 1):
        raise FxpassError(f"{where}: level must be a positive integer or null, got {level!r}")
    if not isinstance(entry.get("feature"), str) or not entry["feature"]:
        raise FxpassError(f"{where}: feature must name a tensor")
    digest = entry.get("shallow_sha256")
    if entry["role"] == "full" and not (isinstance(digest, str) and len(digest) == 64
                                        and all(c in "0123456789abcdef" for c in digest)):
        raise FxpassError(f"{where}: shallow_sha256 must be 64 lowercase hex digits")
    return entry


def _check_config(config: dict, timesteps: tuple[int, ...], mode: str, source: str) -> None:
    """The carried config is a valid ModelConfig and its schedule is the one the model was built for."""
    from .config import from_dict
    from .diffusion import respaced

    where = f"{source}: metadata {CONFIG}"
    cfg = from_dict(config, source=where, complete=True)
    if (mode == "plain") != (cfg.diffusion_steps == 0):
        raise FxpassError(f"{where}: diffusion_steps {cfg.diffusion_steps} on a {mode}-mode model (0 exactly for a "
                          "model with no timestep)")
    if mode == "plain":
        return
    if mode == "fixed":
        if timesteps[0] >= cfg.diffusion_steps:
            raise FxpassError(f"{where}: timestep {timesteps[0]} is outside diffusion_steps {cfg.diffusion_steps}")
        return
    if any(t >= cfg.diffusion_steps for t in timesteps):
        raise FxpassError(f"{source}: metadata {TIMESTEPS} reaches {max(timesteps)}, beyond diffusion_steps "
                          f"{cfg.diffusion_steps} of {CONFIG}")
    if mode == "step" and list(timesteps) != respaced(cfg.diffusion_steps, cfg.timestep_respacing):
        raise FxpassError(f"{source}: metadata {TIMESTEPS} ({len(timesteps)} steps) does not match "
                          f"timestep_respacing {cfg.timestep_respacing!r} of {cfg.diffusion_steps} diffusion steps")


def schedule_matches_config(meta: ModelMeta) -> bool:
    """True when a table's timesteps are exactly the config's respaced schedule (what sampling needs)."""
    from .config import from_dict
    from .diffusion import respaced

    if meta.config is None:
        return False
    cfg = from_dict(meta.config)
    return list(meta.timesteps) == respaced(cfg.diffusion_steps, cfg.timestep_respacing)


#: config keys that decide the schedule sampling uses (a file whose metadata changed one of them samples wrongly);
#: not learn_sigma or prediction_type, which lowering may derive from a user's model after the request is made
SCHEDULE_KEYS = ("diffusion_steps", "timestep_respacing", "noise_schedule", "beta_start", "beta_end")


def check_schedule(meta, path) -> None:
    """FxpassError (exit 1) where the file's schedule metadata is not what its lowering made: the timesteps of a
    lowering of the config's respaced schedule must be that schedule, and the config's schedule keys must be
    the ones the lowering request recorded (metadata edited after lowering: ``sample`` would use it as is)."""
    request = meta.request or {}
    if meta.mode in ("table", "step") and meta.config is not None \
            and (request.get("rewrite") or {}).get("timesteps") == "respaced" and not schedule_matches_config(meta):
        raise FxpassError(f"{path}: metadata {TIMESTEPS} ({meta.steps} steps) is not the respaced schedule of "
                          f"its {CONFIG}, which the lowering used: the metadata was changed after lowering",
                          exit_code=1)
    recorded = (request.get("source") or {}).get("config")
    if isinstance(recorded, dict) and meta.config is not None:
        changed = [k for k in SCHEDULE_KEYS if recorded.get(k) is not None and recorded[k] != meta.config.get(k)]
        if changed:
            key = changed[0]
            raise FxpassError(f"{path}: metadata {CONFIG} says {key} {meta.config.get(key)!r}, the lowering "
                              f"request it records says {recorded[key]!r}: the metadata was changed after lowering",
                              exit_code=1)


#: a step graph's outputs (every other mode's: ``out``)
STEP_OUTPUTS = ["x_prev", "pred_xstart"]


def check_read(path, meta: ModelMeta, inputs: Mapping, outputs: Sequence[str] | None = None) -> None:
    """What every reader of an fxpass file (ONNX, ``.ort``, ``.tflite``) holds it to: the inputs and outputs fxpass
    writes (``outputs``: None where the format renames them) and schedule metadata as its lowering made it."""
    if "x" not in inputs:
        raise FxpassError(f"{path}: has no input named x (inputs: {', '.join(inputs)})")
    if meta.mode in ("table", "step") and "t_index" not in inputs:
        raise FxpassError(f"{path}: {meta.mode}-mode model without a t_index input")
    for name in (STEP_OUTPUTS if meta.mode == "step" else ["out"]) if outputs is not None else ():
        if name not in outputs:
            raise FxpassError(f"{path}: has no output named {name} (outputs: {', '.join(outputs)[:200]})")
    check_schedule(meta, path)

# ---- on an ONNX ModelProto (onnx imported by the caller) ------------------------------------------
def read_props(model) -> dict[str, str]:
    """``metadata_props`` of an ``onnx.ModelProto`` as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def write_props(model, props: Mapping[str, str]) -> None:
    """Set ``props`` on an ``onnx.ModelProto`` (replacing entries with the same key, keeping others)."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        if key in existing:
            existing[key].value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value


def write(model, meta: ModelMeta) -> None:
    write_props(model, encode(meta))


# ---- an ONNX file ----------------------------------------------------------------------------------
_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 11: "float64", 16: "bfloat16"}


@dataclass
class OnnxInfo:
    """An fxpass ONNX file: its metadata and its graph inputs."""

    path: Any  # Path
    meta: ModelMeta
    inputs: dict[str, tuple[str, list]]  # name -> (numpy dtype name, shape with -1 for symbolic dims)
    #: the graph's op types, and whether it holds float16 weights or casts to float16 (:func:`graph_facts`)
    op_types: frozenset = frozenset()
    float16: bool = False

    @property
    def mode(self) -> str:
        return self.meta.mode

    @property
    def timesteps(self) -> list:
        return list(self.meta.timesteps)

    @property
    def model_timesteps(self) -> list:
        return list(self.meta.model_timesteps)

    @property
    def config(self) -> dict | None:
        return self.meta.config

    @property
    def precision(self) -> str:
        return self.meta.precision


def check_external_data(model, path) -> None:
    """External tensor data may only live in regular files inside the model's own folder."""
    import os
    import stat
    from pathlib import Path

    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    folder = Path(path).resolve().parent
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        where = f"{path}: tensor {tensor.name}'s external data {location!r}"
        if not location or "\0" in location or os.path.isabs(location) or ".." in Path(location).parts:
            raise FxpassError(f"{where} is not a relative path inside the model's folder")
        try:
            target = (folder / location).resolve()
        except (OSError, RuntimeError):  # a loop of links (RuntimeError before Python 3.13)
            raise FxpassError(f"{where} is a loop of symbolic links") from None
        if folder not in target.parents:
            raise FxpassError(f"{where} leads outside the model's folder")
        try:
            mode = target.stat().st_mode
        except OSError:
            raise FxpassError(f"{where} is missing") from None
        if not stat.S_ISREG(mode):
            raise FxpassError(f"{where} is not a regular file")


_FLOAT16 = 10  # onnx.TensorProto.FLOAT16


def graph_facts(model) -> tuple[frozenset, bool]:
    """(the op types of an ``onnx.ModelProto``, whether it has float16 weights or casts to float16): what
    its precision made of it (weights not needed)."""
    nodes = model.graph.node
    half = any(t.data_type == _FLOAT16 for t in model.graph.initializer) or any(
        node.op_type == "Cast" and any(a.name == "to" and a.i == _FLOAT16 for a in node.attribute) for node in nodes)
    return frozenset(node.op_type for node in nodes), half


#: ops that carry ``t_index`` to a table gather unchanged in value
_INDEX_OPS = ("Squeeze", "Unsqueeze", "Reshape", "Cast", "Identity", "Flatten")


def table_rows(model) -> set[int]:
    """Row counts of the constant tables the graph gathers by ``t_index`` (an ``onnx.ModelProto``; the
    weights need not be loaded): one per timestep of the schedule the tables were built for."""
    dims = {init.name: list(init.dims) for init in model.graph.initializer}
    index, changed = {"t_index"}, True
    while changed:
        changed = False
        for node in model.graph.node:
            if node.op_type in _INDEX_OPS and node.input and node.input[0] in index and node.output[0] not in index:
                index.add(node.output[0])
                changed = True
    return {dims[n.input[0]][0] for n in model.graph.node
            if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] in index and len(dims.get(n.input[0], [])) >= 1}


def check_table_rows(model, meta: ModelMeta, source: str) -> None:
    """The metadata's schedule has as many steps as the graph's timestep tables have rows."""
    rows = table_rows(model) if meta.mode in ("table", "step") else set()
    wrong = sorted(r for r in rows if r != meta.steps)
    if wrong:
        raise FxpassError(f"{source}: metadata {TIMESTEPS} lists {meta.steps} steps, but the graph's timestep tables "
                          f"have {wrong[0]} rows: the metadata does not describe this graph")


def graph_inputs(model) -> dict[str, tuple[str, list]]:
    """The non-initializer inputs of an ``onnx.ModelProto``: name -> (numpy dtype name, shape, -1 where symbolic)."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        inputs[inp.name] = (_ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)), shape)
    return inputs


def read_file(path, *, require: tuple[str, ...] = ()) -> OnnxInfo:
    """Read an fxpass ONNX file's metadata and inputs (weights are not loaded)."""
    import onnx

    from .errors import first_line
    from .fileio import check_model_file

    path = check_model_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf and onnx raise several types for unreadable files
        raise FxpassError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    meta = parse(read_props(model), str(path), require=require)
    check_external_data(model, path)
    check_table_rows(model, meta, str(path))
    inputs = graph_inputs(model)
    check_read(path, meta, inputs, [o.name for o in model.graph.output])
    from .limits import check_input_fits

    for name, (_, shape) in inputs.items():
        check_input_fits(shape, f"input {name}", str(path))
    return OnnxInfo(path, meta, inputs, *graph_facts(model))
