"""What lbctl explain and health show answer (orchestrator/health_view.py),
from a state, the checks and the nodes' ejections put together."""
from __future__ import annotations

import time

import pytest

from lbcore.config import Backend as Row
from lbcore.config import HealthCheck, Service
from lbcore.routing import Routing
from orchestrator.checks import HealthChecks
from orchestrator.errors import NotFoundError
from orchestrator.health_view import NodeEjections, explain, health_rows
from orchestrator.model import Backend, Health, Membership, Policy, State


def state(*backends: Backend, health: tuple[Health, ...] = ()) -> State:
    return State(7, (Policy("web", "127.0.0.1:8080", "wrr", 1),), tuple(backends), health, 1)


def record(backend_id: str, weight: int = 1, membership: Membership = Membership.ACTIVE) -> Backend:
    return Backend("web", backend_id, "10.0.0.1:80", weight, membership, 1)


def checks() -> HealthChecks:
    c = HealthChecks(lambda b, up: None, lambda line: None)
    health = HealthCheck(kind="tcp", interval_ms=1000, timeout_ms=500, probers=1)
    service = Service("web", "127.0.0.1:8080", "wrr", (Row("a", "10.0.0.1:80", 1),), health)
    c.follow(Routing.of(1, [service]), 0.0)
    return c


def reasons(s: State, backend: str, ejections: dict | None = None) -> tuple[bool, list[str]]:
    answer = explain(s, checks(), ejections or {}, ["n1"], "web", backend)
    return answer["eligible"], answer["reasons"]


def test_an_active_up_backend_is_eligible_and_says_why():
    eligible, said = reasons(state(record("a")), "a")
    assert eligible and said[0].startswith("eligible: active, weight 1, health up (no observation)")


@pytest.mark.parametrize("make, health, key", [
    (lambda: record("a", membership=Membership.DRAINING), (), "membership: draining"),
    (lambda: record("a", weight=0), (), "weight: 0"),
    (lambda: record("a"), (Health("a", False, 3, "report", 0.0),),
     "health: down (an operator's report, revision 3)"),
    (lambda: record("a"), (Health("a", False, 4, "checks", 0.0),),
     "health: down (checks, revision 4; 0 of 1"),
])
def test_each_reason_a_backend_takes_no_new_connections_is_named(make, health, key):
    eligible, said = reasons(state(make(), health=health), "a")
    assert not eligible and any(r.startswith(key) for r in said), said


def test_an_ejection_on_a_node_is_named_with_the_time_left_and_ends():
    now = time.monotonic()
    eligible, said = reasons(state(record("a")), "a", {"n1": NodeEjections({"web": {"a": 5000}}, {}, now)})
    assert not eligible and any(r.startswith("ejected: on node n1 for ") for r in said), said
    long_ago = {"n1": NodeEjections({"web": {"a": 5000}}, {}, now - 6)}
    eligible, said = reasons(state(record("a")), "a", long_ago)
    assert eligible  # reported 6 s ago with 5 s left: over


def test_an_unknown_backend_is_not_found():
    with pytest.raises(NotFoundError, match="no backend web/zz"):
        explain(state(record("a")), checks(), {}, [], "web", "zz")


def test_health_show_lists_backends_not_removed_with_their_evidence():
    s = state(record("a"), record("gone", membership=Membership.REMOVED),
              health=(Health("a", False, 2, "checks", 100.0),))
    rows = health_rows(s, checks(), {}, ["n1"], None)
    assert [(r["id"], r["state"], r["source"], r["revision"]) for r in rows] == [("a", "down", "checks", 2)]
    assert rows[0]["probers"] == [{"node": "n1", "result": None, "age_ms": None}]
    assert rows[0]["counter"] == {"health": 4, "rise": 2, "fall": 3}  # the routing it follows has it up
