"""Shared fixtures: a small U-Net config (fast forwards), its YAML file and a saved seeded checkpoint.

Here rather than in tests/conftest.py: a conftest there puts tests/ on sys.path, where tests/fxpass/ (no
__init__.py) then shadows the editable-installed fxpass package as a namespace package under plain `pytest`.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from check_helpers import PERTURBATION, scale_output_conv_weight

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one pytest-xdist worker per core (pyproject's addopts): each computes on one thread, and so do the CLI
    # subprocesses it starts (they inherit OMP_NUM_THREADS), so the workers do not oversubscribe the cores
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

#: session fixtures too expensive to build on every worker: the tests using one run on one worker
#: (pytest-xdist's loadgroup distribution)
_SHARED_FIXTURES = {"camus_seed0": "camus-seed0", "digits_onnx": "digits-reference", "local_ray": "local-ray",
                    "tiny_tflite": "tiny-tflite", "graphs": "equivalence-graphs", "ort_files": "check-mobile"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups to route the items
def pytest_collection_modifyitems(items):
    for item in items:
        group = next((g for name, g in _SHARED_FIXTURES.items() if name in getattr(item, "fixturenames", ())), None)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))

# Small enough that a forward takes milliseconds, big enough to have every kind of block:
# 32 px, channel_mult (1, 2, 2, 2), attention at 16 px and 8 px (downsample rates 2 and 4) plus the
# middle block, scale-shift norm and learned sigma as in CAMUS.
SMALL = {
    "image_size": 32,
    "num_channels": 32,
    "num_res_blocks": 1,
    "attention_resolutions": "16,8",
    "num_heads": 2,
    "diffusion_steps": 1000,
    "timestep_respacing": "50",
}


def _write_yaml(path: Path, values: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def write_yaml():
    """``write_yaml(path, values) -> path``: a RePaint-style YAML file of ``values``."""
    return _write_yaml


@pytest.fixture
def small_values() -> dict:
    """The small config as a fresh dict of YAML keys (tests may change it)."""
    return dict(SMALL)


@pytest.fixture(scope="session")
def small_cfg():
    from fxpass.config import from_dict

    return from_dict(SMALL)


@pytest.fixture(scope="session")
def small_yaml(tmp_path_factory) -> Path:
    """The small config as a YAML file, with sampler keys that must be ignored."""
    values = {**SMALL, "schedule_jump_params": {"t_T": 250, "jump_length": 10}, "name": "small", "use_kl": False}
    return _write_yaml(tmp_path_factory.mktemp("cfg") / "small.yml", values)


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory, small_cfg) -> Path:
    """A seeded random checkpoint (seed 0) of the small config, written by ``save_checkpoint``."""
    from fxpass.checkpoint import init_model, save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    save_checkpoint(init_model(small_cfg, seed=0), path)
    return path


@pytest.fixture(scope="session")
def small_state(small_ckpt):
    import torch

    return torch.load(small_ckpt, weights_only=True)


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread (small models are faster so; CI machines are shared)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- a tiny lowered model for the check / golden command tests ------------------------------------------
# Session-scoped and built once (lowering is the slow part, ~10-15 s on two cores).
# A 32 px U-Net with every kind of block (attention at 16 px and in the middle block, scale-shift norm,
# learned sigma) and a 10-step respaced schedule, so that a check over every t_index stays quick.
TINY = {
    "image_size": 32,
    "num_channels": 32,
    "num_res_blocks": 1,
    "attention_resolutions": "16",
    "num_heads": 2,
    "diffusion_steps": 100,
    "timestep_respacing": "10",
}


@pytest.fixture(scope="module")
def one_torch_thread_module():
    """One intra-op thread for these modules: the tiny model's forwards take milliseconds so, while
    several threads on a shared two-core machine can make each take seconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_yaml(tmp_path_factory) -> Path:
    import yaml

    path = tmp_path_factory.mktemp("tiny-cfg") / "tiny.yml"
    path.write_text(yaml.safe_dump(TINY, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from fxpass.checkpoint import init_model, save_checkpoint
    from fxpass.config import from_dict

    path = tmp_path_factory.mktemp("tiny-ckpt") / "tiny.pt"
    save_checkpoint(init_model(from_dict(TINY), seed=0), path)
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_ckpt) -> Path:
    """The tiny checkpoint lowered in table mode (fp32), config in its metadata."""
    from fxpass.checkpoint import load_model
    from fxpass.config import from_dict
    from fxpass.pipeline import lower

    import torch

    cfg = from_dict(TINY)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        proto = lower(load_model(tiny_ckpt, cfg), config=cfg)
    finally:
        torch.set_num_threads(before)
    path = tmp_path_factory.mktemp("tiny-onnx") / "tiny.onnx"
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_onnx_perturbed(tmp_path_factory, tiny_onnx) -> Path:
    """A copy of ``tiny_onnx`` with the output convolution's weight scaled by 1.001."""
    model = onnx.load(str(tiny_onnx))
    scale_output_conv_weight(model, PERTURBATION)
    path = tmp_path_factory.mktemp("tiny-bad") / "tiny-perturbed.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_golden(tmp_path_factory, tiny_ckpt, tiny_onnx) -> Path:
    """A golden set (t_index 0 and 9) for ``tiny_onnx``, written by ``fxpass golden`` on one torch thread, as the
    tests that recompute its outputs run (session fixtures are built before the modules' thread setting, and
    float32 sums differ in the last bits between thread counts)."""
    import torch

    from fxpass.cli import main

    path = tmp_path_factory.mktemp("tiny-golden") / "tiny-seed0"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["golden", str(tiny_ckpt), "-o", str(path), "--onnx", str(tiny_onnx), "--t-index", "0", "9"]) == 0
    finally:
        torch.set_num_threads(before)
    return path


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory):
    """``digits_onnx(precision="fp32") -> Path``: the trained reference (fxpass/reference) lowered in
    table mode, once per precision per session (about 8 s each, one thread)."""
    made: dict[str, Path] = {}

    def get(precision: str = "fp32") -> Path:
        if precision not in made:
            import torch

            from fxpass.checkpoint import load_model
            from fxpass.config import load_config
            from fxpass.pipeline import lower
            from fxpass.reference import CHECKPOINT, CONFIG

            cfg = load_config(CONFIG)
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                proto = lower(load_model(CHECKPOINT, cfg), config=cfg, precision=precision)
            finally:
                torch.set_num_threads(before)
            path = tmp_path_factory.mktemp("digits") / f"digits-{precision}.onnx"
            onnx.save(proto, str(path))
            made[precision] = path
        return made[precision]

    return get


@pytest.fixture(scope="session")
def camus_seed0(tmp_path_factory):
    """``fxpass init --seed 0`` and ``fxpass lower`` of the CAMUS model (the README's first command), in a
    subprocess, once per session: (checkpoint, ONNX, report) paths.  Tests reading it must not change it."""
    import subprocess
    import sys

    from fxpass.checkpoint import init_model, save_checkpoint
    from fxpass.config import CAMUS

    root = tmp_path_factory.mktemp("camus-seed0")
    ckpt, out, report = root / "camus.pt", root / "camus.onnx", root / "camus.json"
    save_checkpoint(init_model(CAMUS, seed=0), ckpt)
    proc = subprocess.run([sys.executable, "-m", "fxpass", "lower", str(ckpt), "-o", str(out), "--report", str(report)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for path in (ckpt, out, report):
        path.chmod(0o444)
    return ckpt, out, report
