"""ONNX-side surgery: graph passes on ``onnx_graphsurgeon.Graph`` and the ``simplify`` stage.

One pass per module, verb first, ``name(graph, **options) -> (graph, count)``, matching by
structure (through ``_rules.apply_rule``: a non-match is a ``Skip`` with a reason, which the
report counts) and ending with ``graph.cleanup().toposort()``.  ``passes`` holds the pass table
and its ordering rules, ``orchestrator`` the ``simplify`` stage (its docstring says what runs and
why), ``modelio`` model I/O (the 2 GiB rule, saving, metadata), ``convert_precision`` the float16
stage.  This package does not import torch.
"""

from .modelio import LARGE_MODEL_BYTES, is_large, op_histogram, save_model
from .orchestrator import GROUP_NORM_FORMS, SIMPLIFIERS, simplify
from .passes import CONSTRAINTS, PASSES, Constraint, Pass, check_order, describe

__all__ = [
    "CONSTRAINTS", "GROUP_NORM_FORMS", "LARGE_MODEL_BYTES", "PASSES", "SIMPLIFIERS", "Constraint", "Pass",
    "check_order", "describe", "is_large", "op_histogram", "save_model", "simplify",
]
