"""fx passes, one per file, each ``name(gm, ...) -> torch.fx.passes.infra.pass_base.PassResult``.

``DEFAULT_ORDER`` is the order ``fxpass.rewrite`` runs them in under torch.fx's ``PassManager``.
"""

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
    "DEFAULT_ORDER",
    "FoldTimesteps",
    "fold_timesteps",
    "materialize_attention_scales",
    "remove_identities",
    "remove_noop_casts",
    "strip_asserts",
]
