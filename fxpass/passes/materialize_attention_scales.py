"""materialize_attention_scales: constant attention scales, folded into the qkv projection."""

from __future__ import annotations

import copy
import numbers
import operator

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate
from torch.fx.passes.infra.pass_base import PassResult

from ._util import (
    MOVEMENT_FUNCTIONS,
    MOVEMENT_METHODS,
    UNKNOWN,
    batch_dependence,
    dynamic_batch_of,
    finish,
    record,
    require_graph_module,
    static_values,
)

_MUL_FUNCTIONS = (operator.mul, torch.mul)
_PROJECTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _is_movement(node: Node) -> bool:
    if node.op == "call_method":
        return node.target in MOVEMENT_METHODS
    if node.op == "call_function":
        return node.target in MOVEMENT_FUNCTIONS
    return False


def _scalar_mul(node: Node, values) -> tuple[Node, int] | None:
    """(tensor operand, index of the scale argument) for ``tensor * scalar``, else None."""
    if node.kwargs or len(node.args) != 2:
        return None
    if not ((node.op == "call_function" and node.target in _MUL_FUNCTIONS) or
            (node.op == "call_method" and node.target == "mul")):
        return None
    for tensor_pos, scale_pos in ((0, 1), (1, 0)):
        tensor, scale = node.args[tensor_pos], node.args[scale_pos]
        if not isinstance(tensor, Node) or not isinstance(values.get(tensor), torch.Tensor):
            continue
        scale_value = values.get(scale, UNKNOWN) if isinstance(scale, Node) else scale
        if isinstance(scale_value, numbers.Real) and not isinstance(scale_value, bool):
            return tensor, scale_pos
    return None


def _source_projection(gm: GraphModule, tensor: Node) -> Node | None:
    node = tensor
    while _is_movement(node):
        node = node.args[0]
        if not isinstance(node, Node):
            return None
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _PROJECTIONS):
        return node
    return None


