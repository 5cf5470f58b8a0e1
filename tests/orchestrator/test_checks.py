"""The checks' verdict pipeline (orchestrator/checks.py): results in,
one write per change of verdict out; times are given, nothing waits."""
from __future__ import annotations

import pytest

from lbcore.config import Backend, HealthCheck, Service
from lbcore.routing import Routing
from lbcore.verdict import probers_for, results_digest
from orchestrator.checks import HealthChecks
from orchestrator.errors import BadRequestError

NODES = ["n1", "n2", "n3"]


def routing(kind: str = "tcp", up: bool = True, probers: int = 3, rise: int = 2, fall: int = 3) -> Routing:
    health = HealthCheck(kind=kind, interval_ms=1000, timeout_ms=500, rise=rise, fall=fall, probers=probers)
    backends = (Backend("b1", "10.0.0.1:80", 1, up), Backend("b2", "10.0.0.2:80", 1))
    return Routing.of(1, [Service("web", "127.0.0.1:8080", "wrr", backends, health)])


@pytest.fixture
def checks():
    writes: list[tuple[str, bool]] = []
    c = HealthChecks(lambda backend, up: writes.append((backend, up)), lambda line: None)
    c.writes = writes
    c.follow(routing(), 0.0)
    return c


def say(checks, t, down_nodes, backend="b1"):
    for node in NODES:
        checks.receive(node, {backend: node not in down_nodes}, False, t)


def run(checks, until, step=0.25):
    t = 0.0
    while t <= until:
        checks.tick(t, NODES)
        t += step


def test_a_majority_of_probers_takes_a_backend_down_after_fall_verdicts(checks):
    say(checks, 0.1, {"n1", "n2"})
    for t in (0.6, 1.6):  # two bad verdicts: fall is 3
        checks.tick(t, NODES)
        for node in NODES:  # each prober vouches for its results, as the periodic report does
            checks.vouch(node, results_digest(checks.by_node[node]), t)
    assert checks.writes == []
    checks.tick(2.6, NODES)
    assert checks.writes == [("b1", False)]


def test_one_prober_of_three_saying_down_changes_nothing(checks):
    say(checks, 0.1, {"n1"})
    for step in range(20):
        t = 0.5 + step * 0.5
        for node in NODES:
            checks.vouch(node, results_digest(checks.by_node[node]), t)
        checks.tick(t, NODES)
    assert checks.writes == []


def test_results_older_than_three_intervals_count_as_none(checks):
    say(checks, 0.1, {"n1", "n2"})
    checks.tick(0.6, NODES)
    checks.tick(10.0, NODES)  # nobody vouched since: no fresh result, no verdict
    checks.tick(11.0, NODES)
    assert checks.writes == []


def test_alternating_verdicts_never_change_state(checks):
    for i in range(40):
        t = 0.1 + i
        say(checks, t, {"n1", "n2", "n3"} if i % 2 else set())
        checks.tick(t + 0.5, NODES)
    assert checks.writes == []


def test_a_flapping_backend_changes_state_at_most_five_times_then_is_held_down():
    writes = []
    c = HealthChecks(lambda b, up: writes.append((b, up)), lambda line: None)
    c.follow(routing(rise=1, fall=1), 0.0)
    for i in range(60):  # its state follows each verdict (rise = fall = 1)
        t = 1.0 + i
        say(c, t, {"n1", "n2", "n3"} if i % 2 == 0 else set())
        c.tick(t + 0.5, NODES)
    assert 1 <= len(writes) <= 5
    assert writes[-1] == ("b1", False)  # held down
    assert c.evidence("b1", 61.0, NODES)["held_for_s"] > 0


def test_an_operators_report_resets_the_counter(checks):
    checks.operator_set("b1", False)
    say(checks, 0.1, set())
    checks.tick(0.6, NODES)
    assert checks.writes == []  # one good verdict; rise is 2
    for node in NODES:
        checks.vouch(node, results_digest(checks.by_node[node]), 1.5)
    checks.tick(1.6, NODES)
    assert checks.writes == [("b1", True)]


def test_results_for_an_unknown_backend_are_refused_and_nothing_is_taken(checks):
    with pytest.raises(BadRequestError, match="no backend 'nope'"):
        checks.receive("n1", {"b1": False, "nope": True}, False, 0.0)
    assert checks.by_node.get("n1", {}) == {}


