"""Plain helpers for the surgery tests (imported as ``surgery_helpers``; fixtures live in conftest)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import helper


def ops(model_or_graph) -> collections.Counter:
    """Op-type histogram of a ModelProto or a gs.Graph."""
    if isinstance(model_or_graph, gs.Graph):
        return collections.Counter(n.op for n in model_or_graph.nodes)
    return collections.Counter(n.op_type for n in model_or_graph.graph.node)


def to_model(graph: gs.Graph) -> onnx.ModelProto:
    model = gs.export_onnx(graph)
    onnx.checker.check_model(model)
    return model


def run_ort(model, feeds: dict) -> list[np.ndarray]:
    if isinstance(model, gs.Graph):
        model = gs.export_onnx(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def run_reference(model, feeds: dict) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    if isinstance(model, gs.Graph):
        model = gs.export_onnx(model)
    return ReferenceEvaluator(model).run(None, feeds)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 21) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def fingerprint(graph: gs.Graph):
    """A structural summary to check that a pass left a graph unchanged (node order aside)."""
    return sorted(repr((n.op, [t.name for t in n.inputs], [t.name for t in n.outputs], dict(n.attrs))) for n in graph.nodes)


def randomize(module, scale: float = 0.2):
    """Give every parameter random values (zero-initialised output convs would hide errors)."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module


def run_with_skips(graph_pass, graph, **options):
    """``graph_pass(graph, **options)`` plus the skip reasons its rule recorded: ``(graph, count, {reason: n})``."""
    from surgery._rules import collect_skips

    with collect_skips() as skipped:
        graph, count = graph_pass(graph, **options)
    return graph, count, dict(skipped)
