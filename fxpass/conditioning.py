"""Sequence-shaped conditioning inputs (cross-attention): what fxpass can say about their shape.

diffusers' ``UNet2DConditionModel`` takes ``encoder_hidden_states`` [B, L, D] and MONAI's
``DiffusionModelUNet(with_conditioning=True)`` a ``context`` [B, L, D]; D is the model's cross-attention
width (``config.cross_attention_dim``, a block's ``cross_attention_dim``, or a cross-attention block's key
projection's input features), L the sequence length, which only the user knows (77 for CLIP text, 1 for a
class embedding): fxpass never picks one, it says which ``--input`` to pass with D filled in.
"""

from __future__ import annotations

import torch

#: forward parameters that carry a cross-attention sequence
SEQUENCE_NAMES = ("encoder_hidden_states", "context", "text_embeds", "cross_attention_states")


def cross_attention_dim(model: torch.nn.Module) -> int | None:
    """D of the model's cross-attention keys, or None where it has no cross-attention."""
    value = getattr(getattr(model, "config", None), "cross_attention_dim", None)
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    for module in model.modules():
        value = vars(module).get("cross_attention_dim")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        key = getattr(module, "to_k", None)
        if "Cross" in type(module).__name__ and isinstance(key, torch.nn.Linear):
            return int(key.in_features)
    return None


def sequence_example(model: torch.nn.Module, name: str, batch: int) -> str | None:
    """``--input NAME=B,L,D (L its sequence length)`` for a cross-attention input, D filled in; None otherwise."""
    if name not in SEQUENCE_NAMES:
        return None
    dim = cross_attention_dim(model)
    return (f"--input {name}={batch},L,{dim if dim else 'D'} (L its sequence length, e.g. 77 for CLIP text, 1 for "
            f"one embedding{'' if dim else '; D its width'})")
