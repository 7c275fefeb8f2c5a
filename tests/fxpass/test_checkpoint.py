"""fxpass.checkpoint: safe loading (weights only), state-dict shapes, mismatch reports, seeded init, atomic writes."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fxpass
from fxpass.checkpoint import extract_state_dict, init_model, load_model, save_checkpoint
from fxpass.config import build_model
from fxpass.errors import FxpassError
from fxpass.fileio import atomic_write_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


class CodePayload:
    """A pickle whose loading would run code: unpickling calls ``open(marker, "w")``, creating the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _error(path, config, **kw) -> str:
    with pytest.raises(FxpassError) as info:
        load_model(path, config, **kw)
    text = str(info.value)
    assert "\n" not in text
    return text


def _same_weights(model: nn.Module, state: dict) -> None:
    got = model.state_dict()
    assert list(got) == list(state)
    for key, value in state.items():
        assert torch.equal(got[key], value.float()), key


# ---- loading what we wrote -----------------------------------------------------------------------
def test_load_model_returns_the_weights_in_eval_mode_float32(small_ckpt, small_cfg, small_state):
    model = load_model(small_ckpt, small_cfg)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    _same_weights(model, small_state)
    _same_weights(model, init_model(small_cfg, seed=0).state_dict())


def test_config_may_be_a_yaml_path(small_ckpt, small_yaml, small_state):
    _same_weights(load_model(small_ckpt, small_yaml), small_state)
    _same_weights(load_model(str(small_ckpt), str(small_yaml)), small_state)


def test_package_exports_load_model():
    assert fxpass.load_model is load_model
    assert fxpass.init_model is init_model and fxpass.save_checkpoint is save_checkpoint


def test_default_config_is_camus(small_ckpt):
    text = _error(small_ckpt, None)
    assert text.startswith(f"{small_ckpt}: checkpoint does not match the config")
    assert "num_channels: checkpoint has 32, config says 64" in text


def test_reads_with_weights_only(monkeypatch, small_ckpt, small_cfg):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_model(small_ckpt, small_cfg)
    assert calls and all(c.get("weights_only") is True for c in calls)


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: {"state_dict": sd}, id="state_dict"),
        pytest.param(lambda sd: {"model": sd}, id="model"),
        pytest.param(lambda sd: {"ema": sd}, id="ema"),
        pytest.param(lambda sd: {"model_state_dict": sd, "epoch": 7, "step": torch.tensor(3)}, id="with-extras"),
        pytest.param(lambda sd: OrderedDict(("module." + k, v) for k, v in sd.items()), id="module-prefix"),
        pytest.param(lambda sd: {"state_dict": {"module.module." + k: v for k, v in sd.items()}}, id="nested-ddp"),
        pytest.param(lambda sd: {"checkpoint": 1, "model": {"state_dict": sd}}, id="twice-nested"),
    ],
)
def test_nested_and_prefixed_state_dicts(tmp_path, small_cfg, small_state, wrap):
    path = tmp_path / "wrapped.pt"
    torch.save(wrap(small_state), path)
    _same_weights(load_model(path, small_cfg), small_state)


def test_legacy_torch_save_format(tmp_path, small_cfg, small_state):
    path = tmp_path / "legacy.pt"
    torch.save(small_state, path, _use_new_zipfile_serialization=False)
    _same_weights(load_model(path, small_cfg), small_state)


def test_float16_checkpoint_loads_as_float32(tmp_path, small_cfg, small_state):
    path = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in small_state.items()}, path)
    model = load_model(path, small_cfg)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    torch.testing.assert_close(model.out[2].weight, small_state["out.2.weight"].half().float())


def test_extract_state_dict_from_a_module(small_cfg):
    model = build_model(small_cfg)
    assert list(extract_state_dict(model)) == list(model.state_dict())
    assert list(extract_state_dict({"model": model})) == list(model.state_dict())


# ---- pickles that would run code -------------------------------------------------------------------
def test_pickled_module_is_refused_unless_trusted(tmp_path, small_cfg, small_state):
    path = tmp_path / "module.pt"
    model = load_model(_saved(tmp_path, small_state), small_cfg)
    torch.save(model, path)
    text = _error(path, small_cfg)
    assert text.startswith(f"{path}: refused: loading this pickle would import and run code")
    assert "fxpass.models.unet.UNetModel" in text and "--trust-pickle" in text

    trusted = load_model(path, small_cfg, trust_pickle=True)
    assert isinstance(trusted, nn.Module) and not trusted.training
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([4])
    with torch.no_grad():
        torch.testing.assert_close(trusted(x, t), model(x, t))


def test_trusted_pickle_holding_a_module_under_model(tmp_path, small_cfg, small_state):
    path = tmp_path / "wrapped_module.pt"
    torch.save({"model": load_model(_saved(tmp_path, small_state), small_cfg), "epoch": 1}, path)
    _error(path, small_cfg)
    _same_weights(load_model(path, small_cfg, trust_pickle=True), small_state)


