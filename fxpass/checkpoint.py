"""Loading and writing checkpoints safely: ``torch.load(weights_only=True)``, clear errors."""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

from .config import CAMUS, ModelConfig, build_model
from .errors import FxpassError, first_line
from .fileio import atomic_write_bytes

_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "ema")


def _read_checkpoint(path: Path, trust_pickle: bool):
    if not path.exists():
        raise FxpassError(f"{path}: no such file")
    if path.is_dir():
        raise FxpassError(f"{path}: is a directory, expected a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise FxpassError(f"{path}: file is empty")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if path.suffix == ".safetensors":
        return _read_safetensors(path, size)
    is_zip = head.startswith(b"PK")
    if is_zip and not zipfile.is_zipfile(path):
        raise FxpassError(f"{path}: truncated or corrupt checkpoint (the zip archive has no central directory)")
    if not is_zip and not head.startswith(b"\x80"):
        raise FxpassError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols: not for people
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported global" in text or "weights_only" in text:
            found = re.search(r"(?:Unsupported global|GLOBAL)\s*:?\s*(?:GLOBAL\s+)?([\w.]+)", text)
            what = f" (it references {found.group(1)})" if found else ""
            operand = re.search(r"Unsupported operand \d+", text)
            if operand and not found:  # garbage after a pickle header, or a pickle protocol torch refuses
                raise FxpassError(
                    f"{path}: not a readable checkpoint (weights-only loading stopped at an unsupported pickle "
                    f"instruction: {operand.group(0)}); if it is a pickle you trust, pass --trust-pickle"
                ) from None
            raise FxpassError(
                f"{path}: refused: loading this pickle would import and run code{what}; "
                "fxpass loads weights only. If you trust the file, pass --trust-pickle"
            ) from None
        raise FxpassError(f"{path}: not a readable checkpoint ({first_line(exc)})") from None
    except (EOFError, RuntimeError, ValueError, OSError, zipfile.BadZipFile, KeyError, AttributeError,
            ImportError, TypeError, IndexError, UnicodeDecodeError, MemoryError) as exc:
        reason = first_line(exc)
        if ("central directory" in reason or isinstance(exc, EOFError) or "truncated" in reason
                or "unexpected EOF" in reason):
            raise FxpassError(f"{path}: truncated or corrupt checkpoint ({reason})") from None
        raise FxpassError(f"{path}: not a readable checkpoint ({reason})") from None


def _read_safetensors(path: Path, size: int) -> dict:
    """A safetensors file's tensors (no pickle: nothing in it runs); refused in one line where it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as exc:
        raise FxpassError(f"{path}: not a readable safetensors file ({first_line(exc)[:200]}; {size:,} bytes)") from None


def extract_state_dict(obj, path: Path | str = "checkpoint") -> "OrderedDict[str, torch.Tensor]":
    """The tensor mapping inside a loaded checkpoint: plain, nested, or ``module.``-prefixed."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for _ in range(3):
        if isinstance(obj, dict) and not _is_tensor_dict(obj):
            nested = next((obj[k] for k in _NESTED_KEYS if k in obj and isinstance(obj[k], (dict, nn.Module))), None)
            if nested is None:
                break
            obj = nested.state_dict() if isinstance(nested, nn.Module) else nested
    if not isinstance(obj, dict) or not _is_tensor_dict(obj):
        raise FxpassError(f"{path}: holds no state dict (expected a mapping of parameter names to tensors)")
    state = OrderedDict()
    for key, value in obj.items():
        while key.startswith("module."):
            key = key[len("module."):]
        state[key] = value
    _refuse_unusable(state, path)
    return state


#: weight dtypes a checkpoint may hold (a model computes in float32 after loading; integers are buffers)
USABLE_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                           torch.int16, torch.int8, torch.uint8, torch.bool})


def _refuse_unusable(state, path) -> None:
    """Tensors no model can load as weights, refused in one line naming the first: meta tensors (no data),
    sparse or other non-dense layouts, float8 / complex / quantized dtypes."""
    for name, t in state.items():
        if t.is_meta:
            raise FxpassError(f"{path}: tensor {name} is a meta tensor (a shape without data); save the real weights")
        if t.layout != torch.strided:
            raise FxpassError(f"{path}: tensor {name} is {str(t.layout).removeprefix('torch.')}, not a dense tensor; "
                              "save it with .to_dense()")
        if t.dtype not in USABLE_DTYPES:
            raise FxpassError(f"{path}: tensor {name} is {str(t.dtype).removeprefix('torch.')}, which fxpass does not "
                              "load (float32/16, bfloat16 or integer weights)")


def _is_tensor_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) for k in obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values()
    )


def infer_config_flags(state: dict) -> dict:
    """Config flags that the shapes of a guided-diffusion state dict pin down."""
    flags: dict = {}
    w0 = state.get("input_blocks.0.0.weight")
    if w0 is not None and w0.ndim == 4:
        flags["first_channels"] = int(w0.shape[0])
    out = state.get("out.2.weight")
    if out is not None:
        flags["learn_sigma"] = int(out.shape[0]) == 6
    temb = state.get("time_embed.0.weight")
    if temb is not None and temb.ndim == 2:  # Linear(num_channels, 4 * num_channels)
        flags["num_channels"] = int(temb.shape[1])
    elif w0 is not None and out is not None:
        flags["num_channels"] = int(out.shape[1])
    flags["class_cond"] = "label_emb.weight" in state
    emb = state.get("input_blocks.1.0.emb_layers.1.weight")
    conv = state.get("input_blocks.1.0.in_layers.2.weight")
    if emb is not None and conv is not None:
        flags["use_scale_shift_norm"] = int(emb.shape[0]) == 2 * int(conv.shape[0])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    if blocks:
        flags["input_blocks"] = max(blocks) + 1
    out_blocks = {int(m.group(1)) for k in state if (m := re.match(r"output_blocks\.(\d+)\.", k))}
    if out_blocks:
        flags["output_blocks"] = max(out_blocks) + 1
    flags["attention_blocks"] = sum(1 for k in state if k.endswith(".qkv.weight"))
    if blocks:
        flags["resblock_updown"] = not any(re.match(r"input_blocks\.\d+\.0\.op\.weight$", k) for k in state)
    return flags


