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
- other image-like inputs (``low_res``, a conditioning image): ``--input NAME=SHAPE[:dtype]`` where
  given (an ``x`` given there overrides the inferred one), else the model's own attributes
  (:func:`input_attributes`): ``NAME_shape``, ``NAME_size`` / ``NAME_image_size`` /
  ``NAME_resolution`` and ``NAME_channels`` / ``NAME_in_channels``; for a low-resolution input also
  ``low_res_size`` / ``lowres_size`` / ``small_size`` and ``low_res_channels`` / ``lowres_channels``.
  Channels no attribute gives are the first convolution's ``in_channels`` less x's (and the other
  inputs'); a low-resolution input with neither x's nor its own channels known has x's channels, as
  SuperResModel builds its first convolution for ``in_channels * 2``.  A spatial size no attribute
  gives is x's, except for a low-resolution input (refused, naming the attributes looked for).  A
  required input none of this describes is refused in one line saying how to give it; an optional
  one is left at its default (named if capture then fails).

:func:`wrap` puts an adapter with the standard names in front when the model's names differ
(``x``, ``timesteps``, then the rest by their own names), so the lowered graph has inputs ``x``,
``t_index`` and the extras, and the reference runner feeds the eager model the same way.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .adapter import Adapter, wrap  # noqa: F401  (fxpass.signature.wrap: the model called as planned)
from .conditioning import sequence_example
from .errors import FxpassError
from .limits import check_input_fits

#: parameter names taken for the timestep, in this order
TIMESTEP_NAMES = ("timesteps", "timestep", "t", "time", "ts", "time_step", "noise_level", "noise_levels",
                  "gammas", "gamma", "sigma", "sigmas", "continuous_sqrt_alpha_cumprod", "log_snr")
#: of those, the ones that carry a continuous noise level (fed as float32)
CONTINUOUS_NAMES = frozenset({"noise_level", "noise_levels", "gammas", "gamma", "sigma", "sigmas",
                              "continuous_sqrt_alpha_cumprod", "log_snr"})
LABEL_NAMES = ("y", "class_labels", "labels")
#: model attributes that give a low-resolution input's spatial size / channels, besides NAME_size /
#: NAME_channels (guided-diffusion's scripts call the low resolution ``small_size``)
LOW_RES_SIZE_ATTRS = ("low_res_size", "lowres_size", "small_size", "low_res_image_size", "lowres_image_size")
LOW_RES_CHANNEL_ATTRS = ("low_res_channels", "lowres_channels")
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
    #: where each input's shape came from ("--input", "model.small_size, channels as x's (…)", ...)
    origins: dict[str, str] = field(default_factory=dict)
    #: the output to take where forward returns several (``--model-output``; None: fxpass.outputs' rule)
    output: str | None = None

    @property
    def continuous(self) -> bool:
        return self.t_name is not None and self.t_dtype.is_floating_point

    @property
    def standard(self) -> bool:
        return self.x_name == "x" and self.t_name in ("timesteps", None) and not self.continuous

    def example_inputs(self, first_timestep) -> dict[str, torch.Tensor]:
        """Inputs by the names the (wrapped) model takes: x, timesteps, then the extras (no timesteps for a
        model that takes none)."""
        if self.t_name is None:
            return {"x": self.x, **self.extras}
        t = torch.full((self.x.shape[0],), first_timestep, dtype=self.t_dtype if self.continuous else
                       (torch.float32 if isinstance(first_timestep, float) and not float(first_timestep).is_integer()
                        else torch.int64))
        return {"x": self.x, "timesteps": t, **self.extras}


def parse_input(text: str) -> tuple[str, tuple[int, ...], torch.dtype]:
    """``NAME=D0,D1,...[:dtype]`` (``--input low_res=1,3,16,16``)."""
    name, eq, rest = text.partition("=")
    shape_text, _, dtype_text = rest.partition(":")
    parts = shape_text.split(",")
    shape = tuple(int(d) for d in parts) if all(d.strip().isdigit() for d in parts) else ()
    if not eq or not name.isidentifier() or not 0 < len(shape) <= 8 or any(d < 1 for d in shape):
        raise FxpassError(f"--input {text[:80]}: expected NAME=SHAPE[:dtype], e.g. low_res=1,3,16,16")
    dtype = _DTYPES.get(dtype_text or "float32")
    if dtype is None:
        raise FxpassError(f"--input {name}: dtype {dtype_text[:40]!r} is not one of {', '.join(sorted(_DTYPES))}")
    check_input_fits(shape, f"input {name}", "--input", torch.empty((), dtype=dtype).element_size())
    return name, shape, dtype


def first_conv(model: torch.nn.Module) -> torch.nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))),
                None)


