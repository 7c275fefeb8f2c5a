"""``python -m bench.defects``: wrong models against the checks, at every precision (issue #26).

    python -m bench.defects                 # the trained digits reference (fxpass/reference)
    python -m bench.defects --json OUT.json # ... and every figure as JSON

For the trained reference and for copies of it with one defect injected, each lowered at fp32 and made
fp16, bf16 and int8 exactly as the precision stage does (int8 with the correct model's measured plan,
calibrated on the model's own trajectories; a plan of its own where a defect changed the layers), it
measures what ``fxpass check --model TRUE.pt
--precision P`` holds each file to:

- the numeric error: ONNX Runtime against the true eager model at the first, middle and last t_index on a
  seeded x, max|diff| / max|ref| (the gate's measure; bf16 files run in float32 on ONNX Runtime, as
  ``check``'s ORT row does), beside the precision's bound;
- the structural verdict (:mod:`fxpass.equivalence`): whether the file is the float32 graph of the true
  model plus that precision's quantization or casts.

The defects: one ResBlock's timestep scale/shift zeroed, one attention block's output zeroed, the
timestep embedding ignored (its first layer zeroed), the output halved, and the timestep tables shifted
by one row.  It measures; it never asserts.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

DEFECTS = ("correct", "scale/shift zeroed", "attention zeroed", "timestep ignored", "output halved",
           "tables off by one row")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
#: the --step-graph file (int8 and bf16 are table-mode only)
STEP_PRECISIONS = ("fp32", "fp16")


def _zero_first(model: torch.nn.Module, part: str) -> None:
    names = [n for n, _ in model.named_parameters() if part in n]
    with torch.no_grad():
        for name in names[:2]:  # the first such layer's weight and bias
            model.get_parameter(name).zero_()


def _scale_output(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("out."):
                p.mul_(0.5)


EDITS: dict[str, Callable[[torch.nn.Module], None]] = {
    "scale/shift zeroed": lambda m: _zero_first(m, "emb_layers"),
    "attention zeroed": lambda m: _zero_first(m, "proj_out"),
    "timestep ignored": lambda m: _zero_first(m, "time_embed.0"),
    "output halved": _scale_output,
}


def roll_tables(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every table gathered by ``t_index`` shifted by one row (row i holds row i + 1's values)."""
    from onnx import numpy_helper

    from fxpass.metadata import parse, read_props

    out = copy.deepcopy(proto)
    steps = len(parse(read_props(out), "the model").timesteps)
    inits = {i.name: i for i in out.graph.initializer}
    rolled = 0
    for node in out.graph.node:  # a Gather of a [steps, ...] initializer by a computed index: a timestep table
        if node.op_type == "Gather" and node.input[0] in inits and node.input[1] not in inits \
                and inits[node.input[0]].dims[:1] == [steps]:
            init = inits[node.input[0]]
            init.CopyFrom(numpy_helper.from_array(np.roll(numpy_helper.to_array(init), -1, axis=0), init.name))
            rolled += 1
    if not rolled:
        raise SystemExit("bench.defects: no timestep table found to shift")
    return out


def variants(fp32: onnx.ModelProto, config, plan: Path | None) -> tuple[dict[str, onnx.ModelProto], dict]:
    """(the file at every precision, made as the precision stage makes it; the int8 stage's info)."""
    from fxpass import metadata
    from fxpass.precision import Int8Options, quantize_int8
    from fxpass.stages import _to_fp16

    bf16 = copy.deepcopy(fp32)
    metadata.write_props(bf16, {**metadata.read_props(bf16), metadata.PRECISION: "bf16"})
    from fxpass.errors import FxpassError

    try:
        int8, info = quantize_int8(fp32, config, Int8Options(self_calibration=True, plan=plan and str(plan), threads=1))
    except FxpassError:  # the defect changed the layers (a zeroed layer folded away): a plan of its own
        int8, info = quantize_int8(fp32, config, Int8Options(self_calibration=True, threads=1))
    return {"fp32": fp32, "fp16": _to_fp16(fp32)[0], "bf16": bf16, "int8": int8}, info


