"""surgery._rules: the shared driver (candidates → match or Skip(reason) → rewrite) and the report's skip reasons.

    GroupNormalization[1,8,16,16] ─▶ expand_group_norm(min_elements=2²¹)
    report["passes"][i] == {"pass": "expand_group_norm", "count": 0, "nodes": 1,
                            "skipped": {"below min_elements (2,048 < 2,097,152)": 1}}
"""

import threading

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper
from surgery_helpers import make_model

import surgery
from surgery._rules import RuleResult, Skip, apply_rule, collect_skips, record_skips

VI = helper.make_tensor_value_info


def _relu_chain(n=4, opset=21):
    """x ─▶ Relu ─▶ … (n Relus) ─▶ y."""
    nodes = [helper.make_node("Relu", [f"h{i}" if i else "x"], [f"h{i + 1}" if i + 1 < n else "y"]) for i in range(n)]
    return make_model(nodes, [VI("x", TensorProto.FLOAT, [2])], [VI("y", TensorProto.FLOAT, [2])], opset=opset)


def _norm_model(shape=(1, 8, 16, 16), scale_input=False):
    c = shape[1]
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=4)
    inputs = [VI("x", TensorProto.FLOAT, list(shape))] + ([VI("s", TensorProto.FLOAT, [c])] if scale_input else [])
    inits = [numpy_helper.from_array(np.zeros(c, np.float32), "b")]
    if not scale_input:
        inits.append(numpy_helper.from_array(np.ones(c, np.float32), "s"))
    return make_model([node], inputs, [VI("y", TensorProto.FLOAT, list(shape))], inits)


def test_driver_counts_rewrites_and_tallies_reasons():
    graph = gs.import_onnx(_relu_chain())
    relus = list(graph.nodes)
    rewritten = []

    def match(node):
        return Skip("second node") if node is relus[1] else node

    def rewrite(node):
        if node is relus[2]:
            return Skip("refused at rewrite")
        rewritten.append(node)
        return None

    with collect_skips() as skipped:
        result = apply_rule(graph, "Relu", match, rewrite)
    assert isinstance(result, RuleResult) and result.count == 2
    assert rewritten == [relus[0], relus[3]]  # a skipped match is never handed to the rewrite
    assert dict(result.skipped) == dict(skipped) == {"second node": 1, "refused at rewrite": 1}


def test_driver_skips_every_candidate_below_min_opset():
    graph = gs.import_onnx(_relu_chain(n=3))
    graph.opset = 18
    result = apply_rule(graph, ("Relu", "Sigmoid"), lambda n: n, lambda m: None, min_opset=21)
    assert result.count == 0 and dict(result.skipped) == {"opset 18 < 21": 3}


def test_driver_ignores_other_ops_and_detached_nodes():
    graph = gs.import_onnx(_relu_chain(n=3))
    graph.nodes[1].inputs.clear()
    graph.nodes[1].outputs.clear()
    matched = []
    result = apply_rule(graph, "Sigmoid", lambda n: n, lambda m: None)
    assert result.count == 0 and not result.skipped
    result = apply_rule(graph, "Relu", lambda n: matched.append(n) or Skip("no"), lambda m: None)
    assert len(matched) == 2 and dict(result.skipped) == {"no": 2}


def test_reasons_outside_collect_skips_are_dropped_and_record_false_keeps_them_out():
    graph = gs.import_onnx(_relu_chain(n=2))
    apply_rule(graph, "Relu", lambda n: Skip("dropped"), lambda m: None)  # no collector: nothing to see, no error
    with collect_skips() as skipped:
        result = apply_rule(graph, "Relu", lambda n: Skip("kept local"), lambda m: None, record=False)
        record_skips({"recorded by hand": 5})
    assert dict(result.skipped) == {"kept local": 2}
    assert dict(skipped) == {"recorded by hand": 5}


def test_collectors_nest_and_threads_collect_their_own():
    with collect_skips() as outer:
        record_skips({"outer": 1})
        with collect_skips() as inner:
            record_skips({"inner": 1})
        record_skips({"outer": 1})
    assert dict(outer) == {"outer": 2} and dict(inner) == {"inner": 1}

    results = {}
    barrier = threading.Barrier(2)

    def work(tag, n):
        with collect_skips() as mine:
            barrier.wait()
            for _ in range(n):
                record_skips({tag: 1})
            barrier.wait()
        results[tag] = dict(mine)

    threads = [threading.Thread(target=work, args=("a", 3)), threading.Thread(target=work, args=("b", 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"a": {"a": 3}, "b": {"b": 5}}


def test_report_lists_skip_reasons_per_pass():
    _, report = surgery.simplify(_norm_model(), 21, simplifier=None)
    entries = {p["pass"]: p for p in report["passes"]}
    assert entries["expand_group_norm"] == {"pass": "expand_group_norm", "count": 0, "nodes": 1,
                                            "skipped": {"below min_elements (2,048 < 2,097,152)": 1}}
    assert all(set(p) == {"pass", "count", "nodes", "skipped"} for p in report["passes"])
    assert entries["fold_norm_scale_shift"]["skipped"] == {"output has other readers (or is a graph output)": 1}
    assert entries["rewrite_einsum_attention"]["skipped"] == {}  # no candidates, no reasons

    _, report = surgery.simplify(_norm_model(scale_input=True), 21, simplifier=None,
                                 options={"expand_group_norm": {"min_elements": 1}})
    entries = {p["pass"]: p for p in report["passes"]}
    assert entries["expand_group_norm"]["skipped"] == {"scale is not a constant or gathered table row": 1}


def test_report_counts_reasons_most_frequent_first(tiny_unet):
    """The opset-18 U-Net kept at opset 18: every InstanceNormalization skipped by fuse_group_norm for the opset."""
    _, report = surgery.simplify(tiny_unet[0], 18, simplifier=None)
    entries = {p["pass"]: p for p in report["passes"][:-1]}
    assert entries["fuse_group_norm"]["skipped"] == {"opset 18 < 21": 21}
    _, report = surgery.simplify(tiny_unet[0], 21, simplifier=None)
    skipped = {p["pass"]: p["skipped"] for p in report["passes"][:-1]}
    assert sum(skipped["expand_group_norm"].values()) == 21  # all 21 norms are below 2^21 elements
    assert all(reason.startswith("below min_elements (") for reason in skipped["expand_group_norm"])
    counts = list(skipped["expand_group_norm"].values())
    assert counts == sorted(counts, reverse=True)
