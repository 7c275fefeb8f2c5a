"""targets.compare: worst errors at explicit tolerances; non-finite numbers fail and say so; tolerances parse
strictly.  Runner results are built by hand (Polygraphy RunResults), no model runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from polygraphy.comparator import RunResults
from polygraphy.comparator.struct import IterationResult

from targets.compare import compare, parse_tolerance


def _results(reference: list[np.ndarray], target: list[np.ndarray], name: str = "onnxrt-cpu") -> RunResults:
    results = RunResults()
    results.append(("torch-fp32", [IterationResult({"out": r}, runner_name="torch-fp32") for r in reference]))
    results.append((name, [IterationResult({"out": t}, runner_name=name) for t in target]))
    return results


def _ref(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 6, 4, 4)).astype(np.float32)


def test_finite_outputs_within_tolerance_pass_with_their_errors():
    refs = [_ref(0), _ref(1)]
    outs = [r + np.float32(1e-6) for r in refs]
    (pair,) = compare(_results(refs, outs), reference="torch-fp32", atol_scale=1e-4)
    assert pair.passed and pair.nonfinite is None
    assert 0 < pair.max_abs < 2e-6
    assert pair.max_rel_to_scale == pytest.approx(pair.max_abs / max(float(np.abs(r).max()) for r in refs), rel=0.5)
    assert all("nonfinite" not in e for e in pair.per_iteration)


def test_a_wrong_output_fails_with_its_error():
    refs = [_ref(0)]
    outs = [refs[0] * 1.5]
    (pair,) = compare(_results(refs, outs), reference="torch-fp32", atol_scale=1e-4)
    assert not pair.passed and pair.nonfinite is None
    assert pair.max_rel_to_scale == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_runtime_output_fails_and_says_so(bad):
    refs = [_ref(i) for i in range(4)]
    outs = [r.copy() for r in refs]
    outs[3][0, 2, 1, 1] = bad  # iteration 3 only; the others are exact
    (pair,) = compare(_results(refs, outs), reference="torch-fp32", atol_scale=1e-4)
    kind = "NaN" if np.isnan(bad) else "Inf"
    assert not pair.passed
    assert pair.nonfinite == f"onnxrt-cpu output out has {kind} at iteration 3"
    assert pair.max_abs == math.inf and pair.max_rel_to_scale == math.inf  # never the 0 that max(0, nan) gives
    entries = {e["iteration"]: e for e in pair.per_iteration}
    assert entries[3]["nonfinite"] == f"onnxrt-cpu output out has {kind}"
    assert entries[3]["max_abs"] == math.inf and not entries[3]["passed"]
    assert all(entries[i]["passed"] and entries[i]["max_abs"] == 0.0 for i in range(3))


def test_nonfinite_reference_fails_and_names_the_reference():
    refs = [_ref(0), _ref(1)]
    outs = [r.copy() for r in refs]
    refs[0][0, 0, 0, 0] = np.nan
    refs[0][0, 0, 0, 1] = np.inf
    (pair,) = compare(_results(refs, outs), reference="torch-fp32", atol_scale=1e-4)
    assert not pair.passed
    assert pair.nonfinite == "torch-fp32 output out has NaN and Inf at iteration 0"
    assert pair.max_abs == math.inf
    assert pair.per_iteration[1]["passed"] and "nonfinite" not in pair.per_iteration[1]


def test_nan_in_both_is_still_a_failure():
    ref = _ref(0)
    ref[0, 1, 1, 1] = np.nan
    out = ref.copy()
    (pair,) = compare(_results([ref], [out]), reference="torch-fp32", atol_scale=1e-2)
    assert not pair.passed and pair.nonfinite.startswith("torch-fp32 output out has NaN")


@pytest.mark.parametrize("text, expected", [("fp32", (1e-4, 0.0)), ("fp16", (2e-2, 0.0)), ("1e-3,0", (1e-3, 0.0)),
                                            ("0.5,1e-6", (0.5, 1e-6))])
def test_parse_tolerance_accepts(text, expected):
    assert parse_tolerance(text) == expected


@pytest.mark.parametrize("text, message", [
    ("nan,0", "ATOL must be a finite number > 0"),
    ("inf,0", "ATOL must be a finite number > 0"),
    ("0,0", "ATOL must be a finite number > 0"),
    ("-1e-4,0", "ATOL must be a finite number > 0"),
    ("1e-4,nan", "RTOL must be a finite number >= 0"),
    ("1e-4,inf", "RTOL must be a finite number >= 0"),
    ("1e-4,-1", "RTOL must be a finite number >= 0"),
    ("fp64", "expected fp32, fp16 or ATOL,RTOL"),
    ("1e-4", "expected fp32, fp16 or ATOL,RTOL"),
])
def test_parse_tolerance_refuses(text, message):
    with pytest.raises(ValueError, match=f"tolerance '{text}': {message}"):
        parse_tolerance(text)


def test_a_reference_that_is_zero_everywhere_fails_and_says_so():
    """An untrained model with a zero-initialised output layer gives 0 on every input: any graph would
    "match" it, so the pair fails, saying nothing was compared; one non-zero input is enough to compare."""
    zeros = [np.zeros((1, 3, 4, 4), np.float32) for _ in range(3)]
    (pair,) = compare(_results(zeros, zeros), reference="torch-fp32", atol_scale=1e-4)
    assert not pair.passed and pair.max_abs == 0.0
    assert pair.degenerate.startswith("torch-fp32 output out is 0 everywhere on all 3 inputs")
    some = zeros[:2] + [np.ones((1, 3, 4, 4), np.float32)]
    (pair,) = compare(_results(some, some), reference="torch-fp32", atol_scale=1e-4)
    assert pair.passed and pair.degenerate is None


def test_relative_l2_is_reported_per_input_beside_max_abs():
    """One pixel off by 0.5: max-abs says 0.5·max|ref|, relative L2 says how little of the whole output is off."""
    ref = np.ones((1, 1, 10, 10), np.float32)
    out = ref.copy()
    out[0, 0, 0, 0] += 0.5
    (pair,) = compare(_results([ref, ref], [ref, out]), reference="torch-fp32", atol_scale=1e-4)
    assert [e["rel_l2"] for e in pair.per_iteration] == [0.0, pytest.approx(0.05, rel=1e-6)]  # 0.5 / sqrt(100)
    assert pair.max_rel_l2 == pytest.approx(0.05, rel=1e-6) and pair.max_rel_to_scale == pytest.approx(0.5)
