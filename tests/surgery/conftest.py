"""Fixtures for the surgery tests: cached torch exports (tests may import torch; surgery/ may not)."""

from __future__ import annotations

import warnings

import onnx
import pytest


@pytest.fixture(scope="session")
def torch_export():
    """``export(key, make_module, args, opset, dynamic_batch=False) -> (ModelProto, torch outputs)``, cached."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    cache: dict = {}

    def export(key, make_module, args, opset=18, dynamic_batch=False):
        if key not in cache:
            torch.manual_seed(0)
            module = make_module().eval()
            kwargs = {}
            if dynamic_batch:
                batch = torch.export.Dim("batch")
                kwargs["dynamic_shapes"] = tuple({0: batch} for _ in args)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, verbose=False, **kwargs)
            with torch.no_grad():
                expected = module(*args)
            cache[key] = (program.model_proto, expected.numpy())
        model, expected = cache[key]
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, expected

    return export


TINY_UNET = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="16", num_heads=2)


@pytest.fixture(scope="session")
def tiny_unet(torch_export):
    """A whole small U-Net exported at opset 18: ``(ModelProto, feeds, torch output)``.

    ``UNetModel.forward`` reads ``timesteps[0].item()`` (the export cannot trace that), so the model is
    the benchmark's hand-patched copy (``bench.naive.NaiveUNetModel``: the same computation without it).
    """
    import torch

    from bench.naive import NaiveUNetModel
    from fxpass.config import CAMUS, build_model

    def make():
        model = NaiveUNetModel.from_model(build_model(CAMUS.replace(**TINY_UNET)))
        with torch.no_grad():
            for p in model.parameters():  # random weights: the zero-initialised convs would hide errors
                p.copy_(torch.randn_like(p) * 0.05)
        return model

    x = torch.randn(1, 3, 32, 32)
    t = torch.tensor([37.0])
    model, expected = torch_export("tiny_unet", make, (x, t), opset=18)
    return model, {"x": x.numpy(), "timesteps": t.numpy()}, expected