def _saved(tmp_path, state) -> Path:
    path = tmp_path / "plain.pt"
    if not path.exists():
        torch.save(state, path)
    return path


def test_payload_really_runs_when_unpickled(tmp_path):
    # the control for the tests below: plain pickle would run the payload
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(CodePayload(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize(
    "write, fragment",
    [
        (lambda p, obj: torch.save({"weights": obj}, p), "refused: loading this pickle would import and run code"),
        (lambda p, obj: torch.save({"w": obj}, p, _use_new_zipfile_serialization=False),
         "refused: loading this pickle would import and run code"),
        (lambda p, obj: p.write_bytes(pickle.dumps({"w": obj}, protocol=2)),
         "refused: loading this pickle would import and run code"),
        (lambda p, obj: p.write_bytes(pickle.dumps({"w": obj}, protocol=4)),
         "not a readable checkpoint (weights-only loading stopped at an unsupported pickle instruction"),
        (lambda p, obj: p.write_bytes(pickle.dumps({"w": obj}, protocol=0)), "not a PyTorch checkpoint"),
    ],
    ids=["torch-zip", "torch-legacy", "pickle-2", "pickle-4", "pickle-0"],
)
def test_code_in_a_pickle_never_runs(tmp_path, small_cfg, write, fragment):
    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / "evil.pt"
    write(path, CodePayload(marker))
    text = _error(path, small_cfg)
    assert text.startswith(f"{path}: ") and fragment in text
    if "refused" in fragment:
        assert "(it references io.open)" in text and "--trust-pickle" in text
    assert not marker.exists()


# ---- another config's checkpoint -------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, hints",
    [
        ({"num_channels": 64}, ["num_channels: checkpoint has 64, config says 32",
                                "shape mismatch time_embed.0.weight (256, 64) vs (128, 32)"]),
        ({"learn_sigma": False}, ["learn_sigma: checkpoint has false, config says true",
                                  "shape mismatch out.2.weight (3, 32, 3, 3) vs (6, 32, 3, 3); "
                                  "out.2.bias (3,) vs (6,)"]),
        ({"class_cond": True}, ["class_cond: checkpoint has true, config says false", "unexpected label_emb.weight"]),
        ({"use_scale_shift_norm": False}, ["use_scale_shift_norm: checkpoint has false, config says true"]),
        ({"resblock_updown": True}, ["resblock_updown: checkpoint has true, config says false"]),
        ({"num_res_blocks": 2}, ["num_res_blocks/channel_mult/image_size: checkpoint has 12 input blocks, "
                                 "config gives 8"]),
        ({"attention_resolutions": "16"}, ["attention_resolutions: checkpoint has 4 attention blocks, "
                                           "config gives 7"]),
    ],
)
def test_checkpoint_of_another_config_names_keys_and_flags(tmp_path, small_cfg, changes, hints):
    path = tmp_path / "other.pt"
    torch.save(build_model(small_cfg.replace(**changes)).state_dict(), path)
    text = _error(path, small_cfg)
    assert text.startswith(f"{path}: checkpoint does not match the config: ")
    for hint in hints:
        assert hint in text


def test_missing_and_unexpected_keys(tmp_path, small_cfg, small_state):
    missing = tmp_path / "missing.pt"
    torch.save({k: v for k, v in small_state.items() if k != "out.2.bias"}, missing)
    assert _error(missing, small_cfg) == f"{missing}: checkpoint does not match the config: missing out.2.bias"
    extra = tmp_path / "extra.pt"
    torch.save({**small_state, "extra.weight": torch.zeros(1)}, extra)
    assert _error(extra, small_cfg) == f"{extra}: checkpoint does not match the config: unexpected extra.weight"


def test_integer_tensor_is_refused(tmp_path, small_cfg, small_state):
    path = tmp_path / "ints.pt"
    torch.save({**small_state, "out.2.bias": torch.zeros(6, dtype=torch.int64)}, path)
    assert _error(path, small_cfg) == f"{path}: tensor out.2.bias has dtype torch.int64, expected floating point"


# ---- files that are not checkpoints ------------------------------------------------------------------
def _truncated(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p, ck: None, "{p}: no such file"),
        (lambda p, ck: p.write_bytes(b""), "{p}: file is empty"),
        (lambda p, ck: p.write_bytes(b"\x13" + bytes(range(256)) * 16),
         "{p}: not a PyTorch checkpoint (neither a zip archive nor a pickle)"),
        (lambda p, ck: p.write_text("this is a text file\n"),
         "{p}: not a PyTorch checkpoint (neither a zip archive nor a pickle)"),
        (lambda p, ck: _truncated(ck, p),
         "{p}: truncated or corrupt checkpoint (the zip archive has no central directory)"),
        (lambda p, ck: p.write_bytes(b"\x80\x02" + b"\xd0" * 64),
         "{p}: not a readable checkpoint (weights-only loading stopped at an unsupported pickle instruction"),
        (lambda p, ck: p.write_bytes(b"PK\x03\x04" + b"\x00" * 60), "{p}: truncated or corrupt checkpoint"),
        (lambda p, ck: torch.save([1, 2, 3], p), "{p}: holds no state dict"),
        (lambda p, ck: torch.save({"epoch": 3}, p), "{p}: holds no state dict"),
        (lambda p, ck: torch.save({}, p), "{p}: holds no state dict"),
    ],
    ids=["missing", "empty", "random-bytes", "text", "truncated-zip", "garbage-pickle", "broken-zip", "a-list",
         "no-tensors", "empty-dict"],
)
def test_not_a_checkpoint(tmp_path, small_ckpt, small_cfg, make, expected):
    path = tmp_path / "bad.pt"
    make(path, small_ckpt)
    text = _error(path, small_cfg)
    assert text.startswith(expected.format(p=path))


