"""The eager PyTorch model as a Polygraphy runner (the reference every target is compared to)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from fxpass.outputs import pick_output

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class TorchReferenceRunner(BaseRunner):
    """Runs the original eager model, mapping ``t_index`` to the schedule's timestep.

    Polygraphy's own ``PytRunner`` moves inputs to CUDA and expects a single tensor output; this
    runner stays on the CPU, computes in float32 or float64, and feeds ``model(x, timesteps[, y])``.

    ``timesteps``: the model timestep for each ``t_index`` (table mode), or ``fixed_timestep`` for a
    model lowered at one timestep (then the feed has no ``t_index``); ``plain``: neither, a model with no
    timestep, called ``model(x, **extras)``.
    """

    def __init__(self, model: torch.nn.Module, *, timesteps: Sequence[float] | None = None,
                 fixed_timestep: float | None = None, dtype: str = "float32", image_size: int | None = None,
                 name: str | None = None, output_name: str = "out", timestep_dtype=torch.int64,
                 extra_inputs: Sequence[tuple[str, str, Sequence[int]]] = (), plain: bool = False):
        super().__init__(name=name or f"torch-{dtype}", prefix="torch-runner")
        if sum((timesteps is not None, fixed_timestep is not None, plain)) != 1:
            raise ValueError("give exactly one of timesteps (table mode), fixed_timestep or plain")
        self.plain = plain
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
        self.model = model
        self.timesteps = None if timesteps is None else torch.as_tensor(list(timesteps))
        if self.timesteps is not None and not self.timesteps.is_floating_point():
            self.timesteps = self.timesteps.to(timestep_dtype)
        self.fixed_timestep = fixed_timestep
        self.torch_dtype = _DTYPES[dtype]
        self.image_size = image_size
        self.output_name = output_name
        self.class_cond = getattr(model, "num_classes", None) is not None
        #: inputs beside x and t_index, passed to the model by name: (name, numpy dtype, shape)
        self.extra_inputs = [tuple(e) for e in extra_inputs]
        if self.class_cond and not any(e[0] in ("y", "class_labels", "labels") for e in self.extra_inputs):
            self.extra_inputs.append(("y", "int64", (-1,)))

    def activate_impl(self):
        # torch's own methods, their return values not relied on: a model may override .to() (PatchDDM's
        # spreads blocks over devices and returns None)
        torch.nn.Module.to(self.model, self.torch_dtype)
        torch.nn.Module.train(self.model, False)
        self._model = self.model

    def deactivate_impl(self):
        torch.nn.Module.float(self.model)
        del self._model

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        size = self.image_size or -1
        meta.add("x", np.float32, (-1, 3, size, size))
        if self.timesteps is not None:
            meta.add("t_index", np.int64, (-1,))
        for name, dtype, shape in self.extra_inputs:
            meta.add(name, np.dtype(dtype), tuple(shape))
        return meta

    def infer_impl(self, feed_dict):
        # a copy: a model that writes into its input in place must not change the feed the runtimes see
        x = torch.tensor(np.array(feed_dict["x"]), dtype=self.torch_dtype)
        n = x.shape[0]
        if self.plain:
            t = None
        elif self.timesteps is not None:
            index = torch.as_tensor(np.asarray(feed_dict["t_index"]), dtype=torch.int64)
            t = self.timesteps[index]
        else:
            t = torch.full((n,), self.fixed_timestep)
            if float(self.fixed_timestep).is_integer():
                t = t.to(torch.int64)
        kwargs = {}  # every other input by name (class labels y, conditioning images, ...)
        for name, value in feed_dict.items():
            if name not in ("x", "t_index"):
                value = np.asarray(value)
                kwargs[name] = torch.tensor(value, dtype=torch.int64 if value.dtype.kind in "iu" else self.torch_dtype)
        start = time.perf_counter()
        with torch.no_grad():
            out = self._model(x, **kwargs) if self.plain else self._model(x, t, **kwargs)
        self.inference_time = time.perf_counter() - start
        out, _ = pick_output(out)  # a library's dataclass / dict / tuple output, as capture reduces it
        return OrderedDict([(self.output_name, out.to(torch.float32).numpy())])