def _reads_metadata_only(node: Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in ("shape", "dtype", "device", "ndim")
    return node.op == "call_method" and node.target in ("size", "dim")


def _movement_region(source: Node) -> tuple[list[Node], list[tuple[Node, Node]]]:
    """Movement nodes reachable from ``source`` and the (terminal user, fed-by node) pairs."""
    region: list[Node] = []
    terminals: list[tuple[Node, Node]] = []
    stack = [source]
    seen = {source}
    while stack:
        node = stack.pop()
        for user in node.users:
            if _is_movement(user) and user.args and user.args[0] is node:
                if user not in seen:
                    seen.add(user)
                    region.append(user)
                    stack.append(user)
            elif not _reads_metadata_only(user):
                terminals.append((user, node))
    order = {n: i for i, n in enumerate(source.graph.nodes)}
    region.sort(key=order.__getitem__)
    return region, terminals


def _channel_probe(gm: GraphModule, source: Node, region: list[Node], values) -> dict[Node, torch.Tensor] | None:
    """Each region node's value when the projection outputs its channel index everywhere."""
    out = values.get(source)
    if not isinstance(out, torch.Tensor):
        return None
    module = gm.get_submodule(source.target)
    channel_dim = out.ndim - 1 if isinstance(module, nn.Linear) else 1
    shape = [1] * out.ndim
    shape[channel_dim] = out.shape[channel_dim]
    try:
        probe = torch.arange(out.shape[channel_dim], dtype=torch.float64).reshape(shape).expand(*out.shape).clone()
    except Exception:
        return None
    env: dict[Node, object] = {source: probe}
    interp = torch.fx.Interpreter(gm)

    def fetch(a):
        if not isinstance(a, Node):
            return a
        if a in env:
            return env[a]
        value = values.get(a, UNKNOWN)
        if value is UNKNOWN or isinstance(value, torch.Tensor):
            raise LookupError(a.name)
        return value

    try:
        for node in region:
            args = map_aggregate(node.args, fetch)
            kwargs = map_aggregate(node.kwargs, fetch)
            env[node] = getattr(interp, node.op)(node.target, args, kwargs)
    except Exception:
        return None
    return env


def _channels(value) -> set[int]:
    tensors: list[torch.Tensor] = []
    map_aggregate(value, lambda v: tensors.append(v) if isinstance(v, torch.Tensor) else None)
    found: set[int] = set()
    for t in tensors:
        found.update(int(c) for c in torch.unique(t).tolist())
    return found


def materialize_attention_scales(gm: GraphModule, example_inputs=None, *,
                                 dynamic_batch: bool | None = None) -> PassResult:
    """Evaluate scale arithmetic (``1 / math.sqrt(math.sqrt(ch))`` from shapes) to constants, then
    fold each ``q * scale`` / ``k * scale`` into the rows of the qkv projection that feed it.

    Precondition: example inputs are known (shapes come from fake propagation).  A multiply is folded
    when its tensor reaches a Conv/Linear projection through data movement only (reshape, split,
    chunk, view, getitem, ...) and no other consumer reads the channels it scales; otherwise it stays
    as a multiply by a constant.  The projection is copied before its weights change.  A scale that
    reads input data is never evaluated; with ``dynamic_batch`` (default: what ``fxpass.rewrite``
    recorded) neither is one that reads the batch size.

    Before::                                           After::

        qkv = conv(h); ch = qkv.shape[1] // 12             qkv = conv'(h)   (q, k rows scaled)
        s = 1 / sqrt(sqrt(ch))                             q, k, v = qkv.reshape(...).split(ch)
        q, k, v = qkv.reshape(...).split(ch)               w = einsum(q, k)
        w = einsum(q * s, k * s)
    """
    gm = require_graph_module(gm, "materialize_attention_scales")
    values = static_values(gm, example_inputs)
    batch: dict = {}
    if dynamic_batch_of(gm, dynamic_batch):
        scales = [node.args[found[1]] for node in gm.graph.nodes if (found := _scalar_mul(node, values))]
        scales = [n for n in scales if isinstance(n, Node)]
        batch = batch_dependence(gm, example_inputs, nodes=scales) if scales else {}
    materialized = folded = 0
    copied: dict[str, nn.Module] = {}
    for node in list(gm.graph.nodes):
        found = _scalar_mul(node, values)
        if found is None:
            continue
        tensor, scale_pos = found
        scale_arg = node.args[scale_pos]
        if isinstance(scale_arg, Node) and scale_arg in batch:
            continue  # e.g. 1 / x.shape[0]: a number only at the captured batch
        scale = values[scale_arg] if isinstance(scale_arg, Node) else scale_arg
        if isinstance(scale_arg, Node):
            new_args = list(node.args)
            new_args[scale_pos] = float(scale)
            node.args = tuple(new_args)
            materialized += 1
        source = _source_projection(gm, tensor)
        if source is None:
            continue
        region, terminals = _movement_region(source)
        probe = _channel_probe(gm, source, region, values)
        if probe is None:
            continue
        mine = _channels(probe[tensor])
        others: set[int] = set()
        for user, fed_by in terminals:
            if user is not node:
                others |= _channels(probe[fed_by])
        if not mine or mine & others:
            continue
        if source.target not in copied:
            module = copy.deepcopy(gm.get_submodule(source.target))
            gm.set_submodule(source.target, module)
            copied[source.target] = module
        module = copied[source.target]
        rows = torch.tensor(sorted(mine))
        with torch.no_grad():
            module.weight[rows] *= float(scale)
            if module.bias is not None:
                module.bias[rows] *= float(scale)
        for user in node.users:
            if user.op == "call_method" and user.target == "view":
                user.target = "reshape"  # the product was contiguous; its input may not be
        node.replace_all_uses_with(tensor)
        gm.graph.erase_node(node)
        folded += 1
    count = materialized + folded
    record(gm, "materialize_attention_scales", count)
    gm.meta.setdefault("fxpass_attention_scales", {"materialized": 0, "folded": 0})
    gm.meta["fxpass_attention_scales"]["materialized"] += materialized
    gm.meta["fxpass_attention_scales"]["folded"] += folded
    return finish(gm, count)
