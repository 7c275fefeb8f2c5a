"""Runtimes behind Polygraphy: ONNX Runtime, TensorRT (optional), OpenVINO (optional), the eager PyTorch reference.

Nothing here knows about torch.fx.  TensorRT is imported lazily, only from ``targets/trt.py``; OpenVINO
likewise, only from ``targets/openvino.py``.
"""
