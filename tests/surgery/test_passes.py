"""surgery.passes: the pass table as data, its ordering rules, and options reaching a pass through simplify.

    PASSES:  fold_constants → … → fuse_group_norm → fold_norm_scale_shift → expand_group_norm → … → fold_constants
    rules:   Constraint("fuse_group_norm", before="fold_norm_scale_shift"), …  (checked by plan / simplify)
"""

import inspect

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from surgery_helpers import make_model, ops, run_ort

import surgery
from surgery import passes
from surgery.expand_group_norm import DEFAULT_MIN_ELEMENTS, expand_group_norm
from surgery.passes import CONSTRAINTS, PASSES, Constraint, Pass, check_options, check_order, plan

VI = helper.make_tensor_value_info
NAMES = [entry.name for entry in PASSES]


def _norm_model(shape=(1, 8, 16, 16), groups=4):
    """x ─▶ GroupNormalization(scale, bias) ─▶ y, with C·H·W elements per sample."""
    rng = np.random.default_rng(0)
    c = shape[1]
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=groups)
    return make_model([node], [VI("x", TensorProto.FLOAT, list(shape))], [VI("y", TensorProto.FLOAT, list(shape))],
                      [numpy_helper.from_array((1 + 0.3 * rng.standard_normal(c)).astype(np.float32), "s"),
                       numpy_helper.from_array((0.3 * rng.standard_normal(c)).astype(np.float32), "b")])


