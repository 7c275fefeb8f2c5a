"""The load stage: a checkpoint into the module it belongs to (fxpass's U-Net or a user's class), and the
config a user's class gets its image size from.  ``check``, ``golden`` and ``inspect`` load the same way."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import FxpassError


def load(checkpoint: str | Path, *, config: ModelConfig, model_class: str | None = None,
         model_kwargs: str | None = None, trust_pickle: bool = False, allow_nonfinite: bool = False,
         model_factory: str | None = None) -> torch.nn.Module:
    """fxpass's U-Net for ``config``, ``model_class`` (``pkg.mod:Class``) or what ``model_factory``
    (``pkg.mod:function``) returns, weights from ``checkpoint``, float32, eval mode; weights with
    NaN/Inf are refused unless ``allow_nonfinite``."""
    from .capture import quiet_loggers

    # a library the model imports may log notices through torch's loggers (torchao's pytree
    # registrations when diffusers imports it): not the user's concern
    with quiet_loggers("torch.utils._pytree"):
        return _load(checkpoint, config=config, model_class=model_class, model_kwargs=model_kwargs,
                     trust_pickle=trust_pickle, allow_nonfinite=allow_nonfinite, model_factory=model_factory)


def _load(checkpoint, *, config, model_class, model_kwargs, trust_pickle, allow_nonfinite, model_factory):
    from .library import load_folder, model_folder

    folder = model_folder(checkpoint)
    if folder is not None:  # a diffusers model folder: the class and its arguments are in its config.json
        if model_class or model_factory or model_kwargs:
            raise FxpassError(f"{checkpoint}: a diffusers model folder names its own class; drop "
                              "--model-class / --model-factory / --model-kwargs")
        return load_folder(folder, allow_nonfinite=allow_nonfinite)
    if model_class and model_factory:
        raise FxpassError("give --model-class or --model-factory, not both")
    if model_class or model_factory:
        from .user_model import load_user_model

        return load_user_model(model_class or model_factory, model_kwargs, Path(checkpoint), trust_pickle,
                               allow_nonfinite=allow_nonfinite, factory=bool(model_factory))
    if model_kwargs:
        raise FxpassError("--model-kwargs needs --model-class or --model-factory")
    from .checkpoint import load_model

    return load_model(checkpoint, config, trust_pickle=trust_pickle, allow_nonfinite=allow_nonfinite)


def sized_config(config: ModelConfig | None, model) -> ModelConfig | None:
    """A user class's config without an image size (``image_size`` 0, see
    :func:`fxpass.config.user_class_config`) takes the model's ``image_size`` attribute."""
    if config is None or config.image_size != 0:
        return config
    size = model_image_size(model)
    if size is None:
        raise FxpassError(f"{type(model).__name__}: image size unknown (the model has no image_size attribute, nor a "
                          "config.sample_size as diffusers models have); pass --image-size N or --config FILE")
    return dataclasses.replace(config, image_size=size)


def model_image_size(model) -> int | None:
    """The side of the square images the model takes, by its attributes: ``image_size`` (guided-diffusion),
    ``sample_size`` or ``config.sample_size`` (diffusers; a square pair too), ``img_size``."""
    from .library import square_side

    config = getattr(model, "config", None)
    sizes = (getattr(model, "image_size", None), getattr(model, "sample_size", None),
             getattr(config, "sample_size", None), getattr(model, "img_size", None))
    return next((side for side in map(square_side, sizes) if side is not None), None)
