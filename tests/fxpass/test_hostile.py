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


def _alias_bomb(key: str, levels: int = 9) -> str:
    """YAML whose ``key`` holds 9 aliases of 9 aliases … of a list (9**10 items once expanded; a few hundred bytes)."""
    lines = [f"{key}:", '  a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, levels + 1):
        name, prev = chr(ord("a") + i), chr(ord("a") + i - 1)
        lines.append(f"  {name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _onnx_with(path: Path, base: onnx.ModelProto, *, props=None, x_shape=None, external=None, op=None,
               output_name=None) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(base)
    if output_name:
        old = model.graph.output[0].name
        model.graph.output[0].name = output_name
        for node in model.graph.node:
            node.output[:] = [output_name if o == old else o for o in node.output]
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
    deep = "[" * 100_000 + "]" * 100_000
    (root / "deep.yml").write_text(f"image_size: {deep}\n")
    (root / "deep.json").write_text(deep)
    (root / "bomb.yml").write_text(_alias_bomb("image_size") + yaml.safe_dump({k: v for k, v in cfg.items()
                                                                                 if k != "image_size"}))
    (root / "deepgold").mkdir()
    for name in ("inputs", "outputs"):
        (root / "deepgold" / f"{name}.json").write_text("[]")
    (root / "deepgold" / "manifest.json").write_text(deep)
    _onnx_with(root / "deepmeta.onnx", base, props={"fxpass.config": deep})
    _onnx_with(root / "renamed.onnx", base, output_name="renamed")
    _onnx_with(root / "baddigest.onnx", base, props={"fxpass.float32_graph": "md5:0"})
    steps = json.loads({p.key: p.value for p in base.metadata_props}["fxpass.timesteps"])
    for name, props in {"cosine": {"fxpass.config": json.dumps({**meta_cfg, "noise_schedule": "cosine"})},
                        "respaced5": {"fxpass.config": json.dumps({**meta_cfg, "timestep_respacing": "5"})},
                        "steps1000": {"fxpass.config": json.dumps({**meta_cfg, "diffusion_steps": 1000})},
                        "duplicate": {"fxpass.timesteps": json.dumps([steps[0], *steps[:-1]]),
                                      "fxpass.model_timesteps": json.dumps([steps[0], *steps[:-1]])}}.items():
        _onnx_with(root / f"edited-{name}.onnx", base, props=props)
    _onnx_with(root / "ext-nul.onnx", base, external="a\x00b")
    _onnx_with(root / "ext-loop.onnx", base, external="loop1")
    from user_models import LazyAttributeNet, TinyTimeNet

    torch.save(TinyTimeNet().state_dict(), root / "timenet.pt")
    torch.save(LazyAttributeNet().state_dict(), root / "lazy.pt")
    for name, location in {"dotdot": "../../etc/passwd", "absolute": "/etc/passwd", "proc": "/proc/self/mem",
                           "dev": "/dev/zero", "missing": "weights.bin", "link": "link.bin"}.items():
        _onnx_with(root / f"ext-{name}.onnx", base, external=location)
    return root


@pytest.fixture
def workspace(tmp_path, originals):
    for entry in originals.iterdir():
        if entry.is_dir():
            shutil.copytree(entry, tmp_path / entry.name)
        elif entry.stat().st_size > 1 << 20:  # the checkpoints and ONNX variants: linked, not copied (141 MB a
            os.link(entry, tmp_path / entry.name)  # test); a command that changed one would still fail the snapshot
        else:
            shutil.copy2(entry, tmp_path / entry.name)
    (tmp_path / "link.pt").symlink_to(tmp_path / "ck.pt")
    os.link(tmp_path / "ck.pt", tmp_path / "hard.pt")
    (tmp_path / "link.bin").symlink_to("/etc/passwd")
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
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
USER = ["--diffusion-steps", "100", "--timestep-respacing", "10", "--image-size", "16"]
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
    # issue #26: what still ended as an internal error, a kill or a raw exception
    "a config nested 100,000 deep": (["lower", "ck.pt", "--config", "deep.yml", "-o", "a.onnx"],
                                     "deep.yml: not a readable YAML file (nested too deeply)"),
    "a YAML alias bomb": (["lower", "ck.pt", "--config", "bomb.yml", "-o", "a.onnx"], "image_size: must be an integer"),
    "--model-kwargs nested deep": (["lower", "timenet.pt", "--model-class", "user_models:TinyTimeNet", "--model-kwargs",
                                    "[" * 5000 + "]" * 5000, "-o", "a.onnx"], "--model-kwargs: not valid JSON (nested"),
    "a precision plan nested deep": (["lower", "ck.pt", "--config", "c.yml", "--precision", "int8",
                                      "--calibrate-on-samples", "--precision-plan", "deep.json", "-o", "a.onnx"],
                                     "deep.json: not a precision plan (not JSON: nested too deeply)"),
    "check metadata nested deep": (["check", "deepmeta.onnx", "--model", "ck.pt"], "is not valid JSON (nested"),
    "sample metadata nested deep": (["sample", "deepmeta.onnx", *SAMPLE, "-o", "r.png"], "is not valid JSON (nested"),
    "a golden manifest nested deep": (["check", "m.onnx", "--golden", "deepgold"], "not valid JSON (nested"),
    "external data named with a NUL": (["check", "ext-nul.onnx", "--model", "ck.pt"], "not a relative path"),
    "external data through a link loop": (["check", "ext-loop.onnx", "--model", "ck.pt"], "loop of symbolic links"),
    "check: noise_schedule edited to cosine": (["check", "edited-cosine.onnx", "--model", "ck.pt"],
                                               "says noise_schedule 'cosine', the lowering request it records says"),
    "sample: noise_schedule edited to cosine": (["sample", "edited-cosine.onnx", *SAMPLE, "-o", "r.png"],
                                                "the metadata was changed after lowering"),
    "golden: noise_schedule edited to cosine": (["golden", "ck.pt", "--onnx", "edited-cosine.onnx", "-o", "g"],
                                                "the metadata was changed after lowering"),
    "check: respacing edited to 5": (["check", "edited-respaced5.onnx", "--model", "ck.pt"],
                                     "is not the respaced schedule of its fxpass.config"),
    "check: diffusion_steps edited to 1000": (["check", "edited-steps1000.onnx", "--model", "ck.pt"],
                                              "is not the respaced schedule of its fxpass.config"),
    "check: a timestep duplicated": (["check", "edited-duplicate.onnx", "--model", "ck.pt"],
                                     "is not the respaced schedule of its fxpass.config"),
    "a float32-graph digest that is not one": (["check", "baddigest.onnx", "--model", "ck.pt"],
                                               "metadata fxpass.float32_graph is not a sha256:HEX digest"),
    "check a renamed graph output": (["check", "renamed.onnx", "--model", "ck.pt"], "has no output named out"),
    "sample a renamed graph output": (["sample", "renamed.onnx", *SAMPLE, "-o", "r.png"], "expected out"),
    "--format mlpackage -o x.onnx": (["lower", "ck.pt", "--config", "c.yml", "--format", "mlpackage", "-o", "x.onnx"],
                                     "--format mlpackage writes a .mlpackage file"),
    "-o x.tflite without --format": (["lower", "ck.pt", "--config", "c.yml", "-o", "x.tflite"],
                                     "pass --format tflite"),
    "--input of a million images": (["lower", "timenet.pt", "--model-class", "user_models:TinyTimeNet", *USER,
                                   "--input", "x=1000000,3,16,16", "-o", "a.onnx"], "needs about"),
    "--input with a 20-digit dimension": (["lower", "timenet.pt", "--model-class", "user_models:TinyTimeNet", *USER,
                                           "--input", "x=99999999999999999999,3,16,16", "-o", "a.onnx"], "needs about"),
    "an attribute no tensor has": (["lower", "lazy.pt", "--model-class", "user_models:LazyAttributeNet", *USER,
                                    "-o", "a.onnx"], "`x.not_a_tensor_attribute`: fails on the example inputs"),
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
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("✓ ")]  # progress lines
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