def class_count(model: torch.nn.Module) -> int | None:
    """The model's own class count: ``num_classes`` (or diffusers' / MONAI's ``num_class_embeds``, on the
    model or its ``config``), else the size of a ``label_emb`` / ``class_embedding`` embedding."""
    config = getattr(model, "config", None)
    for n in (getattr(model, "num_classes", None), getattr(config, "num_class_embeds", None),
              vars(model).get("num_class_embeds")):
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    for name in ("label_emb", "class_embedding"):
        emb = getattr(model, name, None)
        if isinstance(emb, torch.nn.Embedding):
            return int(emb.num_embeddings)
    return None


def is_low_res(name: str) -> bool:
    """A low-resolution conditioning input by its name (``low_res``, ``lowres_cond_img``, ``low_res_image``)."""
    return re.search(r"(^|_)low_?res", name.lower()) is not None


def input_attributes(name: str) -> dict[str, tuple[str, ...]]:
    """The model attributes read for the shape of the forward input ``name``, by what they give:
    ``shape`` (C, *spatial, or N, C, *spatial), ``size`` (an int or one per spatial dimension) and
    ``channels`` (an int); the first present with a usable value wins."""
    low = is_low_res(name)
    size = (f"{name}_size", f"{name}_image_size", f"{name}_resolution") + (LOW_RES_SIZE_ATTRS if low else ())
    channels = (f"{name}_channels", f"{name}_in_channels") + (LOW_RES_CHANNEL_ATTRS if low else ())
    return {"shape": (f"{name}_shape",), "size": tuple(dict.fromkeys(size)), "channels": tuple(dict.fromkeys(channels))}


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _ints(value) -> tuple[int, ...] | None:
    if isinstance(value, torch.Size):
        value = tuple(value)
    if isinstance(value, (tuple, list)) and value and all(_positive_int(v) for v in value):
        return tuple(int(v) for v in value)
    return None


@dataclass
class _Described:
    """What the model's attributes say about one input's shape (``None``: not said)."""

    channels: int | None = None
    spatial: tuple[int, ...] | None = None
    #: attribute names read, for the origin and messages
    read: list[str] = field(default_factory=list)
    size: object = None  # the size attribute's raw value: an int, or one per spatial dimension
    whole: bool = False  # ``size`` is a NAME_shape attribute's whole shape


def _describe(model: torch.nn.Module, name: str) -> _Described | None:
    """The input's shape as the model's attributes give it (:func:`input_attributes`), or None."""
    names = input_attributes(name)
    found = _Described()
    for attr in names["shape"]:
        shape = _ints(getattr(model, attr, None))
        if shape is not None:
            found.read.append(attr)
            found.size, found.whole = shape, True  # interpreted once x's rank is known
            return found
    for attr in names["size"]:
        value = getattr(model, attr, None)
        if _positive_int(value) or _ints(value) is not None:
            found.read.append(attr)
            found.size = int(value) if _positive_int(value) else _ints(value)
            break
    for attr in names["channels"]:
        value = getattr(model, attr, None)
        if _positive_int(value):
            found.read.append(attr)
            found.channels = int(value)
            break
    return found if found.read else None


def _example(name: str, batch: int, channels, spatial, dims: int = 2) -> str:
    """``--input NAME=...`` with what is known filled in, the rest as C / H,W placeholders (explained)."""
    placeholder = ",".join("DHW"[-dims:]) if dims <= 3 else ",".join(f"S{k}" for k in range(dims))
    size = ",".join(map(str, spatial)) if spatial else placeholder
    text = f"--input {name}={batch},{channels if channels else 'C'},{size}"
    missing = [w for w, gone in (("C its channels", not channels), (f"{placeholder} its size", not spatial)) if gone]
    return text + (f" ({', '.join(missing)})" if missing else "")


