"""``rewrite``: the default ordered list of fx passes under torch.fx's PassManager."""

from __future__ import annotations

from collections.abc import Sequence

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_manager import PassManager

from .errors import FxpassError
from .passes import (
    FoldTimesteps,
    materialize_attention_scales,
    remove_identities,
    remove_noop_casts,
    strip_asserts,
)


def default_passes(timesteps: int | float | Sequence[int | float] | None):
    """The default pass list; without ``timesteps`` the timestep input stays."""
    passes = [remove_identities, remove_noop_casts]
    if timesteps is not None:
        passes.append(FoldTimesteps(timesteps))
    passes += [strip_asserts, materialize_attention_scales]
    return passes


def rewrite(gm: GraphModule, timesteps: int | float | Sequence[int | float] | None = None) -> GraphModule:
    """Run the default passes on a captured graph: identities and no-op casts out, timesteps folded
    (an int: fixed; a sequence: gathered tables with input ``t_index``), asserts stripped,
    attention scales folded into the qkv projections.  Returns the rewritten GraphModule; the
    per-pass rewrite counts are in ``gm.meta["fxpass_rewrites"]``.
    """
    manager = PassManager(passes=default_passes(timesteps), steps=1)
    try:
        result = manager(gm)
    except Exception as exc:  # PassManager wraps errors; show ours as they are
        cause = exc.__cause__
        if isinstance(cause, FxpassError):
            raise cause from None
        raise
    return result.graph_module
