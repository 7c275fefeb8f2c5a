"""Reference for step graphs: the eager model and fxpass's NumPy posterior, as a Polygraphy runner."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata


class NumpyStepRunner(BaseRunner):
    """``x_prev, pred_xstart`` from the eager model's output and ``fxpass.diffusion.Diffusion.p_mean_variance``
    (the NumPy loop's own maths), for comparison with a ``--step-graph`` model."""

    def __init__(self, model: torch.nn.Module, diffusion, model_timesteps, *, name: str = "numpy-step"):
        super().__init__(name=name, prefix="numpy-step-runner")
        self.model = model
        self.diffusion = diffusion
        self.model_timesteps = torch.as_tensor(list(model_timesteps))

    def activate_impl(self):
        pass

    def deactivate_impl(self):
        pass

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        meta.add("x", np.float32, (-1, 3, -1, -1))
        meta.add("t_index", np.int64, (-1,))
        meta.add("noise", np.float32, (-1, 3, -1, -1))
        if getattr(self.model, "num_classes", None) is not None:
            meta.add("y", np.int64, (-1,))
        return meta

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        x = np.asarray(feed_dict["x"], dtype=np.float32)
        t_index = np.asarray(feed_dict["t_index"], dtype=np.int64)
        noise = np.asarray(feed_dict["noise"], dtype=np.float32)
        xs, preds = [], []
        with torch.no_grad():
            for row, t in enumerate(t_index.tolist()):
                args = [torch.from_numpy(x[row : row + 1]), self.model_timesteps[t : t + 1]]
                if "y" in feed_dict:
                    args.append(torch.as_tensor(np.asarray(feed_dict["y"])[row : row + 1]))
                out = self.model(*args).float().numpy()
                mean, log_var, pred = self.diffusion.p_mean_variance(out, x[row : row + 1], t)
                step = mean if t == 0 else mean + np.exp(np.float32(0.5) * log_var) * noise[row : row + 1]
                xs.append(step)
                preds.append(pred)
        self.inference_time = time.perf_counter() - start
        return OrderedDict([("x_prev", np.concatenate(xs).astype(np.float32)),
                            ("pred_xstart", np.concatenate(preds).astype(np.float32))])
