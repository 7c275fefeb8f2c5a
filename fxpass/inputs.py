"""The one seeded input source: every input of an ONNX graph drawn from one ``numpy.random.default_rng(seed)``.

:func:`seeded_feeds` draws the inputs in the graph's input order for ``fxpass lower``'s gate
(:mod:`fxpass.gate`), ``fxpass check`` (:mod:`fxpass.verify`) and the golden writer
(:mod:`fxpass.golden`); :func:`spread`, :func:`gate_t_indices` and :func:`mixed_batches` choose the
schedule positions and batches they are drawn at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: the gate's full-network comparison: the ends, the middle and this many seeded schedule positions
GATE_SAMPLED_STEPS = 2
#: batch sizes the gate adds when the batch dimension is dynamic (with mixed t_index values)
DYNAMIC_BATCHES = (2, 3)


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype name and shape (-1 for a symbolic dimension)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


def input_specs(model) -> list[InputSpec]:
    """The non-initializer inputs of an ``onnx.ModelProto`` or an :class:`~fxpass.metadata.OnnxInfo`."""
    from .metadata import graph_inputs

    inputs = model.inputs if hasattr(model, "inputs") else graph_inputs(model)
    return [InputSpec(n, d, tuple(s)) for n, (d, s) in inputs.items()]


@dataclass
class Feeds:
    feeds: list[dict]
    labels: list[dict]  # per feed: t_index / timestep / model_timestep (or input number in fixed mode)


def seeded_feeds(specs: Sequence[InputSpec], *, seed: int, timesteps: Sequence, model_timesteps: Sequence,
                 t_indices: Sequence[int] | Sequence[Sequence[int]] | None = None, count: int = 2,
                 batch: int | None = None, num_classes: int = 1000) -> Feeds:
    """Seeded feeds: one per entry of ``t_indices`` (table/step) or ``count`` of them (fixed mode).

    An entry of ``t_indices`` is an int (every row of the batch at that index) or a sequence (one
    index per row: a mixed batch).  Float inputs are standard normal, ``t_index`` is the index,
    other integer inputs (class labels) are uniform in ``0..num_classes-1``.  Draws follow the
    graph's input order, per feed.  ``batch`` defaults to the model's static batch (else 1).
    """
    rng = np.random.default_rng(seed)
    by_name = {s.name: s for s in specs}
    static_batch = by_name["x"].shape[0] if "x" in by_name and by_name["x"].shape else -1
    items: list = list(t_indices) if t_indices is not None else list(range(count))
    feeds, labels = [], []
    for k, item in enumerate(items):
        if t_indices is not None:
            rows = [int(i) for i in item] if isinstance(item, (list, tuple, np.ndarray)) else None
            n = len(rows) if rows else (batch or (static_batch if static_batch > 0 else 1))
            index = np.asarray(rows if rows else [int(item)] * n, dtype=np.int64)
            label = {"t_index": int(index[0]), "timestep": timesteps[int(index[0])],
                     "model_timestep": model_timesteps[int(index[0])]}
            if rows and len(set(rows)) > 1:
                label["t_indices"] = rows
        else:
            n = batch or (static_batch if static_batch > 0 else 1)
            index = None
            label = {"input": k}
            if timesteps:  # fixed mode (a plain model has none)
                label.update(timestep=timesteps[0], model_timestep=model_timesteps[0])
        if n != 1:
            label["batch"] = n
        feed = {}
        for spec in specs:
            shape = tuple(n if i == 0 else (1 if d < 0 else d) for i, d in enumerate(spec.shape))
            if spec.name == "t_index":
                feed[spec.name] = index if index is not None else np.zeros(shape, np.int64)
            elif spec.dtype.startswith("float") or spec.dtype == "bfloat16":
                feed[spec.name] = rng.standard_normal(shape, dtype=np.float32).astype(
                    spec.dtype if spec.dtype in ("float16", "float64") else np.float32)
            else:
                feed[spec.name] = rng.integers(0, num_classes, size=shape, dtype=np.int64).astype(spec.dtype)
        feeds.append(feed)
        labels.append(label)
    return Feeds(feeds, labels)


def spread(n: int, k: int = 5) -> list[int]:
    """``k`` t_index values spread evenly over ``0..n-1`` (both ends included)."""
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n, k))})


def gate_t_indices(n: int, seed: int, sampled: int = GATE_SAMPLED_STEPS) -> list[int]:
    """The gate's schedule positions: first, middle, last and ``sampled`` seeded others."""
    chosen = {0, n // 2, n - 1}
    others = [i for i in range(n) if i not in chosen]
    if others:
        rng = np.random.default_rng(seed)
        chosen |= {int(i) for i in rng.choice(others, size=min(sampled, len(others)), replace=False)}
    return sorted(chosen)


def mixed_batches(n: int, seed: int, sizes: Sequence[int] = DYNAMIC_BATCHES) -> list[list[int]]:
    """For a dynamic batch: one feed per size, its rows at different seeded t_index values."""
    rng = np.random.default_rng(seed + 1)
    return [[int(i) for i in rng.choice(n, size=b, replace=n < b)] for b in sizes]


def num_classes_of(model) -> int:
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) and n > 0 else 1000