def test_table_is_data():
    assert NAMES == ["fold_constants", "remove_identity", "remove_cast_pairs", "rewrite_einsum_attention",
                     "fuse_group_norm", "fold_norm_scale_shift", "expand_group_norm", "rewrite_upsample_conv",
                     "merge_table_gathers", "fold_constants"]
    assert surgery.PASSES is PASSES and surgery.CONSTRAINTS is CONSTRAINTS
    by_name = {entry.name: entry for entry in PASSES}
    assert by_name["expand_group_norm"].fn is expand_group_norm
    assert dict(by_name["expand_group_norm"].options) == {"min_elements": DEFAULT_MIN_ELEMENTS}
    assert dict(by_name["expand_group_norm"].when) == {"group_norm": "auto"}
    assert dict(by_name["merge_table_gathers"].options) == {"min_group": 3}
    assert dict(by_name["fuse_group_norm"].options) == {"absorb_casts": False}
    assert dict(by_name["rewrite_einsum_attention"].options) == {}
    # the defaults are the functions' own keyword-only defaults
    for entry in PASSES:
        params = inspect.signature(entry.fn).parameters.values()
        assert dict(entry.options) == {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    text = surgery.describe()
    assert " 7. expand_group_norm(min_elements=2097152)  when group_norm='auto'" in text
    assert "fuse_group_norm before fold_norm_scale_shift: " in text


def test_pass_modules_stay_modules():
    import types

    import surgery.convert_precision  # noqa: F401 - the float16 stage, imported on demand

    for name in set(NAMES) | {"convert_precision"}:
        assert isinstance(getattr(surgery, name), types.ModuleType), name


def test_rules_name_table_passes_and_the_table_keeps_them():
    for rule in CONSTRAINTS:
        assert rule.this in NAMES and rule.before in NAMES and rule.why, rule
    check_order(PASSES)
    check_order(entry for entry, _ in plan({"group_norm": "keep"}))


def test_refuses_a_wrong_order():
    swapped = list(NAMES)
    i, j = swapped.index("fuse_group_norm"), swapped.index("fold_norm_scale_shift")
    swapped[i], swapped[j] = swapped[j], swapped[i]
    with pytest.raises(ValueError, match=r"breaks rule 'fuse_group_norm before fold_norm_scale_shift'") as err:
        check_order(swapped)
    assert "fold_norm_scale_shift runs at position 5, before the first fuse_group_norm at position 6" in str(err.value)
    late_merge = [n for n in NAMES if n != "merge_table_gathers"]
    late_merge.insert(late_merge.index("fold_norm_scale_shift"), "merge_table_gathers")
    with pytest.raises(ValueError, match="breaks rule 'fold_norm_scale_shift before merge_table_gathers'"):
        check_order(late_merge)
    # a pass listed twice keeps a rule when its first run comes first (fold_constants runs first and last)
    check_order(["fold_constants", "fuse_group_norm", "fold_constants"])
    with pytest.raises(ValueError, match="fold_constants before fuse_group_norm"):
        check_order(["fuse_group_norm", "fold_constants"])
    # a rule whose passes are not both present does not apply
    check_order(["fold_norm_scale_shift"], [Constraint("fuse_group_norm", before="fold_norm_scale_shift")])


def test_simplify_refuses_a_table_that_breaks_a_rule(monkeypatch):
    table = list(PASSES)
    i, j = NAMES.index("fold_norm_scale_shift"), NAMES.index("expand_group_norm")
    table[i], table[j] = table[j], table[i]
    monkeypatch.setattr(passes, "PASSES", tuple(table))
    with pytest.raises(ValueError, match="breaks rule 'fold_norm_scale_shift before expand_group_norm'"):
        surgery.simplify(_norm_model(), 21, simplifier=None)
    # expand_group_norm is off with group_norm="keep": the rules about it do not apply
    surgery.simplify(_norm_model(), 21, simplifier=None, group_norm="keep")


def test_plan_enables_by_settings_and_merges_options():
    auto = plan({"group_norm": "auto"}, {"expand_group_norm": {"min_elements": 5}})
    keep = plan({"group_norm": "keep"}, {"expand_group_norm": {"min_elements": 5}})
    assert [e.name for e, _ in auto] == NAMES
    assert [e.name for e, _ in keep] == [n for n in NAMES if n != "expand_group_norm"]
    assert {e.name: o for e, o in auto}["expand_group_norm"] == {"min_elements": 5}
    assert all(o == {} for e, o in auto if e.name != "expand_group_norm")


def test_options_reach_the_pass_through_simplify():
    model = _norm_model(shape=(1, 8, 16, 16))  # 2,048 elements per sample: far below the default
    _, report = surgery.simplify(model, 21, simplifier=None)
    assert "LayerNormalization" not in report["ops"]["after"]
    result, report = surgery.simplify(model, 21, simplifier=None, options={"expand_group_norm": {"min_elements": 2048}})
    assert ops(result)["LayerNormalization"] == 1 and "GroupNormalization" not in ops(result)
    assert {p["pass"]: p["count"] for p in report["passes"]}["expand_group_norm"] == 1
    x = np.random.default_rng(1).standard_normal((1, 8, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(run_ort(result, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"expand_group_norms": {"min_elements": 1}}, r"unknown pass name\(s\) in options: 'expand_group_norms'"),
        ({"expand_group_norm": {"min_element": 1}}, r"unknown option\(s\) for expand_group_norm: 'min_element' "
                                                    r"\(it takes: min_elements\)"),
        ({"fold_norm_scale_shift": {"x": 1}}, r"unknown option\(s\) for fold_norm_scale_shift: 'x' \(it takes: none\)"),
        ({"merge_table_gathers": 3}, r"options\['merge_table_gathers'\] must be a dict"),
    ],
)
def test_refuses_unknown_options(options, message):
    with pytest.raises(ValueError, match=message):
        check_options(options)
    with pytest.raises(ValueError, match=message):
        surgery.simplify(_norm_model(), 21, simplifier=None, options=options)


def test_pass_entry_runs_with_defaults_and_overrides():
    import onnx_graphsurgeon as gs

    entry = Pass.of(expand_group_norm)
    run = entry.run(gs.import_onnx(_norm_model()))
    assert run.count == 0 and run.skipped == {"below min_elements (2,048 < 2,097,152)": 1}
    run = entry.run(gs.import_onnx(_norm_model()), min_elements=1)
    assert run.count == 1 and run.skipped == {}
