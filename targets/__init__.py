"""Runtimes behind Polygraphy: ONNX Runtime, TensorRT (optional), the eager PyTorch reference.

Nothing here knows about torch.fx.  TensorRT is imported lazily, only from ``targets/trt.py``.
"""
