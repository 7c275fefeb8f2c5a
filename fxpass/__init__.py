"""fxpass: lower guided-diffusion / RePaint U-Nets to ONNX through torch.fx rewrites."""

__version__ = "0.1.0"

from .checkpoint import init_model, load_model, save_checkpoint  # noqa: E402
from .config import CAMUS, ModelConfig, build_model, load_config  # noqa: E402
from .errors import FxpassError  # noqa: E402

__all__ = [
    "CAMUS", "FxpassError", "ModelConfig", "build_model", "init_model", "load_config", "load_model",
    "save_checkpoint", "__version__",
]
