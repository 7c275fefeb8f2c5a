"""cut_deep_cache: the skip connections found by structure, the two graphs, the identity, the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper
from surgery_helpers import make_model, run_ort

from surgery.cut_deep_cache import CACHE, CutRefused, cut_deep_cache, find_skip_connections


def _feeds(model, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.input:
        shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32) if inp.name == "x" else \
            np.array([37.0], dtype=np.float32)
    return feeds


def test_finds_every_skip_connection_of_a_unet(tiny_unet):
    model, _, _ = tiny_unet
    skips = find_skip_connections(gs.import_onnx(model))
    # channel_mult 1,2 and one ResBlock per level: 2 levels x (1 ResBlock + 1) decoder blocks, one skip each
    assert len(skips) == 4
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    for skip in skips:  # the deep input depends on the skip input, never the other way round
        assert tensors[skip.deep].shape[-2:] == tensors[skip.skip].shape[-2:]


def test_level_1_keeps_only_the_last_decoder_block(tiny_unet):
    model, _, _ = tiny_unet
    cut = cut_deep_cache(model, level=1)
    full_inputs = [i.name for i in cut.full.graph.input]
    assert [o.name for o in cut.full.graph.output][-1] == CACHE
    assert [i.name for i in cut.shallow.graph.input] == [*full_inputs, CACHE]
    assert [o.name for o in cut.shallow.graph.output] == [o.name for o in model.graph.output]
    assert cut.shallow_nodes < cut.full_nodes / 4
    assert cut.full_nodes == len(model.graph.node)
    deeper = cut_deep_cache(model, level=3)  # a deeper cut keeps more of the decoder
    assert cut.shallow_nodes < deeper.shallow_nodes < deeper.full_nodes
    onnx.checker.check_model(cut.full)
    onnx.checker.check_model(cut.shallow)


@pytest.mark.parametrize("level", [1, 2, 4])
def test_shallow_with_the_cached_feature_equals_the_full_graph(tiny_unet, level):
    model, _, _ = tiny_unet
    cut = cut_deep_cache(model, level=level)
    feeds = _feeds(model)
    (expected,) = run_ort(model, feeds)
    out, cache = run_ort(cut.full, feeds)
    np.testing.assert_array_equal(out, expected)  # the full graph computes what it did
    (shallow_out,) = run_ort(cut.shallow, {**feeds, CACHE: cache})
    scale = float(np.abs(expected).max())
    assert float(np.abs(shallow_out - expected).max()) <= 1e-5 * scale
    # another image's feature changes the output: the shallow graph really reads the cache
    _, other = run_ort(cut.full, _feeds(model, seed=1))
    (stale,) = run_ort(cut.shallow, {**feeds, CACHE: other})
    assert float(np.abs(stale - expected).max()) > 1e-3 * scale


def test_refuses_a_level_the_graph_does_not_have(tiny_unet):
    model, _, _ = tiny_unet
    with pytest.raises(CutRefused, match=r"level 5: the graph has 4 skip connections; choose 1\.\.4"):
        cut_deep_cache(model, level=5)


def test_refuses_a_cut_after_which_the_output_does_not_read_x(tiny_unet):
    model, _, _ = tiny_unet
    stem = find_skip_connections(gs.import_onnx(model))[0].skip  # the stem conv's output feeds everything
    with pytest.raises(CutRefused, match="do not read x"):
        cut_deep_cache(model, level=None, feature=stem)


def test_refuses_a_cut_that_does_not_separate_the_graph():
    # a Split's first half is the "feature", but its producer is still needed for the second half
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 2, 2])
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Split", ["r"], ["a", "b"], axis=1, num_outputs=2),
             helper.make_node("Concat", ["a", "b"], ["out"], axis=1)]
    model = make_model(nodes, [x], [out], opset=18)
    with pytest.raises(CutRefused, match="does not separate at a"):
        cut_deep_cache(model, level=None, feature="a")


def test_refuses_a_graph_without_skip_connections():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 2, 2])
    model = make_model([helper.make_node("Relu", ["x"], ["out"])], [x], [out], opset=18)
    with pytest.raises(CutRefused, match="no skip connection found"):
        cut_deep_cache(model)
    with pytest.raises(CutRefused, match="no input named 'image'"):
        cut_deep_cache(model, image_input="image")


def test_a_cut_graph_is_not_cut_again(tiny_unet):
    model, _, _ = tiny_unet
    cut = cut_deep_cache(model, level=1)
    with pytest.raises(CutRefused, match="already has a tensor named 'cache'"):
        cut_deep_cache(cut.full, level=1)
    again = cut_deep_cache(model, level=1)  # and the cut itself is deterministic
    assert again.full.SerializeToString() == cut.full.SerializeToString()
    assert again.shallow.SerializeToString() == cut.shallow.SerializeToString()
