"""The health verdict alone (orchestrator/health.py), against its rules:
rendezvous choice of probers, quorum of fresh results, rise/fall as one
counter, flap damping."""
from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given

from orchestrator.health import FlapDamper, Result, RiseFall, probers_for, quorum

NODES = [f"node-{i}" for i in range(10)]


@given(backend=st.text(min_size=1, max_size=20), k=st.integers(0, 12))
def test_probers_are_k_distinct_nodes_whatever_the_order(backend, k):
    chosen = probers_for(backend, NODES, k)
    assert len(chosen) == min(k, len(NODES)) == len(set(chosen))
    assert chosen == probers_for(backend, list(reversed(NODES)), k)


@given(backend=st.text(min_size=1, max_size=20), k=st.integers(1, 5), gone=st.sampled_from(NODES))
def test_a_node_that_leaves_moves_only_the_backends_it_probed(backend, k, gone):
    before = probers_for(backend, NODES, k)
    after = probers_for(backend, [n for n in NODES if n != gone], k)
    if gone not in before:
        assert after == before
    else:
        assert set(before) - {gone} <= set(after) and len(set(after) - set(before)) == 1


def test_probes_grow_with_k_not_with_the_fleet():
    backends = [f"b{i}" for i in range(1000)]
    for fleet in (5, 10, 20):
        nodes = [f"n{i}" for i in range(fleet)]
        load = {n: 0 for n in nodes}
        for b in backends:
            for n in probers_for(b, nodes, 2):
                load[n] += 1
        assert sum(load.values()) == 2000  # k x M, whatever N
        assert max(load.values()) < 2.0 * 2000 / fleet  # spread over the fleet


def test_quorum_is_a_majority_of_the_current_probers_fresh_results():
    probers = ["a", "b", "c"]
    at = 10.0
    assert quorum({}, probers, at, 1.0) is None
    up, down = Result(True, at), Result(False, at)
    assert quorum({"a": down, "b": up, "c": up}, probers, at, 1.0) is True  # one of three says down: up
    assert quorum({"a": down, "b": down}, probers, at, 1.0) is False
    assert quorum({"a": down}, probers, at, 1.0) is None  # one of three: no majority, and no vote for up
    assert quorum({"a": down, "b": up}, probers, at, 1.0) is None  # a tie of the fresh: no verdict
    assert quorum({"a": down, "b": Result(False, at - 3.5), "c": up}, probers, at, 1.0) is None  # b stale
    assert quorum({"a": down, "x": down, "b": up, "c": up}, probers, at, 1.0) is True  # x is no prober
    assert quorum({"a": Result(True, at - 5)}, probers, at, 1.0) is None  # nothing fresh


@pytest.mark.parametrize("rise, fall", [(1, 1), (2, 3), (3, 2), (5, 5)])
def test_rise_and_fall_count_consecutive_verdicts(rise, fall):
    health = RiseFall(rise, fall)
    assert health.up
    for _ in range(fall - 1):
        assert health.observe(False) is None
    assert health.observe(False) is False  # the fall-th bad verdict in a row
    for _ in range(rise - 1):
        assert health.observe(True) is None
    assert health.observe(True) is True  # the rise-th good one


@given(rise=st.integers(2, 6), fall=st.integers(2, 6), start_up=st.booleans(), n=st.integers(1, 50))
def test_alternating_verdicts_never_change_state(rise, fall, start_up, n):
    health = RiseFall(rise, fall, up=start_up)
    for i in range(n):
        assert health.observe(i % 2 == 0) is None
    assert health.up is start_up


@given(rise=st.integers(1, 5), fall=st.integers(1, 5), verdicts=st.lists(st.booleans(), max_size=60))
def test_the_counter_stays_in_range_and_state_follows_it(rise, fall, verdicts):
    health = RiseFall(rise, fall)
    for good in verdicts:
        health.observe(good)
        assert 0 <= health.health <= rise + fall - 1
        assert health.up == (health.health >= rise)


def test_too_many_changes_in_the_window_hold_the_backend_down():
    damper = FlapDamper(max_changes=4, window_s=60, hold_s=120)
    assert [damper.record(t) for t in (0, 10, 20, 30)] == [False] * 4
    assert damper.record(40) is True and damper.held(41) and damper.held(159)
    assert not damper.held(161)
    spaced = FlapDamper(max_changes=4, window_s=60, hold_s=120)
    assert not any(spaced.record(t) for t in range(0, 1000, 20))  # 3 per window: never held


def test_rise_and_fall_are_at_least_one():
    with pytest.raises(ValueError):
        RiseFall(0, 3)
