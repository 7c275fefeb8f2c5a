"""A small trained reference model for fidelity measurements (issue #14).

fxpass's guided-diffusion U-Net (``digits.yml``: 32x32 RGB, learn_sigma, scale-shift norm,
attention at 16x16 and 8x8) trained on scikit-learn's bundled 8x8 handwritten digits.

* :mod:`fxpass.reference.data`: the fixed train / held-out split and image loading;
* :mod:`fxpass.reference.losses`: the hybrid training objective (torch);
* :mod:`fxpass.reference.train`: ``python -m fxpass.reference.train --out PATH``;
* :mod:`fxpass.reference.evaluate`: ``python -m fxpass.reference.evaluate``.

Load the model with
``fxpass.checkpoint.load_model(CHECKPOINT, config=CONFIG)``.
scikit-learn is needed for the data (and the evaluation's classifier); torch for training.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "digits.yml"
CHECKPOINT = HERE / "digits.pt"
HELDOUT_DIR = HERE / "heldout"
SPLIT_JSON = HERE / "split.json"

__all__ = ["CHECKPOINT", "CONFIG", "HELDOUT_DIR", "SPLIT_JSON"]
