"""Denoisers the sampler loops (and the fidelity metrics) call: ``model(x, t_index) -> output``.

:class:`OnnxDenoiser` runs an fxpass table-mode model on ONNX Runtime, with its schedule from the
model's metadata (:func:`fxpass.metadata.parse`); no torch on that path (``fxpass sample`` imports
only NumPy, Pillow, rich and the runtime).  :class:`TorchDenoiser` runs the eager PyTorch model (the
reference), torch imported only when it is built.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from . import metadata
from .diffusion import Diffusion
from .errors import FxpassError, first_line


def ort_reason(exc: BaseException) -> str:
    """ONNX Runtime's load error without its "[ONNXRuntimeError] ... Load model from X failed:" and
    C++ source-location prefixes."""
    text = first_line(exc)
    text = text.rsplit(" failed:", 1)[-1].strip() or text
    text = re.sub(r"^\S+\.(?:cc|h|cpp):\d+ .*?\(\)\s*", "", text)
    return text[:200]


def _check_external_data(path: Path) -> None:
    """The same rule ``fxpass check`` applies: external data only in regular files inside the model's folder."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf and onnx raise several types for unreadable files
        raise FxpassError(f"{path}: not a readable ONNX model ({first_line(exc, 200)})") from None
    metadata.check_external_data(model, path)


class OnnxDenoiser:
    """An fxpass table-mode ONNX model on ONNX Runtime (CPU), as the sampler's ``model`` callable.

    Every problem with the file (unreadable, not fxpass, not table mode, a schedule that is not the
    config's respaced one, inputs that do not fit) is an :class:`FxpassError` naming it.  ``calls``
    counts model calls.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None):
        import onnxruntime as ort

        from .fileio import check_model_file

        self.path = path = check_model_file(path)
        _check_external_data(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
            raise FxpassError(f"{path}: not a readable ONNX model ({ort_reason(exc)})") from None
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        self.meta = meta = metadata.parse(props, str(path), require=("table",))
        if meta.config is None:
            raise FxpassError(f"{path}: no {metadata.CONFIG} metadata; sampling needs the model's schedule")
        if not metadata.schedule_matches_config(meta):
            raise FxpassError(f"{path}: metadata {metadata.TIMESTEPS} ({meta.steps} steps) does not match the "
                              f"respaced schedule of its {metadata.CONFIG}; sampling needs the config's schedule")
        self.config = meta.config
        self.diffusion = Diffusion.from_config(self.config)
        self.timesteps = list(meta.timesteps)
        self.image_size = int(self.config["image_size"])
        from .limits import check_input_fits

        check_input_fits((1, 3, self.image_size, self.image_size), f"metadata {metadata.CONFIG} image_size", str(path))
        self._check_signature()
        self.calls = 0

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


class TorchDenoiser:
    """The eager model as a denoiser: ``t_index`` mapped to the model's timesteps, float32, no grad."""

    def __init__(self, model, diffusion: Diffusion, model_timesteps, *, batch: int = 64):
        import torch

        self.model = model.eval()
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
