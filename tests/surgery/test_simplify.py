"""surgery.simplify on a whole small U-Net export (opset 18 → 21), its report and its fallbacks."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from surgery_helpers import ops, run_ort

import surgery
from surgery import simplify

PASS_ORDER = ["fold_constants", "remove_identity", "remove_cast_pairs", "rewrite_einsum_attention",
              "fuse_group_norm", "fold_norm_scale_shift", "expand_group_norm", "rewrite_upsample_conv",
              "merge_table_gathers", "fold_constants"]


def _tagged(model):
    """The export with metadata the stages must carry through."""
    model.metadata_props.add(key="fxpass.config", value="tiny")
    model.graph.input[0].metadata_props.add(key="fxpass.role", value="noisy image")
    return model


@pytest.fixture(scope="module")
def simplified(tiny_unet):
    model, feeds, expected = tiny_unet
    model = _tagged(model)
    result, report = simplify(model, 21)
    return model, result, report, feeds, expected


def test_simplifies_unet_to_opset_21(simplified):
    model, result, report, feeds, expected = simplified
    before = ops(model)
    after = ops(result)
    onnx.checker.check_model(result)
    # torch 2.13 at opset 18: GroupNorm as Reshape/InstanceNormalization/Reshape/Mul/Add, attention as Einsum
    assert before["InstanceNormalization"] == 21 and before["Einsum"] == 8
    assert [p["pass"] for p in report["passes"]] == PASS_ORDER
    counts = {p["pass"]: p["count"] for p in report["passes"][:-1]}
    assert counts["rewrite_einsum_attention"] == 8
    assert counts["fuse_group_norm"] == 21
    # this export computes the time embedding in the graph: its scale/shift are not per-channel
    # constants or gathered rows, and its 32x32 activations are below expand_group_norm's size
    assert counts["fold_norm_scale_shift"] == 0 and counts["expand_group_norm"] == 0
    assert counts["rewrite_upsample_conv"] == 1 and counts["merge_table_gathers"] == 0  # no tables here
    assert "Einsum" not in after and "InstanceNormalization" not in after and "Resize" not in after
    assert after["GroupNormalization"] == 21 and after["MatMul"] == 8 and after["DepthToSpace"] == 1
    assert report["opset"] == {"before": 18, "after": 21}
    assert report["nodes"]["before"] == len(model.graph.node) == sum(report["ops"]["before"].values())
    assert report["nodes"]["after"] == len(result.graph.node) == sum(report["ops"]["after"].values())
    # each fusion turns 5 nodes into 1, each einsum becomes Transpose + MatMul, the upsample
    # Resize + Conv becomes 4 Conv + Concat + DepthToSpace; nothing else changes here
    assert report["nodes"]["after"] == report["nodes"]["before"] - 21 * 4 + 8 + 4
    assert report["simplifier"]["name"] == "onnxslim" and report["simplifier"]["status"] == "ok"


def test_keeps_names_and_metadata(simplified):
    model, result, _, _, _ = simplified
    assert [i.name for i in result.graph.input] == [i.name for i in model.graph.input] == ["x", "timesteps"]
    assert [o.name for o in result.graph.output] == [o.name for o in model.graph.output]
    meta = {p.key: p.value for p in result.metadata_props}
    assert meta["fxpass.config"] == "tiny"
    assert {p.key: p.value for p in result.graph.input[0].metadata_props}["fxpass.role"] == "noisy image"


def test_numerics_match_torch_and_the_export(simplified):
    model, result, _, feeds, expected = simplified
    (original,) = run_ort(model, feeds)
    (got,) = run_ort(result, feeds)
    np.testing.assert_allclose(got, original, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_idempotent(simplified):
    _, result, _, feeds, _ = simplified
    again, report = simplify(result, 21)
    assert all(p["count"] == 0 for p in report["passes"]), report["passes"]
    assert report["nodes"]["after"] == report["nodes"]["before"]
    np.testing.assert_allclose(run_ort(again, feeds)[0], run_ort(result, feeds)[0], rtol=0, atol=0)


def test_skips_group_norm_fusion_below_opset_21(tiny_unet):
    model, feeds, expected = tiny_unet
    result, report = simplify(model, 18, simplifier=None)
    counts = {p["pass"]: p["count"] for p in report["passes"][:-1]}
    assert counts["fuse_group_norm"] == 0 and counts["rewrite_einsum_attention"] == 8
    assert ops(result)["InstanceNormalization"] == 21 and "GroupNormalization" not in ops(result)
    assert report["opset"] == {"before": 18, "after": 18}
    assert report["simplifier"]["status"] == "skipped"
    np.testing.assert_allclose(run_ort(result, feeds)[0], expected, rtol=1e-4, atol=1e-5)


def test_simplifier_failure_falls_back(tiny_unet, monkeypatch):
    model, feeds, expected = tiny_unet

    def broken(name, m):
        raise RuntimeError("simulated simplifier crash")

    monkeypatch.setattr(surgery.orchestrator, "_run_simplifier", broken)
    with pytest.warns(UserWarning, match="onnxslim failed"):
        result, report = simplify(model, 21)
    assert report["simplifier"]["status"].startswith("failed: RuntimeError")
    plain, _ = simplify(model, 21, simplifier=None)
    assert ops(result) == ops(plain)
    np.testing.assert_allclose(run_ort(result, feeds)[0], expected, rtol=1e-4, atol=1e-5)


def test_rejects_unknown_simplifier(tiny_unet):
    with pytest.raises(ValueError, match="unknown simplifier"):
        simplify(tiny_unet[0], 21, simplifier="onnxsim")


def test_large_model_path_uses_external_data(tiny_unet, monkeypatch, tmp_path):
    """Over the 2 GB limit (simulated by lowering it): tools run on an external-data copy, save splits."""
    model, feeds, expected = tiny_unet
    monkeypatch.setattr(surgery.modelio, "LARGE_MODEL_BYTES", 100_000)
    with pytest.warns(UserWarning, match="over 2 GB"):
        result, report = simplify(model, 21)
    assert report["opset"]["after"] == 21 and ops(result)["GroupNormalization"] == 21
    assert report["simplifier"]["status"].startswith("skipped")
    path = tmp_path / "unet.onnx"
    surgery.save_model(result, path)
    assert (tmp_path / "unet.onnx.data").stat().st_size > 1_000_000
    assert path.stat().st_size < 200_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    loaded = onnx.load(str(path))
    np.testing.assert_allclose(run_ort(loaded, feeds)[0], expected, rtol=1e-4, atol=1e-5)


def test_surgery_does_not_import_torch():
    code = (
        "import sys, surgery, surgery.convert_precision, surgery.fuse_group_norm; "
        "assert 'torch' not in sys.modules, 'surgery imported torch'"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_every_pass_alone_keeps_the_numerics_and_counts_its_rewrites(tiny_unet):
    """Each table entry called as a plain function, in order, on the opset-18 export (no simplifier, no
    opset conversion): its count is what it rewrote, and after each the graph computes what torch did."""
    import onnx_graphsurgeon as gs

    model, feeds, expected = tiny_unet
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    counts = []
    for entry in surgery.PASSES:
        graph, count = entry.fn(graph)
        assert isinstance(graph, gs.Graph) and type(count) is int, entry.name
        counts.append((entry.name, count))
        np.testing.assert_allclose(run_ort(graph, feeds)[0], expected, rtol=1e-4, atol=1e-5, err_msg=entry.name)
    # at opset 18 fuse_group_norm (and the folds that follow it) have nothing to work on
    rewrites = {"rewrite_einsum_attention": 8, "rewrite_upsample_conv": 1}
    assert counts == [(name, rewrites.get(name, 0)) for name in PASS_ORDER]


def test_types_tensors_after_group_normalization_21():
    """onnx's shape inference leaves GroupNormalization-21 outputs untyped; the passes still see shapes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, src = [], [], "x"
    for k in range(2):
        inits += [numpy_helper.from_array((1 + 0.3 * rng.standard_normal(8)).astype(np.float32), f"g{k}"),
                  numpy_helper.from_array((0.3 * rng.standard_normal(8)).astype(np.float32), f"b{k}"),
                  numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), f"m{k}"),
                  numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), f"a{k}")]
        nodes += [helper.make_node("GroupNormalization", [src, f"g{k}", f"b{k}"], [f"n{k}"], num_groups=4),
                  helper.make_node("Gather", [f"m{k}", "t_index"], [f"mr{k}"], axis=0),
                  helper.make_node("Gather", [f"a{k}", "t_index"], [f"ar{k}"], axis=0),
                  helper.make_node("Mul", [f"n{k}", f"mr{k}"], [f"s{k}"]),
                  helper.make_node("Add", [f"s{k}", f"ar{k}"], [f"h{k}"])]
        src = f"h{k}"
    nodes.append(helper.make_node("Sigmoid", ["h1"], ["out"]))
    graph = helper.make_graph(nodes, "two_norms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 5]),
                                                   helper.make_tensor_value_info("t_index", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    result, report = simplify(model, 21, simplifier=None)
    counts = {p["pass"]: p["count"] for p in report["passes"]}
    assert counts["fold_norm_scale_shift"] == 2 and counts["merge_table_gathers"] == 3
    assert ops(result) == {"GroupNormalization": 2, "Squeeze": 1, "Gather": 1, "Split": 1, "Sigmoid": 1}
    for t in range(4):
        feeds = {"x": rng.standard_normal((1, 8, 5, 5)).astype(np.float32), "t_index": np.array([t], np.int64)}
        np.testing.assert_allclose(run_ort(result, feeds)[0], run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)
