"""A ``--deep-cache`` pair as one Polygraphy runner: the full graph's ``cache`` fed to the shallow graph.

:class:`CachedPairRunner` runs the full graph (ONNX Runtime, CPU) for its ``cache`` output, then the
shallow graph on the same ``x`` and ``t_index`` with that feature, and returns the shallow graph's
``out`` (and the ``cache`` it was given).  Compared with the full graph's own ``out`` it checks the
identity shallow(x, t, cache(x, t)) = full(x, t) that makes a cached call exact.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from .ort import ort_runner


class CachedPairRunner(BaseRunner):
    """``out`` of shallow(x, t_index, cache) with ``cache`` from full(x, t_index)."""

    def __init__(self, full, shallow, *, name: str = "onnxrt-cpu-cached"):
        super().__init__(name=name, prefix="cached-pair-runner")
        self.full = ort_runner(full, cuda=False, name=f"{name}-full")
        self.shallow = ort_runner(shallow, cuda=False, name=f"{name}-shallow")

    def activate_impl(self):
        self.full.activate()
        self.shallow.activate()

    def deactivate_impl(self):
        self.full.deactivate()
        self.shallow.deactivate()

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name, value in self.full.get_input_metadata().items():
            meta.add(name, value.dtype, value.shape)
        return meta

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        cache = self.full.infer(feed_dict)["cache"]
        out = self.shallow.infer({**feed_dict, "cache": cache})["out"]
        self.inference_time = time.perf_counter() - start
        return OrderedDict([("out", np.asarray(out)), ("cache", np.asarray(cache))])
