"""fxpass.golden: the golden-set format's own helpers (the commands are tested in tests/targets)."""

from __future__ import annotations

import json

import pytest

from fxpass.errors import FxpassError
from fxpass.golden import GOLDEN_FORMAT, is_golden_dir, load_golden, regression_command


def test_regression_command_quotes_paths():
    cmd = regression_command("my model.onnx", "golden/a b/", 0.00018)
    assert cmd == ("polygraphy run 'my model.onnx' --onnxrt --load-inputs 'golden/a b/inputs.json' "
                   "--load-outputs 'golden/a b/outputs.json' --atol 0.00018 --rtol 0")


def test_only_empty_dirs_and_golden_sets_may_be_replaced(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert is_golden_dir(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert not is_golden_dir(other)
    golden = tmp_path / "golden"
    golden.mkdir()
    (golden / "manifest.json").write_text(json.dumps({"format": GOLDEN_FORMAT}))
    assert is_golden_dir(golden)
    (golden / "keep.txt").write_text("mine")
    assert not is_golden_dir(golden)
    link = tmp_path / "link"
    link.symlink_to(empty, target_is_directory=True)
    assert not is_golden_dir(link)


def test_load_golden_names_what_is_missing(tmp_path):
    with pytest.raises(FxpassError, match="no such golden set"):
        load_golden(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(FxpassError, match="inputs.json: missing from the golden set"):
        load_golden(tmp_path)