def plan(model: torch.nn.Module, *, image_size: int | None, timestep_input: str | None = None,
         inputs: Sequence[str] | Mapping[str, tuple] = (), batch: int = 1, seed: int = 0,
         output: str | None = None, plain: bool = False) -> Plan:
    """Infer how to call ``model`` (see the module docstring); refuses in one line what it cannot infer."""
    cls = type(model).__name__
    signature = inspect.signature(model.forward)
    params = [p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    names = [p.name for p in params]
    if not params:
        raise FxpassError(f"{cls}.forward takes no named inputs")
    given = _given_inputs(inputs)
    x_name = names[0]
    t_name = _plain(cls, names, timestep_input) if plain else _timestep_name(cls, names, timestep_input)
    unknown = [n for n in given if n not in names and n not in ("x", names[0])]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
        raise FxpassError(f"--input {unknown[0]}: {cls}.forward has no such parameter (it takes {', '.join(names)})")
    x_given = given.get(x_name) or given.get("x")
    conv = first_conv(model)
    dims = len(x_given[0]) - 2 if x_given else (conv.weight.dim() - 2 if conv is not None else 2)
    gen = torch.Generator().manual_seed(seed)

    def tensor(shape, dtype):
        return torch.randn(shape, generator=gen) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)

    n_classes = class_count(model)
    extras = _extra_inputs(model, params, t_name, given, n_classes, batch, dims)
    if not x_given:
        if conv is None:
            raise FxpassError(f"{cls}: no convolution to read the input channels from; give --input {x_name}=SHAPE")
        if not image_size:
            raise FxpassError(f"{cls}: image size unknown; pass --image-size N (or --config FILE)")
    _apply_sizes(cls, extras.described, batch, dims)
    total = conv.in_channels if conv is not None else None
    known = _fill_channels(cls, extras, x_given, total, batch, dims)
    if x_given:
        x_shape = tuple(x_given[0])
        extras.origins[x_name] = "--input"
    else:
        channels = total - known
        if channels < 1:
            raise FxpassError(f"{cls}: the first convolution takes {total} channels, no more than the "
                              f"other inputs carry; give --input {x_name}=SHAPE")
        x_shape = (batch, channels, *([image_size] * dims))
        less = f" less {known} of the other inputs" if known else ""
        extras.origins[x_name] = f"first convolution's {total} channels{less}, image size {image_size}"
    _fill_spatial(cls, extras, x_shape, batch, dims)
    extra_tensors = {n: tensor(*extras.fixed[n]) for n in extras.order}  # drawn before x, as they always were
    x = torch.randn(x_shape, generator=gen)
    t_dtype = torch.float32 if t_name in CONTINUOUS_NAMES else torch.int64
    return Plan(x_name, t_name, t_dtype, x, extra_tensors, n_classes, tuple(extras.omitted), extras.origins, output)


