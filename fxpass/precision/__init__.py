"""The precision stage: float16 with float32 islands, bf16, int8 with a measured precision plan.

``fp16`` converts the graph (``surgery.convert_precision``); ``bf16`` keeps the float32 file and marks
it for bf16 inference (OpenVINO's precision hint on CPUs with AVX-512 BF16 or AMX); ``int8`` is
static W8A8 made by ONNX Runtime's quantization tooling with timestep-aware calibration and the
fewest float layers that keep the eps-MSE within a budget (:mod:`fxpass.precision.int8`).
"""

from .int8 import Int8Options, quantize_int8
from .layers import Layer, layers_of
from .plan import PrecisionPlan

__all__ = ["Int8Options", "Layer", "PrecisionPlan", "layers_of", "quantize_int8"]
