"""Example inputs for any guided-diffusion-family model, inferred from its ``forward`` signature.

fxpass's own U-Net takes ``(x, timesteps[, y])``; users' classes take ``(x, timesteps, low_res=None,
**kwargs)`` (guided-diffusion's SuperResModel), ``(y_cond_and_noisy, gammas)`` (Palette/SR3 style, a
continuous noise level), a 5-channel or 3-D ``x``, labels from their own class count.  :func:`plan`
reads what is needed from the model itself:

- ``x``: the first parameter of ``forward``; its channels and rank from the model's first
  convolution (``in_channels`` less the channels of the other image inputs that are concatenated
  to it, as SuperResModel does; ``Conv3d`` gives a 5-D ``x``) and the image size;
- the timestep: ``--timestep-input NAME`` or the first parameter named as in :data:`TIMESTEP_NAMES`;
  one named as in :data:`CONTINUOUS_NAMES` carries a float noise level (float32 example);
- ``y``: when the model is class-conditional (``num_classes`` or a ``label_emb`` embedding), labels
  drawn from its own class count;
- other required parameters, and optional ones named by ``--input NAME=SHAPE[:dtype]``: the given
  shape (an ``x`` given there overrides the inferred one).

:func:`wrap` puts an adapter with the standard names in front when the model's names differ
(``x``, ``timesteps``, then the rest by their own names), so the lowered graph has inputs ``x``,
``t_index`` and the extras, and the reference runner feeds the eager model the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .errors import FxpassError

#: parameter names taken for the timestep, in this order
TIMESTEP_NAMES = ("timesteps", "timestep", "t", "time", "ts", "time_step", "noise_level", "noise_levels",
                  "gammas", "gamma", "sigma", "sigmas", "continuous_sqrt_alpha_cumprod", "log_snr")
#: of those, the ones that carry a continuous noise level (fed as float32)
CONTINUOUS_NAMES = frozenset({"noise_level", "noise_levels", "gammas", "gamma", "sigma", "sigmas",
                              "continuous_sqrt_alpha_cumprod", "log_snr"})
LABEL_NAMES = ("y", "class_labels", "labels")
_DTYPES = {"float32": torch.float32, "float": torch.float32, "float64": torch.float64, "int64": torch.int64,
           "long": torch.int64, "int32": torch.int32}


@dataclass
class Plan:
    """How the model is called: its x and timestep parameter names, the timestep dtype, the extra
    inputs (name → example tensor) and the class count for label draws."""

    x_name: str
    t_name: str
    t_dtype: torch.dtype
    x: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    num_classes: int | None = None
    #: optional parameters of forward left at their defaults (named in a capture failure's message)
    omitted: tuple[str, ...] = ()

    @property
    def continuous(self) -> bool:
        return self.t_dtype.is_floating_point

    @property
    def standard(self) -> bool:
        return self.x_name == "x" and self.t_name == "timesteps" and not self.continuous

    def example_inputs(self, first_timestep) -> dict[str, torch.Tensor]:
        """Inputs by the names the (wrapped) model takes: x, timesteps, then the extras."""
        t = torch.full((self.x.shape[0],), first_timestep, dtype=self.t_dtype if self.continuous else
                       (torch.float32 if isinstance(first_timestep, float) and not float(first_timestep).is_integer()
                        else torch.int64))
        return {"x": self.x, "timesteps": t, **self.extras}


def parse_input(text: str) -> tuple[str, tuple[int, ...], torch.dtype]:
    """``NAME=D0,D1,...[:dtype]`` (``--input low_res=1,3,16,16``)."""
    name, eq, rest = text.partition("=")
    shape_text, _, dtype_text = rest.partition(":")
    try:
        shape = tuple(int(d) for d in shape_text.split(","))
    except ValueError:
        shape = ()
    if not eq or not name.isidentifier() or not shape or any(d < 1 for d in shape):
        raise FxpassError(f"--input {text}: expected NAME=SHAPE[:dtype], e.g. low_res=1,3,16,16")
    dtype = _DTYPES.get(dtype_text or "float32")
    if dtype is None:
        raise FxpassError(f"--input {text}: dtype {dtype_text!r} is not one of {', '.join(sorted(_DTYPES))}")
    return name, shape, dtype


def first_conv(model: torch.nn.Module) -> torch.nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))),
                None)


def class_count(model: torch.nn.Module) -> int | None:
    """The model's own class count: ``num_classes``, else the size of a ``label_emb`` embedding."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    emb = getattr(model, "label_emb", None)
    if isinstance(emb, torch.nn.Embedding):
        return int(emb.num_embeddings)
    return None


