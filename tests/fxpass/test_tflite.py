"""fxpass.formats.tflite (issue #28): LiteRT files from the rewritten graph, checked in LiteRT's interpreter.

A mini table-gather graph (the shape of what fold_timesteps makes: a row of each table picked by
``t_index`` scales and shifts a conv's output) for the converter, the quantizer recipes, the gate and the
writes — each conversion of it takes a few seconds; one ``fxpass lower --format tflite`` of the tiny
config (tests/fxpass/conftest.py ``TINY``) for the command, its report and ``fxpass check FILE.tflite``.
The fp16/int8 lowerings of the tiny config are slow.  Without the ``tflite`` extra the tests that need it
skip with the reason.

    x ──conv1──▶ h ──(h·(1 + scale[t_index]) + shift[t_index])──▶ silu ──conv2──▶ out
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from check_helpers import lower_format
from test_formats import _rel

from fxpass.cli import main
from fxpass.errors import FxpassError
from fxpass.formats import format_unavailable_reason

REASON = format_unavailable_reason("tflite")
needs_tflite = pytest.mark.skipif(REASON is not None, reason=REASON or "")
ROWS = 10


class _Mini(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 3, 3, padding=1)
        self.register_buffer("scale", 0.1 * torch.randn(ROWS, 1, 32, 1, 1))
        self.register_buffer("shift", 0.1 * torch.randn(ROWS, 1, 32, 1, 1))

    def forward(self, x, t_index):
        h = self.conv1(x)
        h = h * (1 + self.scale[t_index].squeeze(0)) + self.shift[t_index].squeeze(0)
        return self.conv2(torch.nn.functional.silu(h))


@pytest.fixture(scope="module")
def mini():
    module = torch.fx.symbolic_trace(_Mini().eval())
    inputs = {"x": torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)), "t_index": torch.tensor([3])}
    return module, inputs


@pytest.fixture(scope="module")
def mini_fp32(mini, tmp_path_factory):
    from fxpass.formats import to_tflite

    module, inputs = mini
    path = tmp_path_factory.mktemp("mini") / "mini.tflite"
    return path, to_tflite(module, inputs, path, rows=ROWS, metadata={"fxpass.mode": "table", "note": "kept"})


# --- availability -------------------------------------------------------------------------------------

@pytest.mark.parametrize("module,name", [("litert_torch", "litert-torch"), ("ai_edge_litert", "ai-edge-litert"),
                                         ("ai_edge_quantizer", "ai-edge-quantizer")])
def test_missing_extra_is_one_line(monkeypatch, tmp_path, tiny_ckpt, tiny_yaml, capsys, module, name):
    import importlib.util

    from fxpass.formats import _deps, to_tflite

    real = importlib.util.find_spec
    monkeypatch.setattr(_deps.importlib.util, "find_spec", lambda mod, *a: None if mod == module else real(mod, *a))
    reason = f"--format tflite needs {name} (pip install 'fxpass[tflite]')"
    assert format_unavailable_reason("tflite") == reason
    with pytest.raises(FxpassError, match=r"needs .*pip install 'fxpass\[tflite\]'"):
        to_tflite(torch.nn.Identity(), {"x": torch.zeros(1)}, tmp_path / "m.tflite")
    code = main(["lower", str(tiny_ckpt), "--config", str(tiny_yaml), "-o", str(tmp_path / "m.tflite"),
                 "--format", "tflite"])
    err = capsys.readouterr().err
    assert code == 2 and reason in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


# --- the converter on the mini graph ---------------------------------------------------------------------

@needs_tflite
def test_fp32_file_is_checked_and_matches_torch(mini, mini_fp32):
    from fxpass.formats import run_tflite

    module, inputs = mini
    path, report = mini_fp32
    assert path.read_bytes()[4:8] == b"TFL3" and report["bytes"] == path.stat().st_size
    assert [p.name for p in path.parent.iterdir()] == ["mini.tflite"]  # nothing left beside it
    assert report["check"]["passed"] and report["check"]["tolerance"] == 1e-4
    assert report["check"]["t_index"] == [0, 4, 9]  # first, middle, last row of the tables
    assert report["ops"]["CONV_2D"] == 2 and report["gather_ops"] == 2  # one gather per table
    for t_index in (0, 9):
        x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(10 + t_index))
        case = {"x": x, "t_index": torch.tensor([t_index])}
        out = run_tflite(path, case)
        assert len(out) == 1 and _rel(out[0], module(**case).detach()) <= 1e-5
        assert _rel(run_tflite(path, [x, torch.tensor([t_index])])[0], out[0]) == 0.0  # positional = by name


@needs_tflite
def test_metadata_is_stored_in_the_file(mini_fp32):
    from fxpass.formats.tflite_file import read_facts, read_metadata, with_metadata

    data = mini_fp32[0].read_bytes()
    assert read_metadata(data) == {"fxpass.mode": "table", "note": "kept"}
    replaced = with_metadata(data, {"fxpass.mode": "fixed"})
    assert read_metadata(replaced) == {"fxpass.mode": "fixed"}  # the earlier entry replaced, not kept beside
    facts = read_facts(replaced)
    assert facts.ops == read_facts(data).ops and list(facts.inputs) == ["x", "t_index"]
    assert facts.inputs["t_index"] == ("int64", [1]) and not (facts.float16 or facts.int8)


@needs_tflite
def test_report_lists_delegate_coverage_from_the_delegates_sources(mini_fp32):
    """GPU and Core ML: the file's op types split into listed / not listed by each delegate's op list (read from
    its source at a pinned commit), with the list's source and version; the mini graph's CONV_2D is on both
    lists, its GATHER_ND on neither."""
    import json as _json
    from pathlib import Path

    import fxpass.formats.tflite_file as tflite_file
    from fxpass.formats.tflite_file import delegate_coverage

    report = mini_fp32[1]
    data = _json.loads(Path(tflite_file.__file__).with_name("tflite_delegates.json").read_text())
    assert set(report["delegates"]) == set(data["delegates"]) == {"gpu", "coreml"}
    for key, entry in report["delegates"].items():
        assert entry["source"].startswith("https://") and entry["version"]
        assert sorted(entry["listed"] + entry["not_listed"]) == sorted(report["ops"])
        assert "CONV_2D" in entry["listed"] and "GATHER_ND" in entry["not_listed"]
        assert entry["ops"] == report["op_count"] and 0 < entry["ops_listed"] < entry["ops"]
    assert "github.com/tensorflow/tensorflow/blob/" in report["delegates"]["coreml"]["source"]
    assert delegate_coverage({"MADE_UP_OP": 2})["gpu"] == {**delegate_coverage({"MADE_UP_OP": 2})["gpu"],
                                                            "listed": [], "not_listed": ["MADE_UP_OP"],
                                                            "ops_listed": 0, "ops": 2}


@needs_tflite
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_weights_and_bounds(mini, mini_fp32, tmp_path, precision):
    from targets.compare import TOLERANCES

    from fxpass.formats import run_tflite, to_tflite
    from fxpass.formats.pte import TOLERANCE
    from fxpass.formats.tflite_file import read_facts, structure_problem

    module, inputs = mini
    path = tmp_path / f"mini-{precision}.tflite"
    report = to_tflite(module, inputs, path, precision=precision, rows=ROWS)
    bound = {"fp16": TOLERANCE["fp16"], "int8": TOLERANCES["int8"][0]}[precision]
    assert report["check"]["tolerance"] == bound and report["check"]["passed"]
    assert report["bytes"] < mini_fp32[1]["bytes"]
    facts = read_facts(path.read_bytes())
    assert (facts.float16, facts.int8) == (precision == "fp16", precision == "int8")
    assert structure_problem(facts, precision) is None and structure_problem(facts, "fp32") is not None
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    out = run_tflite(path, {"x": x, "t_index": torch.tensor([7])})[0]
    assert _rel(out, module(x, torch.tensor([7])).detach()) <= bound


@needs_tflite
def test_failing_gate_writes_nothing(mini, tmp_path):
    from fxpass.formats import to_tflite

    module, inputs = mini
    with pytest.raises(FxpassError, match=r"not written: LiteRT differs from PyTorch by .*tolerance 1e-12") as err:
        to_tflite(module, inputs, tmp_path / "m.tflite", precision="int8", tolerance=1e-12, rows=ROWS)
    assert err.value.exit_code == 1 and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


@needs_tflite
def test_existing_output_is_not_replaced(mini, tmp_path):
    from fxpass.formats import to_tflite

    module, inputs = mini
    out = tmp_path / "m.tflite"
    out.write_bytes(b"keep")
    with pytest.raises(FxpassError, match="already exists"):
        to_tflite(module, inputs, out, rows=ROWS)
    assert out.read_bytes() == b"keep" and [p.name for p in tmp_path.iterdir()] == ["m.tflite"]


@needs_tflite
def test_conversion_is_deterministic(mini, mini_fp32, tmp_path):
    from fxpass.formats import to_tflite

    module, inputs = mini
    again = tmp_path / "again.tflite"
    to_tflite(module, inputs, again, rows=ROWS, metadata={"fxpass.mode": "table", "note": "kept"})
    assert again.read_bytes() == mini_fp32[0].read_bytes()


# --- fxpass lower --format tflite / fxpass check FILE.tflite on the tiny config ---------------------------

@pytest.fixture(scope="session")  # one worker builds it once (conftest's loadgroup)
def tiny_tflite(tiny_ckpt, tiny_yaml, tmp_path_factory):
    if REASON is not None:
        pytest.skip(REASON)
    out = tmp_path_factory.mktemp("tiny-tflite") / "tiny.tflite"
    report = out.with_suffix(".json")
    assert main(["lower", str(tiny_ckpt), "--config", str(tiny_yaml), "-o", str(out), "--format", "tflite",
                 "--report", str(report)]) == 0
    return out, json.loads(report.read_text())


def test_lower_writes_the_file_and_its_report(tiny_tflite, tiny_ckpt):
    from fxpass.checkpoint import load_model
    from fxpass.config import from_dict
    from fxpass.formats import run_tflite
    from fxpass.formats.tflite_file import read_tflite

    path, report = tiny_tflite
    fmt = report["format"]
    assert fmt["name"] == "tflite" and fmt["precision"] == "fp32" and report["file_bytes"] == path.stat().st_size
    assert fmt["check"]["passed"] and fmt["check"]["max_rel_to_scale"] <= 1e-4
    assert fmt["ops"]["CONV_2D"] > 0 and fmt["gather_ops"] == fmt["ops"]["GATHER_ND"] == 1  # tables merged
    assert "note" not in fmt
    gpu, coreml = fmt["delegates"]["gpu"], fmt["delegates"]["coreml"]  # the delegates' op lists, per op type
    assert "CONV_2D" in gpu["listed"] and "GATHER_ND" in gpu["not_listed"] and "GATHER_ND" in coreml["not_listed"]
    assert gpu["ops"] == coreml["ops"] == sum(fmt["ops"].values())
    assert fmt["latency_ms"] > 0 and fmt["ort_latency_ms"] > 0 and fmt["ort_precision"] == "fp32"
    info = read_tflite(path)
    assert (info.mode, info.precision, len(info.timesteps)) == ("table", "fp32", 10)
    assert info.inputs["x"] == ("float32", [1, 3, 32, 32]) and info.inputs["t_index"][0] == "int64"
    model = load_model(tiny_ckpt, from_dict(info.config)).eval()  # the config as the file's metadata has it
    for t_index in (0, 9):
        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(t_index))
        out = run_tflite(path, {"x": x, "t_index": torch.tensor([t_index])})[0]
        with torch.no_grad():
            ref = model(x, torch.tensor([info.model_timesteps[t_index]]))
        assert _rel(out, ref) <= 1e-4


def test_check_passes_the_file_at_its_precision(tiny_tflite, tiny_ckpt, tmp_path, capsys):
    path, _ = tiny_tflite
    report = tmp_path / "check.json"
    assert main(["check", str(path), "--model", str(tiny_ckpt), "--report", str(report)]) == 0
    rows = json.loads(report.read_text())["rows"]
    assert [(r["target"], r["status"]) for r in rows] == [("litert-cpu", "pass")] and rows[0]["max_rel"] <= 1e-4
    capsys.readouterr()
    assert main(["check", str(path), "--model", str(tiny_ckpt), "--precision", "int8"]) == 1
    err = capsys.readouterr().err.strip()
    assert "metadata says fp32, --precision says int8" in err and len(err.splitlines()) == 1


@needs_tflite
@pytest.mark.parametrize("damage", ["truncated", "not_tflite", "no_metadata"])
def test_check_refuses_a_wrong_file_in_one_line(tiny_tflite, mini_fp32, tiny_ckpt, tmp_path, capsys, damage):
    from fxpass.formats.tflite_file import read_metadata

    bad = tmp_path / "bad.tflite"
    data = tiny_tflite[0].read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[:5000])
    elif damage == "not_tflite":
        bad.write_bytes(b"\x00" * 64)
    else:  # a LiteRT model fxpass did not write (the mini file's metadata has no schedule)
        assert "fxpass.timesteps" not in read_metadata(mini_fp32[0].read_bytes())
        bad.write_bytes(mini_fp32[0].read_bytes())
    code = main(["check", str(bad), "--model", str(tiny_ckpt)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert {"truncated": "not a readable LiteRT model", "not_tflite": "not a LiteRT (.tflite) model",
            "no_metadata": "without fxpass metadata"}[damage] in err


def test_lower_does_not_replace_an_existing_output(tiny_tflite, tiny_ckpt, tiny_yaml, tmp_path, capsys):
    out = tmp_path / "kept.tflite"
    out.write_bytes(b"keep")
    code = main(["lower", str(tiny_ckpt), "--config", str(tiny_yaml), "-o", str(out), "--format", "tflite"])
    assert code == 2 and "exists" in capsys.readouterr().err and out.read_bytes() == b"keep"


@pytest.mark.slow
@needs_tflite
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_lower_and_check_reduced_precision(tiny_ckpt, tiny_yaml, tmp_path, precision):
    out = tmp_path / f"tiny-{precision}.tflite"
    fmt = lower_format(tiny_ckpt, tiny_yaml, out, "--format", "tflite", "--precision", precision)
    assert fmt["precision"] == precision and fmt["check"]["passed"]
    assert main(["check", str(out), "--model", str(tiny_ckpt), "--precision", precision]) == 0
    assert main(["check", str(out), "--model", str(tiny_ckpt)]) == 2  # a reduced file needs --precision


@pytest.mark.slow
@needs_tflite
def test_lower_step_graph(tiny_ckpt, tiny_yaml, tmp_path, capsys):
    out = tmp_path / "step.tflite"
    fmt = lower_format(tiny_ckpt, tiny_yaml, out, "--format", "tflite", "--step-graph")
    assert fmt["check"]["passed"] and fmt["check"]["max_rel_to_scale"] <= 1e-4
    from fxpass.formats.tflite_file import read_tflite

    info = read_tflite(out)
    assert info.mode == "step" and list(info.inputs) == ["x", "t_index", "noise"] and len(info.tflite.outputs) == 2
    capsys.readouterr()
    assert main(["check", str(out), "--model", str(tiny_ckpt)]) == 0  # x_prev, pred_xstart in LiteRT vs eager
    assert "step graph, fp32): litert-cpu vs eager model + NumPy posterior" in capsys.readouterr().out
    state = torch.load(tiny_ckpt, weights_only=True)
    key = [k for k, v in state.items() if v.dim() == 4][-1]  # the output convolution
    wrong = tmp_path / "wrong.pt"
    torch.save({**state, key: state[key] * 1.05}, wrong)
    assert main(["check", str(out), "--model", str(wrong)]) == 1  # another model's weights fail


@pytest.mark.slow
def test_sample_runs_on_litert_and_agrees_with_onnx_runtime(tiny_tflite, tiny_onnx, tmp_path, capsys):
    """``fxpass sample --runtime litert``: deterministic per seed, and at fp32 the same image as ONNX Runtime's
    on the same lowering (within one 8-bit level); an ONNX file or a deep-cache run on LiteRT is one line."""
    from PIL import Image

    img, mask = tmp_path / "i.png", tmp_path / "m.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img)
    keep = np.zeros((32, 32), np.uint8)
    keep[:, :16] = 255
    Image.fromarray(keep).save(mask)
    common = ["--image", str(img), "--mask", str(mask), "--seed", "3", "--sampler", "ddim", "--steps", "5"]
    images = {}
    for name, model, runtime in (("a", tiny_tflite[0], "litert"), ("b", tiny_tflite[0], "litert"),
                                 ("ort", tiny_onnx, "ort")):
        out = tmp_path / f"{name}.png"
        assert main(["sample", str(model), "--runtime", runtime, "-o", str(out), *common]) == 0
        images[name] = np.asarray(Image.open(out)).astype(int)
    assert "on litert" in capsys.readouterr().out
    assert np.array_equal(images["a"], images["b"])
    assert np.abs(images["a"] - images["ort"]).max() <= 1
    assert main(["sample", str(tiny_onnx), "--runtime", "litert", "-o", str(tmp_path / "x.png"), *common]) == 2
    assert "not a LiteRT (.tflite) model" in capsys.readouterr().err