def _describe_mismatch(state: dict, expected: dict, cfg: ModelConfig, path: Path | str) -> str:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    have = infer_config_flags(state)
    want = infer_config_flags(expected)
    hints = []
    for flag in ("num_channels", "learn_sigma", "class_cond", "use_scale_shift_norm", "resblock_updown"):
        if flag in have and flag in want and have[flag] != want[flag]:
            hints.append(f"{flag}: checkpoint has {_show(have[flag])}, config says {_show(getattr(cfg, flag))}")
    if have.get("input_blocks") != want.get("input_blocks") and "input_blocks" in have:
        hints.append(
            f"num_res_blocks/channel_mult/image_size: checkpoint has {have['input_blocks']} input blocks, "
            f"config gives {want.get('input_blocks')}"
        )
    if have.get("attention_blocks") != want.get("attention_blocks"):
        hints.append(
            f"attention_resolutions: checkpoint has {have['attention_blocks']} attention blocks, "
            f"config gives {want['attention_blocks']}"
        )
    parts = []
    if shapes:
        parts.append("shape mismatch " + "; ".join(shapes[:3]))
    if missing:
        parts.append("missing " + ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
    if unexpected:
        parts.append(
            "unexpected " + ", ".join(unexpected[:3]) + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else "")
        )
    hint = ("; probably: " + "; ".join(hints)) if hints else ""
    return f"{path}: checkpoint does not match the config: " + "; ".join(parts) + hint


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def first_nonfinite(tensors) -> tuple[str, str] | None:
    """(name, "NaN" / "Inf" / "NaN and Inf") of the first floating-point tensor of ``(name, tensor)``
    pairs that holds a non-finite value, or None."""
    for name, value in tensors:
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
            continue
        if bool(torch.isfinite(value).all()):
            continue
        nan, inf = bool(torch.isnan(value).any()), bool(torch.isinf(value).any())
        return name, "NaN and Inf" if nan and inf else ("NaN" if nan else "Inf")
    return None


def load_model(path: str | os.PathLike, config: ModelConfig | str | os.PathLike | None = None,
               *, trust_pickle: bool = False, allow_nonfinite: bool = False) -> nn.Module:
    """Load a guided-diffusion / RePaint checkpoint into fxpass's U-Net, float32, eval mode.

    ``config`` is a :class:`ModelConfig`, a YAML path, or ``None`` for the built-in CAMUS default.
    Checkpoints are read with ``torch.load(weights_only=True)``; a pickled module is refused unless
    ``trust_pickle`` (then the module itself is returned, in eval mode).  A tensor with NaN or Inf
    values is refused, naming the first, unless ``allow_nonfinite`` (a model built from it can only
    produce non-finite outputs, which no check compares).
    """
    from .config import load_config

    cfg = config if isinstance(config, ModelConfig) else load_config(config)
    path = Path(path)
    obj = _read_checkpoint(path, trust_pickle)
    if trust_pickle and isinstance(obj, nn.Module):
        if not allow_nonfinite:
            _refuse_nonfinite(obj.state_dict().items(), path)
        return obj.float().eval()
    state = extract_state_dict(obj, path)
    model = build_model(cfg)
    expected = model.state_dict()
    if set(state) != set(expected) or any(tuple(state[k].shape) != tuple(v.shape) for k, v in expected.items()):
        raise FxpassError(_describe_mismatch(state, expected, cfg, path))
    bad = [k for k, v in state.items() if not v.is_floating_point()]
    if bad:
        raise FxpassError(f"{path}: tensor {bad[0]} has dtype {state[bad[0]].dtype}, expected floating point")
    if not allow_nonfinite:
        _refuse_nonfinite(state.items(), path)
    model.load_state_dict(state, strict=True)
    return model.float().eval()


def _refuse_nonfinite(tensors, path) -> None:
    found = first_nonfinite(tensors)
    if found is not None:
        name, kind = found
        raise FxpassError(f"{path}: tensor {name} has {kind} values (pass --allow-nonfinite to load it anyway)")


def init_model(cfg: ModelConfig = CAMUS, seed: int = 0) -> nn.Module:
    """A seeded random U-Net whose output is not near zero.

    guided-diffusion zero-initialises the last convolution of every ResBlock and attention block and
    the output convolution; those get PyTorch's default initialisation here instead, so that tests
    and demos see real numbers.  GroupNorm scale and bias start at exactly 1 and 0, which a trained
    model's never are (and which would let the graph passes skip their multiply/add): they get
    1 + 0.1·N(0, 1) and 0.1·N(0, 1).  Deterministic for a given seed.
    """
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = build_model(cfg)
        for module in model.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d)) and not module.weight.detach().any():
                module.reset_parameters()
            elif isinstance(module, nn.GroupNorm) and module.affine:
                with torch.no_grad():
                    module.weight.copy_(1 + 0.1 * torch.randn_like(module.weight))
                    module.bias.copy_(0.1 * torch.randn_like(module.bias))
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, exclusive: bool = False) -> None:
    """Write ``model``'s float32 state dict atomically (a plain state dict, as guided-diffusion saves)."""
    state = OrderedDict((k, v.detach().float().contiguous()) for k, v in model.state_dict().items())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), lambda fh: fh.write(buffer.getvalue()), exclusive=exclusive)
