"""The folded values of the timestep cone's outputs: one constant, or a table with a row per entry.

A row must be what the cone gives for its entry alone: :func:`tabulate` evaluates the whole schedule at
once and checks every row against a per-entry evaluation (within ``ROW_RTOL`` and ``ROW_ATOL``), so
that a cone which mixes the entries of its batch is caught rather than tabulated wrongly.
"""

from __future__ import annotations

import warnings

import torch
from torch.fx import Node

from ..errors import FxpassError, first_line
from ._timestep_cone import ConeEvaluator, cone_closure
from ._util import source_of

#: a table row must equal the cone evaluated for its entry alone within rtol and atol·max|table|
ROW_RTOL = 1e-5
ROW_ATOL = 1e-6


def tabulate(evaluator: ConeEvaluator, cone_set: set[Node], frontier, entries, t_dtype, table_mode, *,
             exact_batch: bool):
    """The value of each cone output, one row per entry (table mode) or for the one timestep.

    A row must be what the cone gives for its entry alone (how the eager model sees a sample).  The
    whole schedule is evaluated at once, and every row is checked against a per-entry evaluation
    (``torch.func.vmap`` over single-entry batches; a plain loop where vmap cannot run the cone).
    A cone that mixes entries along the batch (``emb - emb.mean(0)``, ``emb.flip(0)``) fails that
    check: at a static batch of one the per-entry rows are the right table and are used; at a larger
    or dynamic batch the eager model mixes its samples, which no table reproduces: an error.  A cone
    that cannot take the whole schedule as one batch (route 2's graphs have the static batch size in
    their reshapes) is evaluated entry by entry alone, at a static batch of one.
    """
    value_nodes = cone_closure(frontier, cone_set)
    if not table_mode:  # one entry: the rows of a batch of it are the same timestep
        env = evaluator.run(torch.tensor(entries, dtype=t_dtype), value_nodes)
        single = [_as_tensor(env[n], n) for n in frontier]
        if not exact_batch:  # the constants are broadcast over the batch: they must not depend on it
            pair_env = evaluator.run(torch.tensor(entries * 2, dtype=t_dtype), value_nodes)
            pair = [_as_tensor(pair_env[n], n) for n in frontier]
            expanded = [row.expand(2, *row.shape[1:]) if row.ndim and row.shape[0] == 1 else row for row in single]
            mismatch = _first_mismatch(frontier, pair, expanded, entries * 2, "batch row")
            if mismatch is not None:
                raise FxpassError(f"fold_timesteps: {mismatch}; the timestep path mixes the entries of its batch, "
                                  "so a constant folded at one timestep is wrong at a batch larger than one")
        return single
    try:
        batched_env = evaluator.run(torch.tensor(entries, dtype=t_dtype), value_nodes)
    except FxpassError:
        raise
    except Exception as exc:  # the cone has the batch size in it (an exported graph: reshape to [1, C, 1, 1])
        if not exact_batch:
            raise FxpassError(f"fold_timesteps: the timestep path cannot take a batch of {len(entries)} timesteps "
                              f"({type(exc).__name__}: {first_line(exc)})") from None
        return _per_entry(evaluator, value_nodes, frontier, entries, t_dtype, vectorised=True)
    tables = [_as_tensor(batched_env[n], n) for n in frontier]
    rows = _per_entry(evaluator, value_nodes, frontier, entries, t_dtype, vectorised=True)
    mismatch = _first_mismatch(frontier, tables, rows, entries)
    if mismatch is None:
        return tables
    # the ground truth, entry by entry, every cone node (to name the first one that mixes entries)
    all_rows = _per_entry(evaluator, value_nodes, value_nodes, entries, t_dtype, vectorised=False, strict=False)
    by_node = dict(zip(value_nodes, all_rows))
    rows = [by_node[n] for n in frontier]
    for n, row in zip(frontier, rows):
        if row is None:
            raise FxpassError(
                f"fold_timesteps: {n.format_node()} does not keep the timestep batch dimension; cannot tabulate"
            )
    if _first_mismatch(frontier, tables, rows, entries) is None or exact_batch:
        return rows
    comparable = [(n, batched_env[n], r) for n, r in zip(value_nodes, all_rows)
                  if r is not None and isinstance(batched_env[n], torch.Tensor)]
    mismatch = _first_mismatch([c[0] for c in comparable], [c[1] for c in comparable], [c[2] for c in comparable],
                               entries)
    raise FxpassError(f"fold_timesteps: {mismatch}; the timestep path mixes the entries of its batch, so at a "
                      "batch larger than one (or a dynamic batch) no table of rows reproduces the model")