def test_a_model_onnx_runtime_cannot_load_is_said_without_its_error_codes(workspace, capsys, monkeypatch):
    """x declared float16 in front of float32 weights: ONNX Runtime's "[ONNXRuntimeError] : 1 : FAIL : Load model
    from … failed:" prefix is left out of the row's reason."""
    monkeypatch.chdir(workspace)
    model = onnx.load("m.onnx")
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(model, "half-x.onnx")
    before = _snapshot(workspace)
    assert main(["check", "half-x.onnx", "--model", "ck.pt"]) == 1
    out = capsys.readouterr().out
    assert "onnxrt-cpu: error: Type Error: Type parameter (T) of Optype (Conv)" in out, out
    assert "[ONNXRuntimeError]" not in out and "Load model from" not in out
    assert _snapshot(workspace) == before


def _fxpass(cwd: Path, *argv: str, pythonpath: str | None = None):
    """``python -m fxpass ARGV`` in its own process (what ends or replaces a process must not end the test's)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else dict(os.environ)
    # -P: the working directory is not put first on sys.path, as for the installed ``fxpass`` command
    return subprocess.run([sys.executable, "-P", "-m", "fxpass", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_os_exit_in_the_model_is_said_not_a_silent_success(workspace):
    """The model's forward calls os._exit(0): the process used to end at once with exit 0, nothing said."""
    from user_models import ProcessExitNet
    import torch

    torch.save(ProcessExitNet().state_dict(), workspace / "exit.pt")
    here = str(Path(__file__).parent)
    done = _fxpass(workspace, "lower", "exit.pt", "--model-class", "user_models:ProcessExitNet", *USER, "-o",
                   "a.onnx", pythonpath=here)
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("✓ ")]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "called os._exit(0)" in lines[0] and "nothing written" in lines[0], done.stderr
    assert not (workspace / "a.onnx").exists()


