"""Denoisers the sampler loops (and the fidelity metrics) call: ``model(x, t_index) -> output``.

:class:`OnnxDenoiser` runs an fxpass table-mode model on ONNX Runtime and :class:`OpenVinoDenoiser` on
OpenVINO's CPU plugin (f32 or bf16 inference precision, through :mod:`targets.openvino`); both take
their schedule from the model's metadata (:func:`fxpass.metadata.parse`, read once by
:class:`TableModel`) and import no torch (``fxpass sample`` imports only NumPy, Pillow, rich, onnx and
the runtime).  :func:`make_denoiser` picks one by runtime name (:data:`RUNTIMES`);
:func:`runtime_unavailable_reason` says why a runtime cannot run here.  :class:`TorchDenoiser` runs the
eager PyTorch model (the reference), torch imported only when it is built.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from . import metadata
from .deep_cache import SHALLOW_SUFFIX
from .diffusion import Diffusion
from .errors import FxpassError, first_line, ort_reason  # noqa: F401  (ort_reason: here too)

#: ``fxpass sample --runtime`` names → OpenVINO inference precision (``None``: ONNX Runtime)
RUNTIMES = {"ort": None, "openvino": "f32", "openvino-bf16": "bf16", "litert": "litert"}


def openvino_reason(exc: BaseException, path: Path) -> str:
    """OpenVINO's error without its "Exception from src/...cpp:N:" location lines (the first line of
    a compile error is only those) and without a leading "PATH: "."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    lines = [ln for ln in lines if ln and not re.fullmatch(r"Exception from \S+:\d+:", ln)]
    text = lines[0] if lines else first_line(exc)
    return text.removeprefix(f"{path}: ")[:200]


