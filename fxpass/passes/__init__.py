"""fx passes, one per file, each ``name(gm, ...) -> torch.fx.passes.infra.pass_base.PassResult``.

``DEFAULT_ORDER`` is the order ``fxpass.rewrite`` runs them in under torch.fx's ``PassManager``.
"""

from collections.abc import Sequence

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_manager import PassManager

from ..errors import FxpassError
from .fold_timesteps import FoldTimesteps, fold_timesteps
from .materialize_attention_scales import materialize_attention_scales
from .remove_identities import remove_identities
from .remove_noop_casts import remove_noop_casts
from .strip_asserts import strip_asserts

DEFAULT_ORDER = (
    "remove_identities",
    "remove_noop_casts",
    "fold_timesteps",
    "strip_asserts",
    "materialize_attention_scales",
)

__all__ = [
    "default_passes",
    "rewrite",
    "DEFAULT_ORDER",
    "FoldTimesteps",
    "fold_timesteps",
    "materialize_attention_scales",
    "remove_identities",
    "remove_noop_casts",
    "strip_asserts",
]


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