def plan(model: torch.nn.Module, *, image_size: int | None, timestep_input: str | None = None,
         inputs: Sequence[str] | Mapping[str, tuple] = (), batch: int = 1, seed: int = 0) -> Plan:
    """Infer how to call ``model`` (see the module docstring); refuses in one line what it cannot infer."""
    cls = type(model).__name__
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    names = [p.name for p in params]
    if not params:
        raise FxpassError(f"{cls}.forward takes no named inputs")
    given: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for item in (inputs.items() if isinstance(inputs, Mapping) else inputs):
        name, shape, dtype = parse_input(item) if isinstance(item, str) else (item[0], *item[1])
        given[name] = (tuple(shape), dtype)
    x_name = names[0]
    if timestep_input is not None:
        if timestep_input not in names:
            raise FxpassError(f"--timestep-input {timestep_input}: {cls}.forward has no such parameter "
                              f"(it takes {', '.join(names)})")
        t_name = timestep_input
    else:
        t_name = next((n for n in TIMESTEP_NAMES if n in names[1:]), None)
        if t_name is None:
            raise FxpassError(f"{cls}.forward({', '.join(names)}): no timestep input found (looked for "
                              f"{', '.join(TIMESTEP_NAMES)}); name it with --timestep-input NAME")
    unknown = [n for n in given if n not in names and n not in ("x", names[0])]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values()):
        raise FxpassError(f"--input {unknown[0]}: {cls}.forward has no such parameter (it takes {', '.join(names)})")
    gen = torch.Generator().manual_seed(seed)
    extras: dict[str, torch.Tensor] = {}
    omitted: list[str] = []
    n_classes = class_count(model)
    for p in params[1:]:
        if p.name == t_name:
            continue
        if p.name in given:
            shape, dtype = given[p.name]
            extras[p.name] = (torch.randn(shape, generator=gen) if dtype.is_floating_point
                              else torch.zeros(shape, dtype=dtype))
        elif p.name in LABEL_NAMES and n_classes is not None:
            extras[p.name] = torch.zeros(batch, dtype=torch.int64)
        elif p.default is inspect.Parameter.empty:
            raise FxpassError(f"{cls}.forward needs '{p.name}', which fxpass cannot infer; give its shape with "
                              f"--input {p.name}=SHAPE (e.g. --input {p.name}=1,3,16,16)")
        else:
            omitted.append(p.name)
    for n, (shape, dtype) in given.items():  # accepted through **kwargs
        if n not in names and n != "x":
            extras[n] = torch.randn(shape, generator=gen) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    if x_name in given or "x" in given:
        shape, _ = given.get(x_name) or given["x"]
    else:
        conv = first_conv(model)
        if conv is None:
            raise FxpassError(f"{cls}: no convolution to read the input channels from; give --input {x_name}=SHAPE")
        dims = conv.weight.dim() - 2
        if not image_size:
            raise FxpassError(f"{cls}: image size unknown; pass --image-size N (or --config FILE)")
        channels = conv.in_channels - sum(int(v.shape[1]) for v in extras.values()
                                          if v.is_floating_point() and v.dim() == dims + 2)
        if channels < 1:
            raise FxpassError(f"{cls}: the first convolution takes {conv.in_channels} channels, no more than the "
                              f"other inputs carry; give --input {x_name}=SHAPE")
        shape = (batch, channels, *([image_size] * dims))
    t_dtype = torch.float32 if t_name in CONTINUOUS_NAMES else torch.int64
    return Plan(x_name, t_name, t_dtype, torch.randn(shape, generator=gen), extras, n_classes, tuple(omitted))


class Adapter(torch.nn.Module):
    """``forward(x, timesteps, <extras>)`` in front of a model whose parameters are named otherwise (or
    whose timestep is a float noise level: the schedule's values are cast to it)."""

    def __init__(self, model: torch.nn.Module, p: Plan):
        super().__init__()
        self.model = model
        self.x_name, self.t_name, self.t_dtype = p.x_name, p.t_name, p.t_dtype
        self.num_classes = p.num_classes
        self.cast = p.continuous  # the schedule's values as the float noise level the model takes

    def forward(self, x, timesteps, **extras):
        if self.cast:
            timesteps = timesteps.to(self.t_dtype)
        return self.model(**{self.x_name: x, self.t_name: timesteps}, **extras)


def wrap(model: torch.nn.Module, p: Plan) -> torch.nn.Module:
    """``model`` itself when it already takes ``(x, timesteps, ...)``; else an :class:`Adapter` whose
    ``forward`` signature names x, timesteps and the plan's extras (what capture binds to)."""
    if p.standard and (p.num_classes is None or getattr(model, "num_classes", None) == p.num_classes):
        return model  # else the adapter carries the class count the label draws and the reference read
    names = ["x", "timesteps", *p.extras]
    sig = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
                            + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 default=None if k >= 2 else inspect.Parameter.empty)
                               for k, n in enumerate(names)]
                            + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])

    def forward(self, x, timesteps, **extras):
        return Adapter.forward(self, x, timesteps, **extras)

    forward.__signature__ = sig
    cls = type(f"{type(model).__name__}Inputs", (Adapter,), {"forward": forward})
    return cls(model, p).eval()


def plan_for_graph(model: torch.nn.Module, info, *, timestep_input: str | None = None,
                   inputs: Sequence[str] = ()) -> Plan:
    """The plan of a model that was lowered to ``info`` (an :class:`~fxpass.metadata.OnnxInfo`): its
    graph inputs' shapes (x and the extras; t_index is the timestep), then ``--input`` overrides."""
    np_to_torch = {"float32": torch.float32, "float16": torch.float32, "float64": torch.float64,
                   "int64": torch.int64, "int32": torch.int32}
    given: dict[str, tuple] = {}
    for name, (dtype, shape) in info.inputs.items():
        if name == "t_index":
            continue
        given[name] = (tuple(d if d > 0 else 1 for d in shape), np_to_torch.get(dtype, torch.float32))
    for item in inputs:
        name, shape, dtype = parse_input(item)
        given[name] = (shape, dtype)
    x = given.get("x")
    return plan(model, image_size=x[0][-1] if x else None, timestep_input=timestep_input, inputs=given)