def numeric_error(proto: onnx.ModelProto, model: torch.nn.Module, model_timesteps, seed: int = 0) -> float:
    """max over first/middle/last t_index of max|ORT - eager| / max|eager|."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    shape = [1, *(d.dim_value or 1 for d in proto.graph.input[0].type.tensor_type.shape.dim[1:])]
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    n = len(model_timesteps)
    worst = 0.0
    for i in sorted({0, n // 2, n - 1}):
        got = sess.run(None, {"x": x, "t_index": np.array([i], dtype=np.int64)})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(x), torch.tensor([model_timesteps[i]])).numpy()
        worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
    return worst


def step_files(model: torch.nn.Module, cfg, defect: str, true_step: onnx.ModelProto) -> dict[str, onnx.ModelProto]:
    """The defect's ``--step-graph`` file at fp32 and fp16 (made as the precision stage makes it)."""
    from fxpass.pipeline import lower
    from fxpass.stages import _to_fp16

    fp32 = true_step if defect == "correct" else lower(model, config=cfg, step_graph=True, verify=False)
    if defect == "tables off by one row":
        fp32 = roll_tables(true_step)
    return {"fp32": fp32, "fp16": _to_fp16(fp32)[0]}


def step_error(proto: onnx.ModelProto, model: torch.nn.Module, cfg, precision: str) -> float:
    """``fxpass check STEP --model TRUE --precision P``'s measure: x_prev and pred_xstart on ONNX Runtime against
    the true eager model + NumPy's posterior (pred_xstart's error divided by its conditioning sqrt(1/abar - 1))."""
    from fxpass.gate import check_step_against_numpy, default_tolerance

    return check_step_against_numpy(proto, model, config=cfg, tolerance=default_tolerance(precision))["max_rel_to_scale"]


def measure() -> dict:
    from fxpass.checkpoint import load_model
    from fxpass.config import load_config
    from fxpass.equivalence import compare
    from fxpass.gate import default_tolerance
    from fxpass.metadata import read_props, parse
    from fxpass.pipeline import lower
    from fxpass.reference import CHECKPOINT, CONFIG

    torch.set_num_threads(1)
    cfg = load_config(CONFIG)
    true_model = load_model(CHECKPOINT, cfg).eval()
    true_fp32 = lower(true_model, config=cfg, verify=False)
    true_step = lower(true_model, config=cfg, step_graph=True, verify=False)
    model_ts = parse(read_props(true_fp32), "reference").model_timesteps
    rows = {}
    with tempfile.TemporaryDirectory(prefix="fxpass-defects-") as tmp:
        plan = None
        for defect in DEFECTS:
            print(f"defects: {defect}", flush=True)
            model = load_model(CHECKPOINT, cfg).eval()
            EDITS.get(defect, lambda m: None)(model)
            fp32 = true_fp32 if defect == "correct" else lower(model, config=cfg, verify=False)
            if defect == "tables off by one row":
                fp32 = roll_tables(true_fp32)
            files, info = variants(fp32, cfg, plan)
            if plan is None:  # the correct model's plan, reused for every defect (same layers)
                plan = Path(tmp) / "plan.json"
                plan.write_text(json.dumps(info["plan"]))
            rows[defect] = {p: {"error": numeric_error(f, true_model, model_ts),
                                "structure": compare(f, true_fp32) or "same graph"} for p, f in files.items()}
            rows[defect].update({f"step {p}": {"error": step_error(f, true_model, cfg, p),
                                               "structure": compare(f, true_step) or "same graph"}
                                 for p, f in step_files(model, cfg, defect, true_step).items()})
    bounds = {p: default_tolerance(p)[0] for p in PRECISIONS}
    return {"bounds": {**bounds, **{f"step {p}": bounds[p] for p in STEP_PRECISIONS}}, "rows": rows}


def table(data: dict) -> str:
    bounds, columns = data["bounds"], [*PRECISIONS, *(f"step {p}" for p in STEP_PRECISIONS)]
    lines = ["| model | " + " | ".join(f"{p} error (bound {bounds[p]:g})" for p in columns) + " | structure vs the "
             "true float32 graph |", "|---|" + "---:|" * len(columns) + "---|"]
    for defect, per in data["rows"].items():
        cells = [f"{per[p]['error']:.2g}" + ("" if per[p]["error"] <= bounds[p] else " FAIL") for p in columns]
        verdicts = {("same graph" if per[p]["structure"] == "same graph" else "FAIL") for p in columns}
        verdict = "same graph at every precision" if verdicts == {"same graph"} else (
            "FAIL at every precision" if verdicts == {"FAIL"} else
            ", ".join(f"{p}: {'same' if per[p]['structure'] == 'same graph' else 'FAIL'}" for p in columns))
        lines.append(f"| {defect} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.defects", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="also write every figure here")
    args = p.parse_args(argv)
    data = measure()
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    print(table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
