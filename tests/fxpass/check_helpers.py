"""Helpers for the targets tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

#: the factor by which the perturbed model's output convolution weight is scaled
PERTURBATION = 1.001


def scale_output_conv_weight(model: onnx.ModelProto, factor: float) -> str:
    """Scale, in place, the weight of the Conv that produces the graph's output; returns its name.

    The output convolution is where a relative weight change shows one-for-one in the output
    (``out = W·h + b``), so ``factor - 1`` is about the relative error the check must see.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers[model.graph.output[0].name]
    assert node.op_type == "Conv", f"the output comes from {node.op_type}, expected the output Conv"
    for init in model.graph.initializer:
        if init.name == node.input[1]:
            weight = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((weight * np.float32(factor)).astype(weight.dtype), init.name))
            return init.name
    raise AssertionError(f"no initializer for {node.input[1]}")
