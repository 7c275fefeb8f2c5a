"""The hostile-input suite: every command, tried as a hostile user would (issue #12).

Each case runs `fxpass …` in a workspace of copies (a tiny checkpoint, its config and lowering, images)
and asserts: a non-zero exit, one line on stderr without "internal error" or a traceback, the
expected words, and no file created, changed or removed.  Cases that would need a lot of memory are
refused from estimates before anything is allocated.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import external_data_helper

from fxpass.cli import main

BIG_CHANNELS = 1_000_000 - 1_000_000 % 32


def _png(path: Path, value: int, size: int = 32) -> None:
    from PIL import Image

    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def _onnx_with(path: Path, base: onnx.ModelProto, *, props=None, x_shape=None, external=None, op=None) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(base)
    if props:
        existing = {p.key: p for p in model.metadata_props}
        for key, value in props.items():
            if key in existing:
                existing[key].value = value
            else:
                model.metadata_props.add(key=key, value=value)
    if x_shape:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        for d, v in zip(dims, x_shape):
            d.dim_value = v
    if op:
        node = model.graph.node.add(op_type=op[1], domain=op[0], name="evil")
        node.input.append(model.graph.input[0].name)
        node.output.append("evil_out")
        model.opset_import.add(domain=op[0], version=1)
    if external is not None:
        tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
        external_data_helper.set_external_data(tensor, location=external)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
    path.write_bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def originals(tmp_path_factory, tiny_ckpt, tiny_yaml, tiny_onnx):
    root = tmp_path_factory.mktemp("hostile-originals")
    base = onnx.load(str(tiny_onnx))
    cfg = yaml.safe_load(tiny_yaml.read_text())
    files = {"ck.pt": tiny_ckpt.read_bytes(), "c.yml": tiny_yaml.read_bytes(), "m.onnx": tiny_onnx.read_bytes()}
    for name, data in files.items():
        (root / name).write_bytes(data)
    _png(root / "img.png", 128)
    mask = np.full((32, 32), 255, np.uint8)
    mask[8:24, 8:24] = 0
    from PIL import Image

    Image.fromarray(mask).save(root / "mask.png")
    _png(root / "existing.png", 7)
    (root / "keep").mkdir()
    (root / "keep" / "keep.txt").write_text("mine")
    configs = {
        "huge_channels.yml": {**cfg, "num_channels": BIG_CHANNELS},
        "huge_blocks.yml": {**cfg, "num_res_blocks": 100_000},
        "huge_steps.yml": {**cfg, "diffusion_steps": 1_000_000_000},
        "huge_steps_respaced.yml": {**cfg, "diffusion_steps": 1_000_000_000, "timestep_respacing": "250"},
        "all_steps.yml": {**cfg, "diffusion_steps": 200_000, "timestep_respacing": ""},
    }
    for name, values in configs.items():
        (root / name).write_text(yaml.safe_dump(values))
    meta_cfg = json.loads({p.key: p.value for p in base.metadata_props}["fxpass.config"])
    _onnx_with(root / "long.onnx", base, props={"fxpass.timesteps": json.dumps(list(range(200_000)))})
    _onnx_with(root / "strings.onnx", base, props={"fxpass.timesteps": json.dumps([str(t) for t in range(10)])})
    _onnx_with(root / "nokey.onnx", base, props={"fxpass.config": json.dumps(
        {k: v for k, v in meta_cfg.items() if k != "learn_sigma"})})
    _onnx_with(root / "badkey.onnx", base, props={"fxpass.config": json.dumps({**meta_cfg, "colour": "blue"})})
    _onnx_with(root / "vast.onnx", base, x_shape=[1, 3, 40000, 40000])
    _onnx_with(root / "batch.onnx", base, x_shape=[100_000, 3, 32, 32])
    _onnx_with(root / "bigimage.onnx", base, props={"fxpass.config": json.dumps(
        {**meta_cfg, "image_size": 40000, "channel_mult": "1,2"})})
    _onnx_with(root / "six.onnx", base, x_shape=[1, 6, 32, 32])
    _onnx_with(root / "custom.onnx", base, op=("com.evil", "Pwn"))
    import torch

    state = torch.load(tiny_ckpt, weights_only=True)
    key = next(k for k, v in state.items() if v.dtype == torch.float32 and v.dim() == 4)
    for name, make in {"sparse": lambda t: t.to_sparse(), "meta": lambda t: torch.empty(t.shape, device="meta"),
                       "float8": lambda t: t.to(torch.float8_e4m3fn)}.items():
        torch.save({**state, key: make(state[key])}, root / f"{name}.pt")
    for name, location in {"dotdot": "../../etc/passwd", "absolute": "/etc/passwd", "proc": "/proc/self/mem",
                           "dev": "/dev/zero", "missing": "weights.bin", "link": "link.bin"}.items():
        _onnx_with(root / f"ext-{name}.onnx", base, external=location)
    return root


@pytest.fixture
def workspace(tmp_path, originals):
    for entry in originals.iterdir():
        if entry.is_dir():
            shutil.copytree(entry, tmp_path / entry.name)
        else:
            shutil.copy2(entry, tmp_path / entry.name)
    (tmp_path / "link.pt").symlink_to(tmp_path / "ck.pt")
    os.link(tmp_path / "ck.pt", tmp_path / "hard.pt")
    (tmp_path / "link.bin").symlink_to("/etc/passwd")
    return tmp_path


def _snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(root))] = "dir"
    return out


SAMPLE = ["--image", "img.png", "--mask", "mask.png"]
CASES = {
    # data loss: an output that is an input, or exists, is refused before any work
    "lower -o the checkpoint": (["lower", "ck.pt", "--config", "c.yml", "-o", "ck.pt"], "is the input file ck.pt"),
    "lower -o the config": (["lower", "ck.pt", "--config", "c.yml", "-o", "c.yml"], "is the input file c.yml"),
    "lower --report the checkpoint": (["lower", "ck.pt", "--config", "c.yml", "-o", "a.onnx", "--report", "ck.pt"],
                                      "is the input file ck.pt"),
    "lower -o a symlink to the input": (["lower", "ck.pt", "--config", "c.yml", "-o", "link.pt", "--force"],
                                        "is the input file ck.pt"),
    "lower -o a hard link to the input": (["lower", "ck.pt", "--config", "c.yml", "-o", "hard.pt", "--force"],
                                          "is the input file ck.pt"),
    "lower -o and --report the same": (["lower", "ck.pt", "--config", "c.yml", "-o", "a.onnx", "--report",
                                        "./a.onnx"], "is the same file as -o"),
    "lower -o existing": (["lower", "ck.pt", "--config", "c.yml", "-o", "m.onnx"], "already exists"),
    "check --plot the model": (["check", "m.onnx", "--model", "ck.pt", "--plot", "m.onnx"], "is the input file m.onnx"),
    "check --plot the checkpoint": (["check", "m.onnx", "--model", "ck.pt", "--plot", "ck.pt", "--force"],
                                    "is the input file ck.pt"),
    "check --plot existing": (["check", "m.onnx", "--model", "ck.pt", "--plot", "existing.png"], "already exists"),
    "sample -o the model": (["sample", "m.onnx", *SAMPLE, "-o", "m.onnx", "--force"], "is the input file m.onnx"),
    "sample -o the image": (["sample", "m.onnx", *SAMPLE, "-o", "img.png", "--force"], "is the input file img.png"),
    "sample -o existing": (["sample", "m.onnx", *SAMPLE, "-o", "existing.png"], "already exists"),
    "golden --force over a non-golden dir": (["golden", "ck.pt", "--config", "c.yml", "-o", "keep", "--force"],
                                             "is not a golden set"),
    "golden -o a dir holding the input": (["golden", "ck.pt", "--config", "c.yml", "-o", ".", "--force"],
                                          "is the input file"),
    "init over its config": (["init", "c.yml", "--config", "c.yml", "--force"], "is the input file c.yml"),
    "init existing": (["init", "ck.pt"], "already exists"),
    # half-written: every output is checked before work
    "lower --report in a missing dir": (["lower", "ck.pt", "--config", "c.yml", "-o", "new.onnx", "--report",
                                         "nodir/r.json"], "directory nodir does not exist"),
    "lower --report a directory": (["lower", "ck.pt", "--config", "c.yml", "-o", "new.onnx", "--report", "keep",
                                    "--force"], "is a directory"),
    # limits, from estimates before allocating
    "init num_channels 1e6": (["init", "x.pt", "--config", "huge_channels.yml"], "needs about"),
    "lower num_res_blocks 1e5": (["lower", "ck.pt", "--config", "huge_blocks.yml", "-o", "a.onnx"], "needs about"),
    "init diffusion_steps 1e9": (["init", "x.pt", "--config", "huge_steps.yml"], "diffusion_steps: at most"),
    "lower diffusion_steps 1e9 respaced": (["lower", "ck.pt", "--config", "huge_steps_respaced.yml", "-o", "a.onnx"],
                                           "diffusion_steps: at most"),
    "init 200k-step schedule": (["init", "x.pt", "--config", "all_steps.yml"], "keeps 200,000"),
    "check a 200k-entry metadata schedule": (["check", "long.onnx", "--model", "ck.pt"], "at most 100,000"),
    "check x of 40000x40000": (["check", "vast.onnx", "--model", "ck.pt"], "needs about"),
    "check batch 100000": (["check", "batch.onnx", "--model", "ck.pt"], "needs about"),
    "sample a 40000-px config": (["sample", "bigimage.onnx", *SAMPLE, "-o", "r.png"], "needs about"),
    "sample 6 channels for 3": (["sample", "six.onnx", *SAMPLE, "-o", "r.png"], "expected [N, 3 or 1, 32, 32]"),
    "sample --jump-n-sample 1e8": (["sample", "m.onnx", *SAMPLE, "-o", "r.png", "--jump-length", "1",
                                    "--jump-n-sample", "100000000"], "model calls"),
    # untrusted ONNX: external data only inside the model's folder
    "external data ../../etc/passwd": (["check", "ext-dotdot.onnx", "--model", "ck.pt"], "not a relative path"),
    "external data /etc/passwd": (["check", "ext-absolute.onnx", "--model", "ck.pt"], "not a relative path"),
    "external data /proc": (["check", "ext-proc.onnx", "--model", "ck.pt"], "not a relative path"),
    "external data /dev/zero": (["check", "ext-dev.onnx", "--model", "ck.pt"], "not a relative path"),
    "external data missing": (["check", "ext-missing.onnx", "--model", "ck.pt"], "is missing"),
    "external data through a symlink out": (["check", "ext-link.onnx", "--model", "ck.pt"], "leads outside"),
    "sample external data outside": (["sample", "ext-dotdot.onnx", *SAMPLE, "-o", "r.png"], "not a relative path"),
    # checkpoint tensors no model loads: one line naming the tensor
    "a sparse checkpoint tensor": (["lower", "sparse.pt", "--config", "c.yml", "-o", "a.onnx"], "not a dense tensor"),
    "a meta checkpoint tensor": (["lower", "meta.pt", "--config", "c.yml", "-o", "a.onnx"], "is a meta tensor"),
    "a float8 checkpoint tensor": (["check", "m.onnx", "--model", "float8.pt"], "is float8_e4m3fn"),
    "a 300-character output name": (["lower", "ck.pt", "--config", "c.yml", "-o", "a" * 300 + ".onnx"],
                                    "File name too long"),
    # fxpass metadata parsed strictly
    "check timesteps as strings": (["check", "strings.onnx", "--model", "ck.pt"], "must list non-negative integers"),
    "sample timesteps as strings": (["sample", "strings.onnx", *SAMPLE, "-o", "r.png"],
                                    "must list non-negative integers"),
    "check config missing a key": (["check", "nokey.onnx", "--model", "ck.pt"], "missing key 'learn_sigma'"),
    "sample config missing a key": (["sample", "nokey.onnx", *SAMPLE, "-o", "r.png"], "missing key 'learn_sigma'"),
    "check config with an unknown key": (["check", "badkey.onnx", "--model", "ck.pt"], "unknown model key 'colour'"),
    "init --seed 10**23": (["init", "x.pt", "--seed", str(10**23)], None),
    # sample --images: the output directory never among the inputs, nothing made before the checks pass
    "sample --images -o inside the images": (["sample", "m.onnx", "--images", "keep", "--mask", "mask.png", "-o",
                                              "keep/out"], "refusing to write among the inputs"),
    "sample --images -o the images": (["sample", "m.onnx", "--images", "keep", "--mask", "mask.png", "-o", "keep"],
                                      "refusing to overwrite an input"),
    "sample --images -o a file": (["sample", "m.onnx", "--images", "keep", "--mask", "mask.png", "-o", "existing.png"],
                                  "exists and is not a directory"),
    "sample --images a file": (["sample", "m.onnx", "--images", "img.png", "--mask", "mask.png", "-o", "out"],
                               "not a directory"),
    "sample --images without images": (["sample", "m.onnx", "--images", "keep", "--mask", "mask.png", "-o", "out"],
                                       "no images"),
}


@pytest.mark.parametrize("argv, words", list(CASES.values()), ids=list(CASES))
def test_hostile_case(workspace, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(workspace)
    before = _snapshot(workspace)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2 with its own message
        code = exc.code
    err = capsys.readouterr().err
    assert code not in (0, None), err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "internal error" not in err and "Traceback" not in err
    if words is not None:
        assert len(lines) == 1 and words in lines[0], err
    assert _snapshot(workspace) == before


def test_a_custom_op_is_an_error_row_not_a_crash(workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    before = _snapshot(workspace)
    code = main(["check", "custom.onnx", "--model", "ck.pt"])
    captured = capsys.readouterr()
    assert code == 1 and "onnxrt-cpu: error:" in captured.out and "internal error" not in captured.err + captured.out
    assert _snapshot(workspace) == before
