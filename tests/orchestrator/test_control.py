"""The admin API: verbs, CAS answers, and bad requests that change nothing."""
from __future__ import annotations

import json

import pytest

from lbcore.wire import MAX_REQUEST
from orchestrator.control import ControlPlane
from orchestrator.model import Change
from orchestrator.store import SqliteStore


@pytest.fixture
def plane(tmp_path):
    store = SqliteStore(tmp_path / "state.db")
    changes: list[Change] = []
    plane = ControlPlane(store, on_change=lambda change, version: changes.append(change))
    plane.changes = changes  # type: ignore[attr-defined]
    yield plane
    store.close()


def call(plane: ControlPlane, verb: str, **args) -> dict:
    return plane.answer(json.dumps({"verb": verb, "args": args}).encode())[1]


def test_a_write_answers_the_new_version_and_triggers_a_recompute(plane):
    assert call(plane, "policy.set", service="web", algorithm="wrr", listen="127.0.0.1:8080",
                expected_version=0) == {"ok": True, "result": {"version": 1}}
    reply = call(plane, "backend.add", service="web", id="w1", address="127.0.0.1:9001")
    assert reply["result"] == {"version": 2}
    assert plane.changes == [Change(service="web"), Change(backend=("web", "w1"))]
    (backend,) = call(plane, "backend.list", service="web")["result"]
    assert (backend["id"], backend["state"], backend["weight"]) == ("w1", "active", 1)


def test_remove_drains(plane):
    call(plane, "policy.set", service="web", algorithm="wrr", listen="127.0.0.1:8080")
    call(plane, "backend.add", service="web", id="w1", address="127.0.0.1:9001")
    assert call(plane, "backend.remove", service="web", id="w1", expected_version=1)["ok"]
    assert call(plane, "backend.list")["result"][0]["state"] == "draining"


def test_conflict_names_expected_and_current(plane):
    call(plane, "policy.set", service="web", algorithm="wrr", listen="127.0.0.1:8080")
    reply = call(plane, "policy.set", service="web", algorithm="maglev", expected_version=5)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "version_conflict"
    assert (reply["error"]["expected"], reply["error"]["current"]) == (5, 1)
    assert call(plane, "policy.get", service="web")["result"]["algorithm"] == "wrr"


def test_stale_health_changes_nothing(plane):
    call(plane, "policy.set", service="web", algorithm="wrr", listen="127.0.0.1:8080")
    call(plane, "backend.add", service="web", id="w1", address="127.0.0.1:9001")
    assert call(plane, "health.report", backend="w1", up=False, revision=3)["result"]["applied"] is True
    before = len(plane.changes)
    refused = call(plane, "health.report", backend="w1", up=True, revision=2)["error"]
    assert refused["code"] == "bad_request"
    assert "revision 2 of w1 is not newer than the stored revision 3: nothing changed" in refused["message"]
    assert len(plane.changes) == before
    assert [(h["backend_id"], h["up"], h["revision"]) for h in call(plane, "health.show")["result"]] \
        == [("w1", False, 3)]


