"""bench.preset_search: its sets, its table, and one small search end to end (slow: paper's 410 calls per case)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from bench import preset_search


def test_sets_are_parsed_and_bad_ones_refused():
    assert preset_search.parse_set("100:32:7") == (100, 32, 7)
    for bad in ("1:2", "a:b:c", "0:0:1", "-1:3:0"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected FIRST"):
            preset_search.parse_set(bad)


def test_the_table_pairs_per_set_and_pools():
    results = {"x": (37, 0.1, [np.array([1.0, -1.0]), np.array([2.0, 2.0])], [np.array([0.1, 0.1]), np.array([0.0, 0.2])])}
    text = preset_search.table(results, [(0, 1, 0), (5, 1, 3)])
    row = text.splitlines()[2]
    # per set +0.00 and +2.00; pooled mean 1.00, standard error std([1,-1,2,2]) / 2
    se = np.std([1.0, -1.0, 2.0, 2.0], ddof=1) / 2
    assert row.startswith("| x | 37 | 0.100 | +0.00 | +2.00 | +1.00 ± " + f"{se:.2f}") and "+0.100 ± " in row
    assert "ΔPSNR 0..0/0" in text and "ΔSSIM 5..5/3" in text


@pytest.mark.slow
def test_a_small_search_runs_and_pairs_against_paper(tmp_path, capsys):
    assert preset_search.main(["--set", "0:1:0", "--run", "ddim:steps=3", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| DDIM (steps 3, eta 0.85) | 3 |" in out
    assert (tmp_path / "paper-0-1-0.json").is_file() and (tmp_path / "digits.onnx").is_file()