def _param_names(model: torch.nn.Module) -> list[str]:
    """``model.forward``'s named parameters (not ``*args`` / ``**kwargs``), in order."""
    return [p.name for p in inspect.signature(model.forward).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _named_timestep(names: list[str]) -> str | None:
    """The first parameter after x named as in :data:`TIMESTEP_NAMES`, or None."""
    return next((n for n in TIMESTEP_NAMES if n in names[1:]), None)


def takes_timestep(model: torch.nn.Module, timestep_input: str | None = None) -> bool:
    """Whether ``model.forward`` has a timestep parameter (``timestep_input``, or one named as a timestep)."""
    return timestep_input is not None or _named_timestep(_param_names(model)) is not None


def refuse_timestep(model: torch.nn.Module, timestep_input: str | None = None) -> None:
    """A model lowered with no schedule must take no timestep (refused in one line where it does)."""
    _plain(type(model).__name__, _param_names(model), timestep_input)


def _plain(cls: str, names: list[str], timestep_input: str | None) -> None:
    found = timestep_input or _named_timestep(names)
    if found is not None:
        raise FxpassError(f"{cls}.forward takes a timestep ('{found}'): fxpass needs the diffusion schedule of your "
                          "model: pass --config FILE, or --diffusion-steps N [--timestep-respacing S] (and "
                          "--image-size N unless the model has an image_size attribute)")
    return None


def _given_inputs(inputs: Sequence[str] | Mapping[str, tuple]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``--input`` texts (or a mapping name → (shape, dtype)) as name → (shape, dtype)."""
    given: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for item in (inputs.items() if isinstance(inputs, Mapping) else inputs):
        name, shape, dtype = parse_input(item) if isinstance(item, str) else (item[0], *item[1])
        given[name] = (tuple(shape), dtype)
    return given


def _timestep_name(cls: str, names: list[str], timestep_input: str | None) -> str:
    """The timestep parameter: ``timestep_input`` where given, else the first named as in TIMESTEP_NAMES."""
    if timestep_input is not None:
        if timestep_input not in names:
            raise FxpassError(f"--timestep-input {timestep_input}: {cls}.forward has no such parameter "
                              f"(it takes {', '.join(names)})")
        return timestep_input
    t_name = _named_timestep(names)
    if t_name is None:
        raise FxpassError(f"{cls}.forward({', '.join(names)}): no timestep input found (looked for "
                          f"{', '.join(TIMESTEP_NAMES)}); name it with --timestep-input NAME")
    return t_name


@dataclass
class _Extras:
    """The inputs other than x and the timestep, in the order they are drawn: each with a fixed shape
    and dtype, or described by the model's attributes (its shape completed by :func:`plan`)."""

    order: list[str] = field(default_factory=list)
    fixed: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    described: dict[str, _Described] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    omitted: list[str] = field(default_factory=list)


def _extra_inputs(model: torch.nn.Module, params, t_name: str, given: dict, n_classes: int | None, batch: int,
                  dims: int) -> _Extras:
    """Each input other than x and the timestep: given, a label, described by the model's attributes,
    or left at its default; then the given ones forward takes through ``**kwargs``."""
    cls = type(model).__name__
    names = [p.name for p in params]
    extras = _Extras()
    for p in params[1:]:
        if p.name == t_name:
            continue
        if p.name in given:
            extras.order.append(p.name)
            extras.fixed[p.name] = given[p.name]
            extras.origins[p.name] = "--input"
        elif p.name in LABEL_NAMES and n_classes is not None:
            extras.order.append(p.name)
            extras.fixed[p.name] = ((batch,), torch.int64)
            extras.origins[p.name] = f"labels 0..{n_classes - 1}"
        elif (found := _describe(model, p.name)) is not None:
            extras.order.append(p.name)
            extras.described[p.name] = found
        elif p.default is inspect.Parameter.empty:
            sequence = sequence_example(model, p.name, batch)
            if sequence is not None:  # a cross-attention sequence: its length is the user's
                raise FxpassError(f"{cls}.forward needs '{p.name}', a cross-attention sequence; give its shape "
                                  f"with {sequence}")
            attrs = input_attributes(p.name)
            looked = ", ".join(attrs["shape"] + attrs["size"][:1] + attrs["channels"][:1])
            raise FxpassError(f"{cls}.forward needs '{p.name}', whose shape fxpass cannot infer (the model has no "
                              f"attribute {looked}); give its shape with "
                              f"{_example(p.name, batch, None, None, dims)}")
        else:
            extras.omitted.append(p.name)
    for n, spec in given.items():  # accepted through **kwargs
        if n not in names and n != "x":
            extras.order.append(n)
            extras.fixed[n] = spec
            extras.origins[n] = "--input"
    return extras


def _apply_sizes(cls: str, described: dict[str, _Described], batch: int, dims: int) -> None:
    """A NAME_shape attribute gives the whole shape; else channels and size as far as the attributes go."""
    for n, d in described.items():
        what = f"{cls}.{d.read[0]} = {d.size}"
        if d.whole:
            if len(d.size) not in (dims + 1, dims + 2):
                raise FxpassError(f"{what}: not a shape for '{n}' (x is {dims + 2}-D); give its shape with "
                                  f"{_example(n, batch, None, None, dims)}")
            d.channels, d.spatial = d.size[-dims - 1], tuple(d.size[-dims:])
        elif isinstance(d.size, int):
            d.spatial = (d.size,) * dims
        elif d.size is not None:
            if len(d.size) != dims:
                raise FxpassError(f"{what}: not a size for '{n}' (x has {dims} spatial dimensions); give its "
                                  f"shape with {_example(n, batch, d.channels, None, dims)}")
            d.spatial = tuple(d.size)


def _fill_channels(cls: str, extras: _Extras, x_given, total: int | None, batch: int, dims: int) -> int:
    """The channels of the one described input no attribute gives them for, from the first convolution's
    ``total``; returns the channels the inputs other than x carry (concatenated to x's before it)."""

    def counted(shape, dtype) -> int:  # channels concatenated to x's before the first convolution
        return int(shape[1]) if dtype.is_floating_point and len(shape) == dims + 2 else 0

    described = extras.described
    known = sum(counted(*spec) for spec in extras.fixed.values()) + sum(
        d.channels for d in described.values() if d.channels is not None)
    open_ = [n for n, d in described.items() if d.channels is None]
    if len(open_) > 1:
        raise FxpassError(f"{cls}.forward: the channels of '{open_[0]}' and '{open_[1]}' are unknown (no attribute "
                          f"{input_attributes(open_[0])['channels'][0]}); give their shapes with --input NAME=SHAPE")
    if not open_:
        return known
    n = open_[0]
    d = described[n]
    why = f"{cls} has {d.read[0]} but no attribute {input_attributes(n)['channels'][0]}"
    if x_given and total is not None:
        d.channels = total - int(x_given[0][1]) - known
        how = f"from the first convolution's {total} less x's {x_given[0][1]}" + (
            f" and the other inputs' {known}" if known else "")
    elif not x_given and is_low_res(n) and (total - known) % 2 == 0:
        d.channels = (total - known) // 2  # SuperResModel: a first convolution for in_channels * 2
        how = f"as x's (half of the first convolution's {total - known})"
    else:
        raise FxpassError(f"{cls}.forward's '{n}': channels unknown ({why}); give its shape with "
                          f"{_example(n, batch, None, d.spatial, dims)}")
    if d.channels < 1:
        raise FxpassError(f"{cls}.forward's '{n}': channels unknown ({why}, and the first convolution's "
                          f"{total} leave {d.channels} for it); give its shape with "
                          f"{_example(n, batch, None, d.spatial, dims)}")
    d.read.append(f"channels {how}")  # an origin, not an attribute
    return known + d.channels


def _fill_spatial(cls: str, extras: _Extras, x_shape: tuple[int, ...], batch: int, dims: int) -> None:
    """Each described input's spatial size (x's where no attribute gives it, except for a
    low-resolution input), its shape and its origin."""
    for n, d in extras.described.items():
        if d.spatial is None:
            if is_low_res(n):
                raise FxpassError(f"{cls}.forward's '{n}': size unknown ({cls} has {d.read[0]} but no attribute "
                                  f"{', '.join(input_attributes(n)['size'])}); give its shape with "
                                  f"{_example(n, batch, d.channels, None, dims)}")
            d.spatial = tuple(x_shape[2:])  # a conditioning image at x's resolution
            d.read.append("size of x")
        extras.fixed[n] = ((batch, d.channels, *d.spatial), torch.float32)
        extras.origins[n] = ", ".join(f"model.{r}" if r.isidentifier() else r for r in d.read)


def plan_for_graph(model: torch.nn.Module, info, *, timestep_input: str | None = None,
                   inputs: Sequence[str] = (), output: str | None = None) -> Plan:
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
    return plan(model, image_size=x[0][-1] if x else None, timestep_input=timestep_input, inputs=given, output=output,
                plain=getattr(info, "mode", None) == "plain")