@pytest.mark.parametrize("raw, fragment", [
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", '"verb"'),
    (b'{"verb": "backend.explode"}', "unknown verb"),
    (b'{"verb": "backend.add", "args": {"service": "web"}}', "missing address, id"),
    (b'{"verb": "backend.add", "args": {"service": "web", "id": "x", "address": "127.0.0.1:1", "colour": 1}}',
     "unknown argument colour"),
    (b'{"verb": "backend.add", "args": {"service": 7, "id": "x", "address": "127.0.0.1:1"}}',
     "service must be a string"),
    (b'{"verb": "backend.set_weight", "args": {"service": "web", "id": "w1", "weight": "heavy"}}', "weight"),
    (b'{"verb": "health.report", "args": {"backend": "w1", "up": "yes", "revision": 1}}', "up must be"),
    (b'{"verb": "policy.get", "args": {"service": "nope"}}', "no service"),
    (b"x" * (MAX_REQUEST + 1), "exceeds"),
    (b"[" * 5000, "request"),                       # nested past the parser's recursion limit
    (b'{"verb": "health.report", "args": {"backend": "w1", "up": true, "revision": 18446744073709551616}}',
     "revision"),
    (b'{"verb": "health.report", "args": {"backend": "ghost", "up": true, "revision": 1}}', "no backend"),
    (b'{"verb": "policy.set", "args": {"service": "api", "algorithm": "wrr", "listen": "127.0.0.1:08080"}}',
     "already used"),                               # the same address spelled otherwise
    (b'{"verb": "policy.set", "args": {"service": "web", "lifecycle": {"max_queue": -1}}}',
     "lifecycle.max_queue: must be 0..1000000 (got -1)"),
    (b'{"verb": "policy.set", "args": {"service": "web", "lifecycle": {"slow_start_aggression": 0}}}',
     "lifecycle.slow_start_aggression: must be more than 0"),
    (b'{"verb": "policy.set", "args": {"service": "web", '
     b'"lifecycle": {"slow_start_min_weight_percent": 101}}}',
     "must be 0..100"),
    (b'{"verb": "policy.set", "args": {"service": "web", "lifecycle": {"on_drain_timeout": "explode"}}}',
     "'explode' is not one of: close, keep"),
    (b'{"verb": "policy.set", "args": {"service": "web", "lifecycle": {"drain_timeout_ms": 1000000000000}}}',
     "drain_timeout_ms: must be 0..2147483647"),
    (b'{"verb": "policy.set", "args": {"service": "web", "lifecycle": {"colour": 1}}}',
     "lifecycle.colour: unknown key"),
    (b'{"verb": "policy.set", "args": {"service": "web", "algorithm": "maglev", '
     b'"lifecycle": {"slow_start_ms": 1000}}}', "maglev keeps each client on its backend"),
    (b'{"verb": "backend.set", "args": {"service": "web", "id": "w1", "max_conns": -1}}',
     "max_conns must be an integer 0..1000000 (got -1)"),
    (b'{"verb": "backend.set", "args": {"service": "web", "id": "w1"}}', "nothing to set"),
    (b'{"verb": "backend.set", "args": {"service": "web", "id": "w9", "weight": 2}}', "no backend web/w9"),
    (b'{"verb": "backend.add", "args": {"service": "web", "id": "x", "address": "127.0.0.1:1", '
     b'"max_conns": 10000000}}', "max_conns must be an integer"),
])
def test_bad_requests_get_a_clear_error_and_change_nothing(plane, raw, fragment):
    call(plane, "policy.set", service="web", algorithm="wrr", listen="127.0.0.1:8080")
    call(plane, "backend.add", service="web", id="w1", address="127.0.0.1:9001")
    before = plane.store.read()
    reply = plane.answer(raw)[1]
    assert reply["ok"] is False and reply["error"]["code"] in ("bad_request", "not_found")
    assert fragment in reply["error"]["message"]
    assert plane.store.read() == before


def test_slow_start_is_refused_when_only_the_algorithm_turns_maglev(plane):
    call(plane, "policy.set", service="web", algorithm="wrr", listen="127.0.0.1:8080",
         lifecycle={"slow_start_ms": 5000})
    before = plane.store.read()
    reply = call(plane, "policy.set", service="web", algorithm="maglev")
    assert "lifecycle.slow_start_ms: maglev keeps each client on its backend" in reply["error"]["message"]
    assert plane.store.read() == before


def test_backend_set_changes_what_it_is_given(plane):
    call(plane, "policy.set", service="web", algorithm="wrr", listen="127.0.0.1:8080")
    call(plane, "backend.add", service="web", id="w1", address="127.0.0.1:9001", weight=3, max_conns=7)
    assert call(plane, "backend.set", service="web", id="w1", max_conns=5)["ok"]
    (record,) = call(plane, "backend.list")["result"]
    assert (record["weight"], record["max_conns"]) == (3, 5)
    assert call(plane, "backend.set", service="web", id="w1", weight=2, expected_version=2)["ok"]
    (record,) = call(plane, "backend.list")["result"]
    assert (record["weight"], record["max_conns"], record["version"]) == (2, 5, 3)
    policy = call(plane, "policy.get", service="web")["result"]
    assert policy["lifecycle"]["drain_timeout_ms"] == 300000 and policy["lifecycle"]["max_queue"] == 0


def test_commits_and_verdict_changes_are_told_whoever_writes(plane):
    commits: list[float] = []
    transitions: list[str] = []
    plane.on_commit = commits.append
    plane.on_health_transition = transitions.append
    call(plane, "policy.set", service="web", algorithm="wrr", listen="127.0.0.1:8080")
    call(plane, "backend.add", service="web", id="w1", address="127.0.0.1:9001")
    assert not call(plane, "backend.add", service="web", id="w1", address="127.0.0.1:9001",
                    expected_version=0)["ok"]
    assert len(commits) == 2 and all(s >= 0 for s in commits)  # a refused write commits nothing
    assert call(plane, "health.report", backend="w1", up=True, revision=1)["ok"]
    assert transitions == []  # up, as no observation already read
    assert call(plane, "health.report", backend="w1", up=False, revision=2)["ok"]
    assert transitions == ["w1"]
    plane.record_verdict("w1", False)  # applied (a newer revision), the verdict the same
    plane.record_verdict("w1", True)
    assert transitions == ["w1", "w1"]
    assert len(commits) == 6
