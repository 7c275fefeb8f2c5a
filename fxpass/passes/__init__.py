"""fx passes, one per file, each ``name(gm, ...) -> torch.fx.passes.infra.pass_base.PassResult``.

``PASSES`` is the one table of the default pipeline, in the order ``fxpass.rewrite`` runs it under
torch.fx's ``PassManager``: each entry names the pass and builds it from the run's settings
(timesteps to fold, dynamic batch); an entry whose ``when`` is false is left out.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch.fx import GraphModule
from torch.fx.passes.infra.pass_manager import PassManager

from ..errors import FxpassError
from .fold_timesteps import FoldTimesteps, fold_timesteps
from .materialize_attention_scales import materialize_attention_scales
from .merge_timestep_tables import merge_timestep_tables
from .remove_identities import remove_identities
from .remove_noop_casts import remove_noop_casts
from .strip_asserts import check_no_guards_left, describe_leftover_guards, strip_asserts

__all__ = [
    "PASSES",
    "FxPass",
    "Settings",
    "default_passes",
    "rewrite",
    "FoldTimesteps",
    "fold_timesteps",
    "materialize_attention_scales",
    "merge_timestep_tables",
    "remove_identities",
    "remove_noop_casts",
    "strip_asserts",
    "check_no_guards_left",
    "describe_leftover_guards",
]


@dataclass(frozen=True)
class Settings:
    """What a run of the default passes is for: the timesteps to fold (None: keep the timestep input)
    and whether the batch dimension will be dynamic in the export."""

    timesteps: int | float | Sequence[int | float] | None = None
    dynamic_batch: bool = False


@dataclass(frozen=True)
class FxPass:
    name: str
    build: Callable[[Settings], Callable]
    when: Callable[[Settings], bool] = lambda settings: True


PASSES = (
    FxPass("remove_identities", lambda s: remove_identities),
    FxPass("remove_noop_casts", lambda s: remove_noop_casts),
    FxPass("fold_timesteps", lambda s: FoldTimesteps(s.timesteps, dynamic_batch=s.dynamic_batch),
           when=lambda s: s.timesteps is not None),
    FxPass("strip_asserts", lambda s: strip_asserts),
    FxPass("materialize_attention_scales", lambda s: materialize_attention_scales),
)


def default_passes(timesteps: int | float | Sequence[int | float] | None, *, dynamic_batch: bool = False):
    """The passes of ``PASSES`` for these settings, built; without ``timesteps`` the timestep input
    stays.  ``dynamic_batch``: the graph will be exported with a free batch dimension, so no pass may
    take a decision on the captured batch size for a fact."""
    settings = Settings(timesteps, dynamic_batch)
    return [entry.build(settings) for entry in PASSES if entry.when(settings)]


def rewrite(gm: GraphModule, timesteps: int | float | Sequence[int | float] | None = None, *,
            dynamic_batch: bool = False) -> GraphModule:
    """Run the default passes on a captured graph: identities and no-op casts out, timesteps folded
    (an int: fixed; a sequence: gathered tables with input ``t_index``), asserts stripped,
    attention scales folded into the qkv projections.  Returns the rewritten GraphModule; the
    per-pass rewrite counts are in ``gm.meta["fxpass_rewrites"]``.

    ``dynamic_batch=True`` when the result is exported with a dynamic batch: it is recorded in
    ``gm.meta["fxpass_dynamic_batch"]`` and every pass then keeps what depends on the batch size (a
    guard on ``x.shape[0]`` stays, and ``check_no_guards_left`` refuses the model).  Guards and asserts
    that no pass could prove stay in the graph: call ``check_no_guards_left(gm)`` before exporting.
    """
    gm.meta["fxpass_dynamic_batch"] = bool(dynamic_batch)
    manager = PassManager(passes=default_passes(timesteps, dynamic_batch=dynamic_batch), steps=1)
    try:
        result = manager(gm)
    except Exception as exc:  # PassManager wraps errors; show ours as they are
        cause = exc.__cause__
        if isinstance(cause, FxpassError):
            raise cause from None
        raise
    return result.graph_module
