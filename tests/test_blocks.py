"""bench/blocks.py: turns of steps in one process, and what is read from them."""

from __future__ import annotations

import pytest

from tests.bench_modules import bench_modules


def test_turns_alternate_their_order_every_round():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    with bench_modules("blocks") as (blocks,):
        ms = blocks.take_turns(steps, block=2, rounds=3)
    assert calls == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert [len(times) for times in ms["a"]] == [2, 2, 2] and len(ms["b"]) == 3


def test_a_block_summary_leaves_out_each_blocks_first_step():
    step_ms = {
        "ours": [[500.0, 100.0, 100.0], [900.0, 110.0, 90.0]],  # first steps pay for a switch
        "theirs": [[100.0, 120.0, 120.0], [100.0, 130.0, 120.0]],
    }
    with bench_modules("blocks") as (blocks,):
        found = blocks.block_summary(step_ms, "ours", "theirs")
    assert found["ours"]["median_ms"] == 100.0  # of 100, 100, 110, 90
    assert found["theirs"]["median_ms"] == 120.0  # of 120, 120, 130, 120
    assert found["speed_ratio"] == pytest.approx(1.2)  # above 1: ours is faster
    assert found["ours"]["rounds_ms"] == [100.0, 110.0]
    assert found["rounds_faster"] == 2


def test_the_ratio_by_first_is_a_geometric_mean_per_order():
    each = [{"speed_ratio": 2.0}, {"speed_ratio": 0.5}, {"speed_ratio": 8.0}]
    with bench_modules("blocks") as (blocks,):
        by_first = blocks.ratio_by_first(each, ["x", "y", "x"], ("x", "y", "z"))
        overall = blocks.geometric_mean([s["speed_ratio"] for s in each])
    assert by_first == pytest.approx({"x": 4.0, "y": 0.5})  # no process had z first
    assert overall == pytest.approx(2.0)
