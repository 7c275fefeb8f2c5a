"""fxpass.metadata: the one writer and the one strict parser of fxpass's ONNX metadata."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fxpass import metadata
from fxpass.config import CAMUS
from fxpass.diffusion import respaced
from fxpass.errors import FxpassError

SMALL = CAMUS.replace(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16",
                      diffusion_steps=100, timestep_respacing="10")
KEPT = tuple(respaced(100, "10"))


def _props(**changes) -> dict[str, str]:
    meta = metadata.ModelMeta("table", KEPT, KEPT, SMALL.to_dict(), "fp32", "0.1.0")
    props = metadata.encode(meta)
    props.update(changes)
    return {k: v for k, v in props.items() if v is not None}


def test_encode_then_parse_round_trips():
    parsed = metadata.parse(_props(), "m.onnx")
    assert parsed.mode == "table" and parsed.timesteps == KEPT and parsed.model_timesteps == KEPT
    assert parsed.config == SMALL.to_dict() and parsed.precision == "fp32" and parsed.steps == 10
    assert metadata.schedule_matches_config(parsed)


def test_encode_writes_only_known_keys_as_strings():
    props = _props()
    assert set(props) <= set(metadata.KEYS)
    assert all(isinstance(v, str) for v in props.values())
    assert json.loads(props[metadata.TIMESTEPS]) == list(KEPT)


@pytest.mark.parametrize("changes,message", [
    ({metadata.MODE: None}, "not an fxpass model"),
    ({metadata.MODE: "tabel"}, "fxpass.mode is 'tabel'"),
    ({metadata.TIMESTEPS: "[0, 1,"}, "fxpass.timesteps is not valid JSON"),
    ({metadata.TIMESTEPS: '"0,1,2"'}, "fxpass.timesteps must be a JSON list"),
    ({metadata.TIMESTEPS: '["0", "1"]'}, "must list non-negative integers"),
    ({metadata.TIMESTEPS: "[]"}, "fxpass.timesteps is empty"),
    ({metadata.TIMESTEPS: "[true, 1]"}, "must list non-negative integers"),
    ({metadata.MODEL_TIMESTEPS: "[1, 2]"}, "fxpass.model_timesteps has 2 entries"),
    ({metadata.MODEL_TIMESTEPS: '[1, 2, 3, 4, 5, 6, 7, 8, 9, "x"]'}, "must list finite numbers"),
    ({metadata.PRECISION: "fp8"}, "fxpass.precision is 'fp8'"),
    ({"fxpass.colour": "blue"}, "unknown metadata key fxpass.colour"),
    ({metadata.CONFIG: json.dumps({k: v for k, v in SMALL.to_dict().items() if k != "image_size"})},
     "missing key 'image_size'"),
    ({metadata.CONFIG: json.dumps({**SMALL.to_dict(), "num_res_block": 2})}, "unknown model key 'num_res_block'"),
    ({metadata.CONFIG: json.dumps({**SMALL.to_dict(), "diffusion_steps": 50})}, "beyond diffusion_steps 50"),
    ({metadata.TIMESTEPS: json.dumps(list(range(200_000)))}, "at most 100,000"),
])
def test_parse_refuses_corrupt_metadata_naming_file_and_key(changes, message):
    with pytest.raises(FxpassError) as err:
        metadata.parse(_props(**changes), "m.onnx")
    text = str(err.value)
    assert text.startswith("m.onnx") and message in text and "\n" not in text


def test_parse_requires_the_callers_modes():
    with pytest.raises(FxpassError, match="fxpass.mode is 'table'; this needs a step-mode model"):
        metadata.parse(_props(), "m.onnx", require=("step",))


def test_step_mode_schedule_must_be_the_configs():
    with pytest.raises(FxpassError, match="does not match timestep_respacing"):
        metadata.parse(_props(**{metadata.MODE: "step", metadata.TIMESTEPS: "[0, 1]",
                                 metadata.MODEL_TIMESTEPS: "[0, 1]"}), "m.onnx")


def test_parser_imports_neither_torch_nor_onnx():
    code = ("import sys, json; from fxpass import metadata; "
            f"metadata.parse({_props()!r}, 'm'); print('torch' in sys.modules, 'onnx' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False False", result.stderr


def test_key_strings_live_in_one_module():
    from pathlib import Path

    root = Path(metadata.__file__).resolve().parents[1]
    offenders = [str(p.relative_to(root)) for folder in ("fxpass", "surgery", "targets")
                 for p in (root / folder).rglob("*.py")
                 if p.name != "metadata.py" and any(f'"{k}"' in p.read_text() for k in metadata.KEYS)]
    assert offenders == []
