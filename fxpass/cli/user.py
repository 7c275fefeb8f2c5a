"""The user-class flags (:func:`fxpass.cli.args.add_model_class` and ``add_user_schedule``) as the
commands that load a PyTorch model read them: ``check``, ``golden`` and ``inspect`` take what
``lower`` takes, so a model lowered from ``--model-class`` can be checked, get a golden set and be
inspected with the same command-line flags.

Where a lowered model is at hand (``check``, ``golden --onnx``) its metadata holds the schedule and
its graph the inputs' shapes; schedule flags given as well must agree with it (so the ``lower``
command's flags can be reused as they are).
"""

from __future__ import annotations

from ..errors import FxpassError

#: the flags that describe a user's class, by argparse destination
_USER_FLAGS = (("--model-kwargs", "model_kwargs"), ("--timestep-input", "timestep_input"), ("--input", "inputs"),
               ("--diffusion-steps", "diffusion_steps"), ("--timestep-respacing", "timestep_respacing"),
               ("--image-size", "image_size"), ("--model-output", "model_output"))


def user_spec(args) -> str | None:
    """``pkg.mod:Class`` of ``--model-class`` / ``--model-factory`` (None for fxpass's own U-Net);
    the flags that describe a user's class are refused without one."""
    if args.model_class and args.model_factory:
        raise FxpassError("give --model-class or --model-factory, not both")
    from ..library import class_name, model_folder

    folder = model_folder(getattr(args, "model", None))
    if folder is not None and not (args.model_class or args.model_factory):
        return f"diffusers:{class_name(folder)}"  # a diffusers model folder: the class its config.json names
    user = args.model_class or args.model_factory
    if user:
        return user
    given = [flag for flag, dest in _USER_FLAGS if getattr(args, dest, None)]
    if getattr(args, "timestep_values", "index") != "index":
        given.append("--timestep-values")
    if given:
        verb = "describes" if len(given) == 1 else "describe"
        raise FxpassError(f"{', '.join(given)} {verb} your own class: {'it needs' if len(given) == 1 else 'they need'} "
                          "--model-class (or --model-factory)")
    return None


def flag_of(args) -> str:
    return f"--model-class {args.model_class}" if args.model_class else f"--model-factory {args.model_factory}"


def schedule_config(args, user: str):
    """A user class's config from ``--config`` and/or the schedule flags, as ``lower`` builds it
    (``image_size`` 0: the model's ``image_size`` attribute, see :func:`sized`)."""
    from ..config import user_class_config
    from ..library import folder_config, model_folder

    folder = model_folder(getattr(args, "model", None))
    if folder is not None and not args.config:
        return folder_config(folder, timestep_respacing=args.timestep_respacing, image_size=args.image_size,
                             diffusion_steps=args.diffusion_steps)
    return user_class_config(args.config, diffusion_steps=args.diffusion_steps,
                             timestep_respacing=args.timestep_respacing, image_size=args.image_size,
                             spec=flag_of(args), model_class=user)


def sized(cfg, model):
    """``cfg`` with the model's ``image_size`` attribute where it has no size of its own."""
    from ..load import sized_config

    return sized_config(cfg, model)


def agree_with_lowered(args, info) -> None:
    """Schedule flags given with a lowered model must say what its metadata says (one line naming the
    file and the setting where they differ)."""
    config = info.config or {}
    x_size = info.inputs["x"][1][-1] if "x" in info.inputs else None
    for flag, key, given, lowered in (
            ("--diffusion-steps", "diffusion_steps", args.diffusion_steps, config.get("diffusion_steps")),
            ("--timestep-respacing", "timestep_respacing", args.timestep_respacing, config.get("timestep_respacing")),
            ("--image-size", "image_size", args.image_size, x_size)):
        if given is not None and lowered is not None and str(given) != str(lowered):
            raise FxpassError(f"{flag} {given}: {info.path} was lowered with {key} {lowered}")
    if args.timestep_values != "index" and config:
        import numpy as np

        from ..diffusion import noise_levels

        expected = noise_levels(config, info.timesteps, args.timestep_values)
        if not np.allclose(np.asarray(info.model_timesteps, dtype=np.float64), expected, rtol=1e-6, atol=0.0):
            raise FxpassError(f"--timestep-values {args.timestep_values}: {info.path} was lowered with other "
                              "timestep values (its schedule table does not hold the noise levels "
                              f"{args.timestep_values} gives)")


def wrapped_for_graph(model, args, info):
    """The user's model called as it was lowered: the graph's inputs (x and the extras), then
    ``--input`` / ``--timestep-input`` (see :func:`fxpass.signature.plan_for_graph`)."""
    from ..signature import plan_for_graph, wrap

    return wrap(model, plan_for_graph(model, info, timestep_input=args.timestep_input, inputs=args.inputs,
                                      output=getattr(args, "model_output", None)))