def _read_graph(path: Path):
    """The ONNX file without its weights; external data checked by the rule ``fxpass check`` applies
    (regular files inside the model's folder)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf and onnx raise several types for unreadable files
        raise FxpassError(f"{path}: not a readable ONNX model ({first_line(exc, 200)})") from None
    metadata.check_external_data(model, path)
    return model


class TableModel:
    """What every runtime's denoiser shares: the fxpass table-mode file, its metadata, its
    ``x, t_index -> out`` signature and the call contract; a subclass builds its runtime and runs one
    batch in :meth:`_run`.

    Every problem with the file (unreadable, not fxpass, not table mode, a schedule that is not the
    config's respaced one, inputs that do not fit) is an :class:`FxpassError` naming it.  ``calls``
    counts model calls; ``runtime`` names the runtime (as ``fxpass check`` names its rows).
    """

    runtime = "none"

    def __init__(self, path: str | Path):
        from .fileio import check_model_file
        from .limits import check_input_fits

        self.path = path = check_model_file(path)
        meta, inputs, outputs, graph = self._read(path)
        self.meta = meta
        if meta.config is None:
            raise FxpassError(f"{path}: no {metadata.CONFIG} metadata; sampling needs the model's schedule")
        if not metadata.schedule_matches_config(meta):
            raise FxpassError(f"{path}: metadata {metadata.TIMESTEPS} ({meta.steps} steps) does not match the "
                              f"respaced schedule of its {metadata.CONFIG}; sampling needs the config's schedule")
        if graph is not None:  # an ONNX graph (a .tflite's reader checks its file itself):
            metadata.check_table_rows(graph, meta, str(path))  # its tables' rows against the metadata's schedule,
            metadata.check_schedule(meta, path)  # and that schedule as its lowering made it
        self.config = meta.config
        self.diffusion = Diffusion.from_config(self.config)
        self.timesteps = list(meta.timesteps)
        self.image_size = int(self.config["image_size"])
        check_input_fits((1, 3, self.image_size, self.image_size), f"metadata {metadata.CONFIG} image_size", str(path))
        if meta.deep_cache is not None and meta.deep_cache["role"] == "shallow":
            raise FxpassError(f"{path}: the shallow graph of a --deep-cache lowering; use its full graph "
                              f"(the file without {SHALLOW_SUFFIX[:-len('.onnx')]!r} in its name)")
        self._check_signature(inputs, outputs)
        self.calls = 0
        self.shallow_path: Path | None = None

    def _read(self, path: Path):
        """(the file's fxpass metadata, its inputs, its output names, its ONNX graph or None)."""
        graph = _read_graph(path)
        meta = metadata.parse(metadata.read_props(graph), str(path), require=("table",))
        return meta, metadata.graph_inputs(graph), [o.name for o in graph.graph.output], graph

    def load_shallow(self) -> None:
        """Load the ``--deep-cache`` shallow graph beside this file (for :meth:`full` / :meth:`shallow`):
        FxpassError where this file has none, or the one beside it is missing or another lowering's."""
        from .deep_cache import sha256, shallow_path

        entry = self.meta.deep_cache
        if entry is None:
            raise FxpassError(f"{self.path}: no deep-cache shallow graph (lower with --deep-cache to use "
                              "--cache-interval)")
        path = shallow_path(self.path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise FxpassError(f"{path}: the shallow graph of {self.path.name} cannot be read "
                              f"({exc.strerror or exc}); it is written beside the full graph") from None
        if sha256(data) != entry["shallow_sha256"]:
            raise FxpassError(f"{path}: not the shallow graph {self.path.name} was lowered with (SHA-256 differs)")
        inputs = metadata.graph_inputs(_read_graph(path))
        if set(inputs) != {"x", "t_index", "cache"}:
            raise FxpassError(f"{path}: inputs are {sorted(inputs)}, expected x, t_index and cache")
        self._load_shallow(path)
        self.shallow_path = path

    def _load_shallow(self, path: Path) -> None:
        raise NotImplementedError

    def full(self, x: np.ndarray, t_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(out, the cached feature) of a full call (needs :meth:`load_shallow` first)."""
        self.calls += 1
        out, cache = self._run_full(self._x(x), np.ascontiguousarray(t_index, dtype=np.int64))
        return self._checked(out, x, t_index), cache

    def shallow(self, x: np.ndarray, t_index: np.ndarray, cache: np.ndarray) -> np.ndarray:
        """out of a shallow call from the feature of an earlier full call."""
        self.calls += 1
        return self._checked(self._run_shallow(self._x(x), np.ascontiguousarray(t_index, dtype=np.int64), cache), x,
                             t_index)

    def _x(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32).astype(self.x_dtype, copy=False)

    def _checked(self, out, x: np.ndarray, t_index) -> np.ndarray:
        """The output, its shape checked, as eps (a v- or x0-predicting model's turned into eps)."""
        out = np.asarray(out, dtype=np.float32)
        want = self.diffusion.output_shape(x.shape)
        if out.shape != want:
            raise FxpassError(f"{self.path}: output out has shape {list(out.shape)}, expected {list(want)} "
                              f"(learn_sigma={self.diffusion.learn_sigma})")
        return self.diffusion.as_eps(out, np.asarray(x, dtype=np.float32), t_index)

    def _check_signature(self, inputs: dict[str, tuple[str, list]], outputs: list[str]) -> None:
        if set(inputs) != {"x", "t_index"}:
            raise FxpassError(f"{self.path}: inputs are {sorted(inputs)}, expected x and t_index")
        if inputs["t_index"][0] != "int64":
            raise FxpassError(f"{self.path}: input t_index is {inputs['t_index'][0]}, expected int64")
        # float16 inputs (a model converted without keeping float32 I/O) are fed float16
        if inputs["x"][0] not in ("float32", "float16"):
            raise FxpassError(f"{self.path}: input x is {inputs['x'][0]}, expected float32")
        self.x_dtype = np.dtype(inputs["x"][0]).type
        if "out" not in outputs:
            raise FxpassError(f"{self.path}: outputs are {outputs}, expected out")
        shape = inputs["x"][1]
        self.static_batch = shape[0] if shape and shape[0] > 0 else None
        s = self.image_size
        #: image channels: 3 (RGB), or 1 for a grayscale model (MONAI's, a user's)
        self.channels = shape[1] if len(shape) == 4 and shape[1] == 1 else 3
        c = self.channels
        if len(shape) != 4 or any(d > 0 and d != w for d, w in zip(shape[1:], (c, s, s))):
            raise FxpassError(f"{self.path}: input x has shape {shape}, expected [N, 3 or 1, {s}, {s}] (-1: any)")

    def _run(self, x: np.ndarray, t_index: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, x: np.ndarray, t_index: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        t_index = np.ascontiguousarray(t_index, dtype=np.int64)
        if self.static_batch == 1 and x.shape[0] != 1:
            return np.concatenate([self(x[i:i + 1], t_index[i:i + 1]) for i in range(x.shape[0])])
        self.calls += 1
        return self._checked(self._run(self._x(x), t_index), x, t_index)


class OnnxDenoiser(TableModel):
    """An fxpass table-mode ONNX model on ONNX Runtime (CPU), as the sampler's ``model`` callable."""

    runtime = "onnxrt-cpu"

    def __init__(self, path: str | Path, *, threads: int | None = None):
        import onnxruntime as ort

        super().__init__(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
            raise FxpassError(f"{self.path}: not a readable ONNX model ({ort_reason(exc)})") from None

        self._options = options

    def _run(self, x: np.ndarray, t_index: np.ndarray) -> np.ndarray:
        (out,) = self.session.run(["out"], {"x": x, "t_index": t_index})
        return out

    def _load_shallow(self, path: Path) -> None:
        import onnxruntime as ort

        try:
            self.shallow_session = ort.InferenceSession(str(path), sess_options=self._options,
                                                        providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
            raise FxpassError(f"{path}: not a readable ONNX model ({ort_reason(exc)})") from None

    def _run_full(self, x, t_index):
        return self.session.run(["out", "cache"], {"x": x, "t_index": t_index})

    def _run_shallow(self, x, t_index, cache):
        (out,) = self.shallow_session.run(["out"], {"x": x, "t_index": t_index, "cache": cache})
        return out


class OpenVinoDenoiser(TableModel):
    """An fxpass table-mode ONNX model (float, or int8 QDQ) on OpenVINO's CPU plugin, through
    :class:`targets.openvino.OpenVinoRunner`: ``precision`` ``f32`` or ``bf16`` (its
    ``INFERENCE_PRECISION_HINT``).  Ask :func:`runtime_unavailable_reason` first: an OpenVINO that
    cannot run here fails at compile time as an :class:`FxpassError`.
    """

    def __init__(self, path: str | Path, *, precision: str = "f32", threads: int | None = None):
        from targets.openvino import openvino_runner

        super().__init__(path)
        self.runner = openvino_runner(self.path, precision=precision, num_threads=threads)
        self.runtime = self.runner.name
        self.precision = self.runner.precision
        try:
            self.runner.compiled_model()  # compiled once, now: errors here, not at the first step
        except Exception as exc:  # OpenVINO raises RuntimeError (and others) for models it cannot compile
            raise FxpassError(f"{self.path}: OpenVINO cannot compile it for its CPU plugin "
                              f"({openvino_reason(exc, self.path)})") from None

        self._threads = threads

    def _run(self, x: np.ndarray, t_index: np.ndarray) -> np.ndarray:
        with self.runner:  # an infer request per call: compiling happened once, requests are cheap
            return self.runner.infer({"x": x, "t_index": t_index})["out"]

    def _load_shallow(self, path: Path) -> None:
        from targets.openvino import openvino_runner

        self.shallow_runner = openvino_runner(path, precision=self.precision, num_threads=self._threads)
        try:
            self.shallow_runner.compiled_model()
        except Exception as exc:  # OpenVINO raises RuntimeError (and others) for models it cannot compile
            raise FxpassError(f"{path}: OpenVINO cannot compile it for its CPU plugin "
                              f"({openvino_reason(exc, path)})") from None

    def _run_full(self, x, t_index):
        with self.runner:
            result = self.runner.infer({"x": x, "t_index": t_index})
            return np.array(result["out"]), np.array(result["cache"])

    def _run_shallow(self, x, t_index, cache):
        with self.shallow_runner:
            return np.array(self.shallow_runner.infer({"x": x, "t_index": t_index, "cache": cache})["out"])


class LiteRTDenoiser(TableModel):
    """An fxpass table-mode ``.tflite`` file (``fxpass lower --format tflite``) in LiteRT's interpreter,
    through :class:`targets.litert.LiteRTRunner`; its metadata is the file's ``fxpass`` entry."""

    runtime = "litert"

    def __init__(self, path: str | Path, *, threads: int | None = None):
        from targets.litert import litert_runner

        super().__init__(path)
        self.runner = litert_runner(self.path, num_threads=threads)
        try:
            self.runner.interpreter()  # loaded once, now: errors here, not at the first step
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError for files it cannot load
            raise FxpassError(f"{self.path}: LiteRT cannot load it ({first_line(exc, 200)})") from None

    def _read(self, path: Path):
        from .formats.tflite_file import read_tflite

        info = read_tflite(path, require_modes=("table",))
        outputs = list(info.tflite.outputs) if len(info.tflite.outputs) != 1 else ["out"]  # LiteRTRunner's name
        return info.meta, info.inputs, outputs, None

    def _run(self, x: np.ndarray, t_index: np.ndarray) -> np.ndarray:
        return self.runner.infer_impl({"x": x, "t_index": t_index})["out"]

    def _load_shallow(self, path: Path) -> None:
        raise FxpassError(f"{self.path}: --cache-interval runs ONNX deep-cache graphs; a .tflite has no shallow graph")


def runtime_unavailable_reason(runtime: str) -> str | None:
    """Why ``runtime`` (a :data:`RUNTIMES` name) cannot run on this machine, or ``None`` when it can."""
    precision = RUNTIMES[runtime]
    if precision is None:
        return None
    if precision == "litert":
        from targets.litert import litert_unavailable_reason

        return litert_unavailable_reason()
    from targets.openvino import openvino_unavailable_reason

    return openvino_unavailable_reason(precision)


def make_denoiser(path: str | Path, runtime: str = "ort", *, threads: int | None = None) -> TableModel:
    """The denoiser of ``runtime`` (a :data:`RUNTIMES` name) for the model at ``path``."""
    precision = RUNTIMES[runtime]
    if precision is None:
        return OnnxDenoiser(path, threads=threads)
    if precision == "litert":
        return LiteRTDenoiser(path, threads=threads)
    return OpenVinoDenoiser(path, precision=precision, threads=threads)


class TorchDenoiser:
    """The eager model as a denoiser: ``t_index`` mapped to the model's timesteps, float32, no grad."""

    def __init__(self, model, diffusion: Diffusion, model_timesteps, *, batch: int = 64):
        import torch

        torch.nn.Module.train(model, False)  # a model may override eval(); its return value is not relied on
        self.model = model
        self.diffusion = diffusion
        self.timesteps = torch.as_tensor(list(model_timesteps))
        self.batch = batch
        self.calls = 0

    def __call__(self, x: np.ndarray, t_index: np.ndarray) -> np.ndarray:
        import torch

        outs = []
        with torch.no_grad():
            for start in range(0, x.shape[0], self.batch):
                xb = torch.from_numpy(np.ascontiguousarray(x[start:start + self.batch], dtype=np.float32))
                tb = self.timesteps[torch.as_tensor(np.asarray(t_index[start:start + self.batch], dtype=np.int64))]
                outs.append(self.model(xb, tb).float().numpy())
                self.calls += 1
        return np.concatenate(outs)
