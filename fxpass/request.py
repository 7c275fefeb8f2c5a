"""One lowering request: what to capture, how to rewrite, what to write, how to check.

``fxpass lower`` builds a :class:`LowerRequest` from its flags once; ``fxpass.lower()`` builds the same
object from its keywords (:meth:`LowerRequest.of`); the pipeline (:mod:`fxpass.pipeline`) takes it whole
through every stage and records it whole in the report (``"request"``) and, without the machine's file
paths, in the ONNX metadata (``fxpass.request``).  A new option is one field of one group here plus its
flag in ``fxpass/cli/lower.py``: every stage reads the field from the request it is handed.

    LowerRequest
      source   what to capture   checkpoint, config, the user-class settings, the inputs
      rewrite  how to rewrite    schedule, step graph, opset, surgery, precision
      output   what to write     path, report, format
      check    how to check      the numeric gate and its tolerance

:meth:`LowerRequest.validate` refuses inconsistent settings in one line each, before any work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import FxpassError

#: what the write stage can write: the ONNX file, or a mobile format made from the verified lowering
FORMATS = ("onnx", "ort", "pte", "mlpackage", "tflite")
#: the file name each --format writes (fxpass lower refuses another format's suffix)
SUFFIXES = {"onnx": ".onnx", "ort": ".ort", "pte": ".pte", "mlpackage": ".mlpackage", "tflite": ".tflite"}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
#: auto: for the target (CPU: the GroupNorms of at least 2^21 elements as LayerNormalization on a grouped
#: view; --format ort: all of them, whose static shapes CoreML/NNAPI take); all; keep: one node each
GROUP_NORM_FORMS = ("auto", "all", "keep")
#: auto: the example-value tracer, then torch.export where it refuses the code; trace; export
CAPTURE_ROUTES = ("auto", "trace", "export")


@dataclass(frozen=True)
class Source:
    """What to capture: the checkpoint and how to build the module it loads into (fxpass's U-Net for
    ``config``, or a user's ``model_class`` / ``model_factory`` with ``model_kwargs``), and how the
    model is called (``timestep_input`` names the timestep parameter where fxpass does not know its
    name; ``inputs`` gives other inputs' shapes, ``"low_res=1,3,16,16"``; ``timestep_values``: what a
    continuous-timestep model is fed for timestep t); ``capture``: which capture route runs."""

    checkpoint: str | Path | None = None
    config: ModelConfig | None = None
    model_class: str | None = None
    model_factory: str | None = None
    model_kwargs: str | None = None
    trust_pickle: bool = False
    allow_nonfinite: bool = False
    timestep_input: str | None = None
    inputs: tuple[str, ...] | dict[str, tuple] = ()
    timestep_values: str = "index"
    #: which output to lower where forward returns several (fxpass.outputs.pick_output)
    model_output: str | None = None
    #: how: "trace" (route 1, fxpass.capture), "export" (route 2, torch.export: fxpass.capture_export),
    #: "auto" (route 1, and route 2 where route 1 refuses the code)
    capture: str = "auto"


@dataclass(frozen=True)
class Rewrite:
    """How to rewrite: ``timesteps`` ("respaced": the config's schedule as tables gathered by
    ``t_index``; a sequence: those timesteps as tables; an int: that one folded), ``step_graph`` (one
    whole denoising step), the export's ``opset`` and ``dynamic_batch``, the surgery (``simplifier``,
    ``group_norm``, ``surgery_options`` by pass name) and the ``precision`` stage (``int8``: an
    :class:`fxpass.precision.Int8Options`), and ``deep_cache`` (the level of a full + shallow graph cut)."""

    timesteps: str | int | Sequence[int] | None = "respaced"
    step_graph: bool = False
    dynamic_batch: bool = False
    opset: int = 21
    simplifier: str | None = "onnxslim"
    group_norm: str = "auto"
    surgery_options: dict[str, dict[str, Any]] | None = None
    precision: str = "fp32"
    int8: Any = None
    #: cut at this skip connection (1 = nearest the output) into a full and a shallow graph (fxpass.deep_cache)
    deep_cache: int | None = None


@dataclass(frozen=True)
class Output:
    """What to write: the model file (``path``; a directory for ``mlpackage``) and the JSON ``report``,
    together (both or neither) after a passing check; ``force`` replaces existing outputs and writes a
    model that failed its check; ``protected``: further input paths no output may be."""

    path: str | Path | None = None
    report: str | Path | None = None
    format: str = "onnx"
    palettize_bits: int | None = None
    force: bool = False
    protected: tuple[str | Path | None, ...] = ()


@dataclass(frozen=True)
class Check:
    """How to check: ``verify`` runs the numeric gate (the runtime against the eager model) before
    anything is written; ``tolerance`` (atol_scale, rtol) overrides the precision's default."""

    verify: bool = True
    tolerance: tuple[float, float] | None = None


