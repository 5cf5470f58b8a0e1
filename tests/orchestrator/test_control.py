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
])
def test_bad_requests_get_a_clear_error_and_change_nothing(plane, raw, fragment):
    call(plane, "policy.set", service="web", algorithm="wrr", listen="127.0.0.1:8080")
    call(plane, "backend.add", service="web", id="w1", address="127.0.0.1:9001")
    before = plane.store.read()
    reply = plane.answer(raw)[1]
    assert reply["ok"] is False and reply["error"]["code"] in ("bad_request", "not_found")
    assert fragment in reply["error"]["message"]
    assert plane.store.read() == before
