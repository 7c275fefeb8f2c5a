"""Helpers shared by the tests of this folder (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

#: the factor by which the perturbed model's output convolution weight is scaled
PERTURBATION = 1.001


def scale_output_conv_weight(model: onnx.ModelProto, factor: float) -> str:
    """Scale, in place, the weight of the Conv that produces the graph's output; returns its name.

    The output convolution is where a relative weight change shows one-for-one in the output
    (``out = W·h + b``), so ``factor - 1`` is about the relative error the check must see.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers[model.graph.output[0].name]
    assert node.op_type == "Conv", f"the output comes from {node.op_type}, expected the output Conv"
    for init in model.graph.initializer:
        if init.name == node.input[1]:
            weight = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((weight * np.float32(factor)).astype(weight.dtype), init.name))
            return init.name
    raise AssertionError(f"no initializer for {node.input[1]}")


REPO = Path(__file__).resolve().parents[2]
#: the small schedule the user-class tests lower with
SCHEDULE = ["--diffusion-steps", "100", "--timestep-respacing", "10"]


def lower_on_one_thread(*argv) -> int:
    """``fxpass lower *argv`` in this process on one torch thread (as the module fixtures lower), the thread
    count restored after: its exit code."""
    import torch

    from fxpass.cli import main

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(["lower", *map(str, argv)])
    finally:
        torch.set_num_threads(before)


def lower_user_class(directory: Path, name: str, model, *flags):
    """``fxpass lower`` of ``user_models:<name>`` (weights of ``model``, seed 0) with ``--report``:
    (exit code, checkpoint, ONNX path, the report or None)."""
    import torch

    from fxpass.checkpoint import save_checkpoint
    from fxpass.cli import main

    torch.manual_seed(0)
    ckpt, out, report = directory / f"{name}.pt", directory / f"{name}.onnx", directory / f"{name}.json"
    save_checkpoint(model, ckpt)
    code = main(["lower", str(ckpt), "-o", str(out), "--report", str(report),
                 "--model-class", f"user_models:{name}", *SCHEDULE, *flags])
    return code, ckpt, out, (json.loads(report.read_text()) if report.exists() else None)


def lower_format(ckpt, config, out: Path, *flags) -> dict:
    """``fxpass lower CKPT --config CONFIG -o OUT *flags --report``, asserted to pass: the report's ``format``
    entry (what a ``--format`` route wrote and checked)."""
    from fxpass.cli import main

    report = out.with_name(out.name + ".report.json")
    assert main(["lower", str(ckpt), "--config", str(config), "-o", str(out), *map(str, flags),
                 "--report", str(report)]) == 0
    return json.loads(report.read_text())["format"]


def input_shapes(path) -> dict[str, list[int]]:
    """The graph inputs of the ONNX file at ``path`` by name, static dimensions."""
    graph = onnx.load(path).graph
    return {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}


def sample_in_a_fresh_process(sample_args: list[str], runtime_module: str, command: str = "sample") -> str:
    """Run ``fxpass sample *sample_args`` (or another ``command``) in a new interpreter; asserts it
    succeeded and imported ``runtime_module``; returns "torch-free" or "torch imported"."""
    code = (
        "import sys\n"
        "from fxpass.cli import main\n"
        f"rc = main([{command!r}, *{sample_args!r}])\n"
        "assert rc == 0, rc\n"
        "import fxpass, fxpass.sampler, fxpass.fileio, fxpass.denoisers\n"
        f"assert {runtime_module!r} in sys.modules\n"
        "print('torch imported' if any(m == 'torch' or m.startswith('torch.') for m in sys.modules) else 'torch-free')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def gray_image_and_half_mask(directory: Path, size: int) -> tuple[Path, Path]:
    """A seeded gray ``size`` x ``size`` PNG and a mask PNG whose left half is known (white)."""
    from PIL import Image

    img, mask = directory / "img.png", directory / "mask.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (size, size), dtype=np.uint8)).save(img)
    keep = np.zeros((size, size), np.uint8)
    keep[:, : size // 2] = 255
    Image.fromarray(keep).save(mask)
    return img, mask


def cli(capsys, *args) -> tuple[int, str, str]:
    """``fxpass *args`` in this process (arguments as str): (exit code, stdout, stderr)."""
    from fxpass.cli import main

    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err