@pytest.mark.slow
def test_files_named_like_fxpass_modules_in_the_working_directory_never_run(workspace):
    """--model-class imports from the working directory, which used to go first on sys.path: a file there named
    like a module fxpass imports ran instead of it.  Now the directory goes last: they are never imported."""
    import shutil as _shutil

    _shutil.copy(Path(__file__).parent / "user_models.py", workspace / "my_models.py")
    import torch
    from user_models import TinyTimeNet

    torch.save(TinyTimeNet().state_dict(), workspace / "tt.pt")
    names = ("onnxslim", "onnxscript", "polygraphy", "onnx_graphsurgeon", "onnxruntime", "sympy", "onnx_ir", "rich",
             "filelock", "networkx", "jinja2", "coremltools", "executorch")
    for name in names:
        (workspace / f"{name}.py").write_text("import sys\nsys.stderr.write('RAN ' + __name__ + '\\n')\n"
                                              "raise SystemExit(9)\n")
    done = _fxpass(workspace, "lower", "tt.pt", "--model-class", "my_models:TinyTimeNet", *USER, "-o", "tt.onnx")
    assert done.returncode == 0 and "RAN " not in done.stderr + done.stdout, done.stderr
    assert (workspace / "tt.onnx").is_file()


def test_a_100_gib_onnx_file_is_refused_by_its_size(workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    with open("big.onnx", "wb") as fh:  # sparse: no disk space used
        fh.truncate(100 * 2**30)
    for argv in (["check", "big.onnx", "--model", "ck.pt"], ["sample", "big.onnx", *SAMPLE, "-o", "r.png"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "100.0 GiB, not an ONNX file" in err, err


def test_an_error_line_longer_than_800_characters_loses_its_middle(tmp_path, capsys):
    name = "m" * 3000
    assert main(["lower", str(tmp_path / "x.pt"), "--model-class", f"{name}:Net", "-o", str(tmp_path / "a.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and len(err) <= 850, len(err)
    assert err.startswith("fxpass: error: ") and "characters left out; --debug shows all" in err


def test_a_killed_runs_scratch_folder_is_removed_by_the_next_run(tmp_path, monkeypatch):
    """SIGKILL leaves a run's temporaries (int8 calibration, .ort/.mlpackage converters) behind: every command
    makes them in its own fxpass-run-<pid>-* folder, and the next command removes those whose process is gone."""
    import subprocess
    import sys
    import tempfile

    from fxpass.scratch import scratch_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f"fxpass-run-{dead.stdout.strip()}-abcd1234"
    (gone / "fxpass-int8-x").mkdir(parents=True)
    (gone / "fxpass-int8-x" / "calib.onnx").write_bytes(b"0" * 100)
    alive = tmp_path / f"fxpass-run-{os.getppid()}-live"  # a running process's (pytest's parent)
    alive.mkdir()
    other = tmp_path / "fxpass-run-notes"  # not the pattern: never touched
    other.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with scratch_folder() as folder:
        assert tempfile.gettempdir() == str(folder) and folder.parent == tmp_path
        assert Path(tempfile.mkdtemp(prefix="fxpass-ort-")).parent == folder
        assert not gone.exists() and alive.is_dir() and other.is_dir()
    assert not folder.exists() and tempfile.gettempdir() == str(tmp_path)


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_two_runs_racing_for_one_new_mobile_format_output_one_loses(tmp_path, kind):
    """The mobile-format writers (.ort/.pte/.tflite files, the .mlpackage directory) used to replace whatever had
    appeared meanwhile: without --force the output is now put in place only where nothing exists."""
    from fxpass.errors import FxpassError
    from fxpass.fileio import exclusive_outputs, staged_path

    out = tmp_path / ("m.tflite" if kind == "file" else "m.mlpackage")
    with pytest.raises(FxpassError, match="already exists"):
        with exclusive_outputs(), staged_path(out) as staged:
            staged.write_bytes(b"mine") if kind == "file" else (staged.mkdir(), (staged / "w.bin").write_bytes(b"x"))
            out.mkdir() if kind == "directory" else out.write_bytes(b"the other run's")  # the other run won
    assert (out.read_bytes() == b"the other run's") if kind == "file" else list(out.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporaries left
    fresh = tmp_path / ("n.tflite" if kind == "file" else "n.mlpackage")
    with exclusive_outputs(), staged_path(fresh) as staged:
        staged.write_bytes(b"new") if kind == "file" else (staged.mkdir(), (staged / "w.bin").write_bytes(b"x"))
    assert (fresh.read_bytes() == b"new") if kind == "file" else (fresh / "w.bin").read_bytes() == b"x"


def test_a_temporary_directory_that_cannot_be_written_leaves_tempfile_as_it_was(monkeypatch):
    import tempfile

    from fxpass.scratch import scratch_folder

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    before = tempfile.tempdir
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with scratch_folder() as folder:
        assert folder is None and tempfile.tempdir == before


def test_an_exclusive_directory_output_that_cannot_be_moved_in_leaves_nothing(tmp_path, monkeypatch):
    """The empty directory claimed for a new .mlpackage is taken back when the rename onto it fails."""
    from fxpass.errors import FxpassError
    from fxpass.fileio import exclusive_outputs, staged_path

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    out = tmp_path / "m.mlpackage"
    with pytest.raises(FxpassError, match="cannot write"):
        with exclusive_outputs(), staged_path(out) as staged:
            staged.mkdir()
            monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
