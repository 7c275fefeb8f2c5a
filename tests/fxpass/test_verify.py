"""fxpass.inputs: the one seeded input source and the gate's choice of schedule positions and batches."""

from __future__ import annotations

import numpy as np

from fxpass.inputs import InputSpec, gate_t_indices, mixed_batches, seeded_feeds, spread

SPECS = [InputSpec("x", "float32", (1, 3, 8, 8)), InputSpec("t_index", "int64", (1,)),
         InputSpec("noise", "float32", (1, 3, 8, 8)), InputSpec("y", "int64", (1,))]
TS = list(range(0, 100, 10))


def test_draws_follow_graph_input_order_from_one_generator():
    feeds = seeded_feeds(SPECS, seed=5, timesteps=TS, model_timesteps=TS, t_indices=[3, 7], num_classes=10)
    rng = np.random.default_rng(5)
    for feed, t in zip(feeds.feeds, [3, 7]):
        np.testing.assert_array_equal(feed["x"], rng.standard_normal((1, 3, 8, 8), dtype=np.float32))
        np.testing.assert_array_equal(feed["noise"], rng.standard_normal((1, 3, 8, 8), dtype=np.float32))
        np.testing.assert_array_equal(feed["y"], rng.integers(0, 10, size=(1,), dtype=np.int64))
        assert feed["t_index"].tolist() == [t] and feed["t_index"].dtype == np.int64
    assert feeds.labels[1] == {"t_index": 7, "timestep": 70, "model_timestep": 70}


def test_same_seed_same_feeds_and_labels_come_from_the_class_count():
    a = seeded_feeds(SPECS, seed=1, timesteps=TS, model_timesteps=TS, t_indices=list(range(10)), num_classes=3)
    b = seeded_feeds(SPECS, seed=1, timesteps=TS, model_timesteps=TS, t_indices=list(range(10)), num_classes=3)
    assert all(np.array_equal(fa[k], fb[k]) for fa, fb in zip(a.feeds, b.feeds) for k in fa)
    assert {int(f["y"][0]) for f in a.feeds} <= {0, 1, 2}


def test_mixed_batch_rows_and_dynamic_dims():
    specs = [InputSpec("x", "float32", (-1, 3, 8, 8)), InputSpec("t_index", "int64", (-1,))]
    feeds = seeded_feeds(specs, seed=0, timesteps=TS, model_timesteps=TS, t_indices=[[1, 4, 9]])
    assert feeds.feeds[0]["x"].shape == (3, 3, 8, 8) and feeds.feeds[0]["t_index"].tolist() == [1, 4, 9]
    assert feeds.labels[0]["t_indices"] == [1, 4, 9] and feeds.labels[0]["batch"] == 3


def test_fixed_mode_feeds_have_no_t_index_schedule():
    specs = [InputSpec("x", "float32", (1, 3, 8, 8))]
    feeds = seeded_feeds(specs, seed=0, timesteps=[42], model_timesteps=[42], count=3)
    assert len(feeds.feeds) == 3 and [lb["input"] for lb in feeds.labels] == [0, 1, 2]


def test_gate_covers_ends_middle_and_seeded_others():
    chosen = gate_t_indices(250, seed=1234)
    assert {0, 125, 249} <= set(chosen) and len(chosen) == 5 and chosen == sorted(chosen)
    assert gate_t_indices(250, seed=1234) == chosen
    assert gate_t_indices(2, seed=0) == [0, 1]


def test_mixed_batches_mix_positions():
    batches = mixed_batches(50, seed=0)
    assert [len(b) for b in batches] == [2, 3] and all(len(set(b)) == len(b) for b in batches)


def test_spread():
    assert spread(250) == [0, 62, 124, 187, 249] and spread(3) == [0, 1, 2]