def test_truncated_legacy_checkpoint(tmp_path, small_cfg, small_state):
    legacy = tmp_path / "legacy.pt"
    torch.save(small_state, legacy, _use_new_zipfile_serialization=False)
    path = tmp_path / "cut.pt"
    _truncated(legacy, path)
    assert _error(path, small_cfg).startswith(f"{path}: truncated or corrupt checkpoint (unexpected EOF")


def test_zip_that_is_not_a_torch_checkpoint(tmp_path, small_cfg):
    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    assert _error(path, small_cfg).startswith(f"{path}: not a readable checkpoint (")


def test_directory_is_not_a_checkpoint(tmp_path, small_cfg):
    assert _error(tmp_path, small_cfg) == f"{tmp_path}: is a directory, expected a checkpoint file"


def test_no_torch_warning_leaks(tmp_path, small_cfg, recwarn):
    path = tmp_path / "p4.pt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    _error(path, small_cfg)
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


# ---- seeded init ---------------------------------------------------------------------------------
def test_init_is_deterministic_per_seed(small_cfg):
    a, b, c = (init_model(small_cfg, seed=s).state_dict() for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(not torch.equal(a[k], c[k]) for k in a if a[k].ndim > 1) == sum(1 for k in a if a[k].ndim > 1)


def test_init_leaves_the_global_rng_alone(small_cfg):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    init_model(small_cfg, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_init_output_is_far_from_zero(small_cfg):
    model = init_model(small_cfg, seed=0)
    assert not model.training
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert all(m.weight.any() for m in convs)  # guided-diffusion's zero-initialised convs are re-drawn
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, generator=g), torch.tensor([10, 900]))
    assert out.std() > 0.05, f"output std {out.std():.3g}"
    assert torch.isfinite(out).all()


# ---- writing -------------------------------------------------------------------------------------
def test_save_checkpoint_writes_a_plain_float32_state_dict(tmp_path, small_cfg):
    model = build_model(small_cfg, fp16=True)
    path = tmp_path / "out.pt"
    save_checkpoint(model, path)
    state = torch.load(path, weights_only=True)
    assert isinstance(state, OrderedDict) and list(state) == list(model.state_dict())
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert os.listdir(tmp_path) == ["out.pt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.pt"
    path.write_bytes(b"old")

    def fail(fh):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(FxpassError, match="out.pt: cannot write \\(No space left on device\\)"):
        atomic_write_bytes(path, fail)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.pt"]

    def interrupted(fh):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, interrupted)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.pt"]


def test_write_to_a_missing_directory_or_under_a_file(tmp_path):
    with pytest.raises(FxpassError) as info:
        atomic_write_bytes(tmp_path / "nodir" / "out.pt", lambda fh: fh.write(b"x"))
    assert str(info.value) == f"{tmp_path / 'nodir' / 'out.pt'}: directory {tmp_path / 'nodir'} does not exist"
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    with pytest.raises(FxpassError) as info:
        atomic_write_bytes(regular / "out.pt", lambda fh: fh.write(b"x"))
    assert str(info.value) == f"{regular / 'out.pt'}: directory {regular} is not a directory"
    with pytest.raises(FxpassError, match="is a directory"):
        atomic_write_bytes(tmp_path, lambda fh: fh.write(b"x"))
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_init_model_gives_group_norms_trained_like_affine(small_cfg):
    """Scale near 1 and bias near 0, but never exactly: folding passes must not be able to skip them."""
    norms = [m for m in init_model(small_cfg, seed=0).modules() if isinstance(m, nn.GroupNorm)]
    assert norms
    for norm in norms:
        scale, bias = norm.weight.detach(), norm.bias.detach()
        assert not torch.all(scale == 1) and not torch.all(bias == 0)
        assert float((scale - 1).abs().max()) < 0.6 and float(bias.abs().max()) < 0.6  # 0.1·N(0,1): 6 sigma
    again = [m for m in init_model(small_cfg, seed=0).modules() if isinstance(m, nn.GroupNorm)]
    assert all(torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) for a, b in zip(norms, again))
