"""The naive route fxpass is measured against: the model with its ``.item()`` check deleted by hand,
exported with ``torch.onnx.export(model, (x, t), dynamo=True)`` at default settings.

This is what the seed report calls the "hand-patched copy": the only edit a user would have to make
for the dynamo exporter to go through.  Everything else (asserts, the attention scale arithmetic,
the time-embedding MLP evaluated per call) stays as the upstream code has it.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from fxpass.models.layers import timestep_embedding
from fxpass.models.unet import UNetModel


class NaiveUNetModel(UNetModel):
    """``UNetModel`` whose forward is the upstream one without the ``timesteps[0].item()`` check."""

    def forward(self, x, timesteps, y=None, gt=None, **kwargs):
        hs = []
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))

        if self.num_classes is not None:
            assert y.shape == (x.shape[0],)
            emb = emb + self.label_emb(y)

        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb)
        h = h.type(x.dtype)
        return self.out(h)

    @classmethod
    def from_model(cls, model: UNetModel) -> "NaiveUNetModel":
        """A copy of ``model`` (same weights, same submodules) with the patched forward."""
        if not isinstance(model, UNetModel):
            raise TypeError(f"expected fxpass.models.unet.UNetModel, got {type(model).__name__}")
        patched = copy.deepcopy(model)
        patched.__class__ = cls
        return patched.eval()


def export_naive(model: UNetModel, args: tuple, *, quiet: bool = True) -> tuple[Any, float]:
    """``torch.onnx.export(NaiveUNetModel, args, dynamo=True)`` → (ModelProto, seconds).

    Default opset and settings; ``quiet`` only silences the exporter's progress prints and warnings.
    """
    from fxpass.export import quiet_exporter

    naive = NaiveUNetModel.from_model(model)
    start = time.perf_counter()
    if quiet:
        with quiet_exporter():
            program = torch.onnx.export(naive, args, dynamo=True)
    else:
        program = torch.onnx.export(naive, args, dynamo=True)
    seconds = time.perf_counter() - start
    return program.model_proto, seconds