def _per_entry(evaluator: ConeEvaluator, value_nodes, frontier, entries, t_dtype, *, vectorised: bool,
               strict: bool = True):
    """Each cone output for each entry alone, stacked: ``vmap`` of the single-entry evaluation, or a loop.
    ``strict=False`` (loop only): ``None`` for an output that is no tensor with a batch dimension of one."""

    def one(t: torch.Tensor):
        env = evaluator.run(t.reshape(1), value_nodes)
        if not strict:
            return tuple(env[n] if isinstance(env[n], torch.Tensor) else None for n in frontier)
        return tuple(_as_tensor(env[n], n) for n in frontier)

    timesteps = torch.tensor(entries, dtype=t_dtype)
    if vectorised:
        try:
            with warnings.catch_warnings():  # vmap's "no batching rule, falling back to a loop" notes
                warnings.simplefilter("ignore")
                outputs = torch.func.vmap(one)(timesteps)
        except Exception:  # an operation vmap cannot batch: the plain loop below
            return _per_entry(evaluator, value_nodes, frontier, entries, t_dtype, vectorised=False)
        stacked = []
        for n, out in zip(frontier, outputs):
            if out.ndim < 2 or out.shape[1] != 1:
                raise FxpassError(
                    f"fold_timesteps: {n.format_node()} does not keep the timestep batch dimension; cannot tabulate"
                )
            stacked.append(out.squeeze(1))
        return stacked
    rows: list[list[torch.Tensor] | None] = [[] for _ in frontier]
    for t in timesteps:
        for k, (n, row) in enumerate(zip(frontier, one(t))):
            if rows[k] is None:
                continue
            if row is None or row.ndim == 0 or row.shape[0] != 1:
                if not strict:
                    rows[k] = None
                    continue
                raise FxpassError(
                    f"fold_timesteps: {n.format_node()} does not keep the timestep batch dimension; cannot tabulate"
                )
            rows[k].append(row)
    return [torch.cat(r, dim=0) if r is not None else None for r in rows]


def _first_mismatch(frontier, tables, rows, entries, label: str = "t_index") -> str | None:
    """None when every table row equals its per-entry row (within ROW_RTOL, ROW_ATOL·scale); else where not."""
    for n, table, row in zip(frontier, tables, rows):
        try:
            _check_rows(n, table, row, entries, "its timestep", label)
        except FxpassError as exc:
            return str(exc).removeprefix("fold_timesteps: ")
    return None


def _check_rows(node: Node, table: torch.Tensor, rows: torch.Tensor, entries, what: str, label: str = "row") -> None:
    where = source_of(node) or node.format_node()
    if table.shape != rows.shape:
        raise FxpassError(f"fold_timesteps: {where}: for a batch of {len(entries)} timesteps it has shape "
                          f"{tuple(table.shape)}, not one row per timestep {tuple(rows.shape)}")
    if not table.is_floating_point():
        bad = (table != rows).reshape(len(table), -1).any(dim=1) if table.ndim else (table != rows).reshape(1)
    else:
        scale = float(rows.abs().max()) if rows.numel() else 0.0
        diff = (table.double() - rows.double()).abs()
        bound = ROW_ATOL * (scale or 1.0) + ROW_RTOL * rows.double().abs()
        bad = ~(diff <= bound)
        bad = bad.reshape(len(table), -1).any(dim=1) if table.ndim else bad.reshape(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        if table.is_floating_point():
            worst = float((table[i].double() - rows[i].double()).abs().max())
            size = float(rows[i].abs().max()) or 1.0
            off = f" (off by {worst / size:.3g} of the row's max)"
        else:
            off = ""
        raise FxpassError(f"fold_timesteps: {where}: {label} {i} (timestep {entries[i]}) of the batched timestep "
                          f"path differs from {what} evaluated alone{off}")


def _as_tensor(value, node: Node) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    raise FxpassError(f"fold_timesteps: cone output {node.name} is a {type(value).__name__}, not a tensor")