def test_a_lost_result_is_found_by_the_digest(checks):
    checks.receive("n1", {"b1": True}, False, 0.0)
    assert checks.vouch("n1", results_digest({"b1": True}), 0.5)
    assert not checks.vouch("n1", results_digest({"b1": False}), 1.0)  # a change the control plane missed
    checks.receive("n1", {"b1": False}, True, 1.1)  # the full set, again
    assert checks.vouch("n1", results_digest({"b1": False}), 1.5)


def test_the_current_probers_are_chosen_among_the_live_nodes(checks):
    probers = probers_for("b1", NODES + ["n4", "n5"], 2)
    assert len(probers) == 2
    assert [p["node"] for p in checks.evidence("b1", 0.0, NODES)["probers"]] == probers_for("b1", NODES, 3)


def test_a_backend_down_in_the_routing_starts_down_and_comes_back_after_rise():
    writes = []
    c = HealthChecks(lambda b, up: writes.append((b, up)), lambda line: None)
    c.follow(routing(up=False), 0.0)
    say(c, 0.1, set())
    c.tick(0.6, NODES)
    for node in NODES:
        c.vouch(node, results_digest(c.by_node[node]), 1.5)
    c.tick(1.6, NODES)
    assert writes == [("b1", True)]


def test_unchecked_services_are_not_checked():
    c = HealthChecks(lambda b, up: None, lambda line: None)
    c.follow(routing(kind="none"), 0.0)
    assert c.checked == {}
    c.receive("n1", {"b1": False}, False, 0.0)  # taken (a known backend), counts for nothing


def test_many_backends_changing_at_once_are_decided_in_few_turns():
    """Verdicts fall due on a grid: 200 backends dying over 0.8 s are
    written in a few dozen turns (each turn one recompute), not 200."""
    health = HealthCheck(kind="tcp", interval_ms=1000, timeout_ms=500, rise=1, fall=1, probers=1)
    backends = tuple(Backend(f"b{i:03}", f"10.0.{i // 200}.{i % 200 + 1}:80", 1) for i in range(200))
    turns: list[float] = []
    now = [0.0]
    c = HealthChecks(lambda b, up: turns.append(now[0]), lambda line: None)
    c.follow(Routing.of(1, [Service("web", "127.0.0.1:8080", "wrr", backends, health)]), 0.0)
    t = 0.0
    while t < 3.0:
        now[0] = t
        i = int((t - 0.1) / 0.004)
        if 0 <= i < 200 and t >= 0.1:
            c.receive("n1", {f"b{i:03}": False}, False, t)
        c.tick(t, ["n1"])
        t = round(t + 0.001, 3)
    assert len(turns) == 200
    assert len(set(turns)) <= 30, len(set(turns))


def test_a_verdict_the_store_cannot_write_is_tried_again_and_nothing_stops():
    attempts: list[tuple[str, bool]] = []

    def failing(backend: str, up: bool) -> None:
        attempts.append((backend, up))
        if len(attempts) == 1:
            raise OSError("disk full")

    lines: list[str] = []
    c = HealthChecks(failing, lines.append)
    c.follow(routing(rise=1, fall=1), 0.0)
    say(c, 0.1, set(NODES))
    c.tick(0.6, NODES)
    assert attempts == [("b1", False)] and c.checked["b1"].up  # not written: still up as stored
    assert "not written" in lines[-1]
    for node in NODES:
        c.vouch(node, results_digest(c.by_node[node]), 1.5)
    c.tick(1.6, NODES)
    assert attempts == [("b1", False), ("b1", False)] and not c.checked["b1"].up


def test_an_operators_report_lifts_a_hold_for_flapping():
    writes = []
    c = HealthChecks(lambda b, up: writes.append((b, up)), lambda line: None)
    c.follow(routing(rise=1, fall=1), 0.0)
    for i in range(12):
        t = 1.0 + i
        say(c, t, set(NODES) if i % 2 == 0 else set())
        c.tick(t + 0.5, NODES)
    assert c.evidence("b1", 13.0, NODES)["held_for_s"]
    c.operator_set("b1", True)
    say(c, 14.0, set())
    c.tick(14.5, NODES)
    assert c.evidence("b1", 14.5, NODES)["held_for_s"] is None
    assert writes[-1] == ("b1", False)  # nothing new written: up as the operator said, and the checks agree