_GROUPS = {"source": Source, "rewrite": Rewrite, "output": Output, "check": Check}
#: the flat option names :meth:`LowerRequest.of` takes, by the group that owns each
_OWNER = {f.name: group for group, cls in _GROUPS.items() for f in fields(cls)}
#: names the API has always taken for a field: the flat keyword -> the field
_ALIASES = {"output_path": "path", "report_path": "report", "model_inputs": "inputs"}


@dataclass(frozen=True)
class LowerRequest:
    """The whole lowering request, passed unchanged through the stages (see the module docstring)."""

    source: Source = field(default_factory=Source)
    rewrite: Rewrite = field(default_factory=Rewrite)
    output: Output = field(default_factory=Output)
    check: Check = field(default_factory=Check)

    @classmethod
    def of(cls, **options) -> LowerRequest:
        """A request from flat keywords (``config=…, precision="fp16", path="m.onnx"``): each goes to the
        group that owns the field of that name; an unknown name is a TypeError naming it."""
        return cls().replace(**options)

    def replace(self, **options) -> LowerRequest:
        """A copy with the flat keywords changed (as :meth:`of` takes them)."""
        by_group: dict[str, dict[str, Any]] = {}
        for name, value in options.items():
            name = _ALIASES.get(name, name)
            if name not in _OWNER:
                known = ", ".join(sorted(_OWNER))
                raise TypeError(f"lowering option {name!r} is not one of: {known}")
            by_group.setdefault(_OWNER[name], {})[name] = value
        changed = {group: dataclasses.replace(getattr(self, group), **values) for group, values in by_group.items()}
        return dataclasses.replace(self, **changed)

    @property
    def mode_flag(self) -> str:
        """How the request names its output form in messages: ``--step-graph`` or ``--format F``."""
        return "--step-graph" if self.rewrite.step_graph else f"--format {self.output.format}"

    def validate(self) -> None:
        """Refuse settings that cannot go together, one line each, before any work."""
        from .export import check_opset

        rw, out = self.rewrite, self.output
        check_opset(rw.opset)
        _one_of("--precision", rw.precision, PRECISIONS, ", ".join(PRECISIONS))
        _one_of("--group-norm", rw.group_norm, GROUP_NORM_FORMS, " or ".join(GROUP_NORM_FORMS))
        _one_of("--format", out.format, FORMATS, "one of " + ", ".join(FORMATS))
        _one_of("--capture", self.source.capture, CAPTURE_ROUTES, " or ".join(CAPTURE_ROUTES))
        from .signature import parse_input

        for item in self.source.inputs:  # an --input shape that is wrong or too large: refused before any work
            if isinstance(item, str):
                parse_input(item)
        if self.source.capture == "export" and rw.dynamic_batch:
            raise FxpassError("--capture export: torch.export's graph has static shapes here; --dynamic-batch needs "
                              "--capture trace")
        if rw.precision == "bf16" and (out.format != "onnx" or rw.step_graph):  # a runtime hint only OpenVINO takes
            raise FxpassError(f"--precision bf16: an OpenVINO inference precision for the table-mode ONNX model "
                              f"(not {self.mode_flag}); use --precision fp16 for the mobile formats")
        if rw.precision == "int8" and rw.step_graph:
            raise FxpassError("--precision int8: its plan is measured on the U-Net along the schedule, so it is "
                              "written as the table-mode graph (not --step-graph)")
        if rw.precision == "int8" and out.format not in ("onnx", "ort", "tflite"):
            raise FxpassError(f"--precision int8: ONNX Runtime's QDQ model, written as --format onnx or ort (not "
                              f"{out.format}; for a smaller Core ML package use --palettize-bits), or LiteRT's "
                              "dynamic-range int8 as --format tflite")
        if rw.deep_cache is not None:
            self._validate_deep_cache()
        if rw.precision == "int8" and rw.int8 is not None and out.format == "tflite":
            given = [f for f, v in (("--calibration-data", rw.int8.calibration_data), ("--precision-plan", rw.int8.plan),
                                    ("--calibrate-on-samples", rw.int8.self_calibration)) if v]
            if given:
                raise FxpassError(f"{given[0]}: --format tflite's int8 is LiteRT's dynamic-range quantization, "
                                  "which takes no calibration or plan")
        elif rw.precision == "int8" and rw.int8 is not None:
            rw.int8.check_data_source()
        if out.palettize_bits is not None and out.format != "mlpackage":
            raise FxpassError(f"--palettize-bits {out.palettize_bits}: applies to --format mlpackage only")
        suffix = Path(out.path).suffix.lower() if out.path is not None else None
        if suffix is not None and (suffix in SUFFIXES.values() or out.format == "mlpackage") \
                and suffix != SUFFIXES[out.format]:  # Core ML writes only a .mlpackage; the rest would mislead
            named = next((f"; or pass --format {f}" for f, x in SUFFIXES.items() if x == suffix), "")
            raise FxpassError(f"{out.path}: --format {out.format} writes a {SUFFIXES[out.format]} file; name it "
                              f"so{named}")
        if rw.precision == "bf16":
            from targets.openvino import openvino_unavailable_reason

            reason = openvino_unavailable_reason("bf16")
            if reason:  # the bf16 model is checked on OpenVINO: without it nothing could vouch for the file
                raise FxpassError(f"unavailable: --precision bf16: {reason}", exit_code=3)
        if out.format != "onnx":
            from .formats import format_unavailable_reason

            reason = format_unavailable_reason(out.format)
            if reason:
                raise FxpassError(reason)

    def _validate_deep_cache(self) -> None:
        rw, level = self.rewrite, self.rewrite.deep_cache
        if isinstance(level, bool) or not isinstance(level, int) or level < 1:
            raise FxpassError(f"--deep-cache {level!r}: expected a skip-connection level, 1 or more")
        if rw.step_graph or self.output.format != "onnx":
            raise FxpassError(f"--deep-cache: cuts the table-mode ONNX model (not {self.mode_flag})")
        one = isinstance(rw.timesteps, int) or (isinstance(rw.timesteps, str) and rw.timesteps.strip().isdigit())
        if rw.timesteps is None or one:
            raise FxpassError("--deep-cache: cuts the table-mode model (its samplers need every step), not a model "
                              "lowered at one timestep")

    def to_dict(self, *, portable: bool = False) -> dict[str, Any]:
        """The request as plain JSON values; ``portable`` leaves out this machine's file paths (the
        checkpoint, the outputs, int8's calibration images and reused plan), as the ONNX metadata records
        it: the same settings give the same bytes wherever the files lie."""
        out = {group: {f.name: _plain(getattr(getattr(self, group), f.name)) for f in fields(_GROUPS[group])}
               for group in _GROUPS}
        if portable:
            out["source"].pop("checkpoint")
            out["output"] = {k: v for k, v in out["output"].items() if k not in ("path", "report", "protected")}
            if isinstance(out["rewrite"]["int8"], dict):  # the calibration images and a reused plan file
                out["rewrite"]["int8"] = {k: v for k, v in out["rewrite"]["int8"].items()
                                          if k not in ("calibration_data", "plan")}
        return out


def _one_of(flag: str, value, choices: Sequence[str], expected: str) -> None:
    if value not in choices:
        raise FxpassError(f"{flag} {value}: expected {expected}")


def _plain(value):
    """JSON-able: a config as its dict, paths as text, dataclasses (Int8Options) as dicts."""
    if isinstance(value, ModelConfig):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
