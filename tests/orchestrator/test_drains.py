"""Drains as the control plane confirms them: the admin verbs that start
one, the watch that ends it from what the nodes report (a real store, the
nodes' records as the server keeps them), and its timeout."""
from __future__ import annotations

import io
import json
import time

import pytest

from lbcore.wire import SILENT_S
from orchestrator.control import ControlPlane
from orchestrator.drains import CLOSE_GRACE_S, START_GRACE_S, DrainWatch, open_connections
from orchestrator.model import Membership
from orchestrator.store import SqliteStore

EPOCH = 7


class Fleet:
    """A store, its admin API and the nodes' last reports, as the server keeps them."""

    def __init__(self, path) -> None:
        self.store = SqliteStore(path)
        self.nodes: dict[str, dict] = {}
        self.log: list[str] = []
        self.plane = ControlPlane(self.store, on_change=lambda change, version: self.watch.touch(change))
        self.watch = DrainWatch(self.store, self.plane.record_drain, lambda: self.nodes, lambda: EPOCH,
                                self.log.append)
        self.plane.drain_progress = self.watch.progress
        self.watch._started -= START_GRACE_S  # a control plane up for a while: every node has reported

    def call(self, verb: str, **args) -> dict:
        return self.plane.answer(json.dumps({"verb": verb, "args": args}).encode())[1]

    def report(self, node: str, version: int, active: int | None, ago: float = 0.0) -> None:
        """A node's periodic report of ``version``: ``active`` open to web/w1 (None: no row for it)."""
        rows = {"w2": {"active": 3, "total": 3, "failed": 0}}
        if active is not None:
            rows["w1"] = {"active": active, "total": 9, "failed": 0}
        self.nodes[node] = {"epoch": EPOCH, "version": version, "counters": {"web": rows},
                            "counters_version": version, "reported": time.monotonic() - ago}

    def ack(self, node: str, version: int) -> None:
        """An ACK: a new version, the counters of the last report kept."""
        self.nodes[node] = {**self.nodes[node], "version": version, "reported": time.monotonic()}

    def record(self, backend_id: str = "w1") -> dict:
        return next(b for b in self.call("backend.list", service="web")["result"] if b["id"] == backend_id)

    def step(self, wall: float | None = None) -> None:
        self.watch._next = 0.0  # look now, whatever STEP_S says
        self.watch.step(now_wall=wall)


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path / "state.db")
    assert f.call("policy.set", service="web", algorithm="wrr", listen="127.0.0.1:8080")["ok"]
    for backend_id in ("w1", "w2"):
        assert f.call("backend.add", service="web", id=backend_id, address="127.0.0.1:9001")["ok"]
    yield f
    f.store.close()


def test_drained_once_every_node_reports_zero_from_the_drain_version_on(fleet):
    fleet.report("a", 3, active=2)
    fleet.report("b", 3, active=1)
    drain_version = fleet.call("backend.drain", service="web", id="w1")["result"]["version"]
    fleet.step()
    record = fleet.record()
    assert record["state"] == "draining" and record["drain"]["version"] == drain_version
    assert record["drain"]["open"] == 3
    assert {w["node"]: w["why"] for w in record["drain"]["unconfirmed"]} == {
        "a": f"applied version 3 < {drain_version}", "b": f"applied version 3 < {drain_version}"}
    # the ACK of the drain's version alone confirms nothing: its counters are older
    fleet.ack("a", drain_version)
    fleet.step()
    (why,) = [w["why"] for w in fleet.record()["drain"]["unconfirmed"] if w["node"] == "a"]
    assert why.startswith("no counters of the drain's version yet")
    fleet.report("a", drain_version, active=0)
    fleet.report("b", drain_version, active=1)
    fleet.step()
    record = fleet.record()
    assert (record["state"], record["drain"]["open"], record["drain"]["unconfirmed"]) == (
        "draining", 1, [{"node": "b", "why": "1 open"}])
    fleet.report("b", drain_version + 1, active=None)  # its image no longer has the row: none open
    fleet.step()
    record = fleet.record()
    assert record["state"] == "drained"
    assert (record["drain"]["ended"], record["drain"]["open"], record["drain"]["unconfirmed"]) == (
        "confirmed", 0, [])
    assert any("web/w1 drained: drain confirmed by every node" in line for line in fleet.log)


def test_a_silent_node_blocks_the_drain_by_name(fleet):
    fleet.report("a", 5, active=0)
    version = fleet.call("backend.drain", service="web", id="w1")["result"]["version"]
    fleet.report("a", version, active=0, ago=SILENT_S + 1)
    fleet.step()
    record = fleet.record()
    assert record["state"] == "draining"
    (waiting,) = record["drain"]["unconfirmed"]
    assert waiting["node"] == "a" and waiting["why"].startswith("silent for ")
    fleet.report("a", version, active=0)  # it speaks again
    fleet.step()
    assert fleet.record()["state"] == "drained"


def test_a_summed_row_is_an_upper_bound(fleet):
    assert open_connections({"web": {"(all)": {"active": 4}}}, "web", "w1") == 4
    assert open_connections({"web": {"w1": {"active": -2}}}, "web", "w1") == 0
    assert open_connections({}, "web", "w1") == 0


def test_timeout_with_close_marks_the_row_closing_then_ends_the_drain(fleet):
    fleet.report("a", 3, active=2)
    version = fleet.call("backend.drain", service="web", id="w1", timeout_ms=1000)["result"]["version"]
    fleet.report("a", version, active=2)
    since = fleet.record()["drain"]["since"]
    fleet.step(wall=since + 0.5)
    assert fleet.record()["drain"]["closing"] is False
    fleet.step(wall=since + 1.0)
    record = fleet.record()
    assert record["state"] == "draining" and record["drain"]["closing"] is True
    assert any("timed out after 1000 ms with 2 connections open" in line and "nodes close them" in line
               for line in fleet.log)
    state = fleet.store.read()
    assert state.backends[0].drain.closing  # what the snapshot marks "closing" (derive.row_of)
    fleet.report("a", state.version, active=0)  # the node closed them
    fleet.step(wall=since + 1.2)
    record = fleet.record()
    assert (record["state"], record["drain"]["ended"]) == ("drained", "confirmed")


def test_timeout_with_close_ends_after_the_grace_even_if_a_node_never_confirms(fleet, monkeypatch):
    fleet.report("a", 3, active=2)
    fleet.call("backend.drain", service="web", id="w1", timeout_ms=0, then="remove")
    fleet.step()
    assert fleet.record()["drain"]["closing"] is True
    key = ("web", "w1")
    fleet.watch._closing_since[key] -= CLOSE_GRACE_S + 0.1
    fleet.step()
    record = fleet.record()
    assert (record["state"], record["drain"]["ended"], record["drain"]["open"]) == ("removed", "timeout", 2)


def test_timeout_with_keep_ends_at_once_and_says_how_many_were_open(fleet):
    assert fleet.call("policy.set", service="web", lifecycle={"on_drain_timeout": "keep"})["ok"]
    fleet.report("a", 3, active=4)
    fleet.call("backend.drain", service="web", id="w1", timeout_ms=0)
    fleet.step()
    record = fleet.record()
    assert (record["state"], record["drain"]["ended"], record["drain"]["open"]) == ("drained", "timeout", 4)
    assert record["drain"]["closing"] is False
    assert any("with 4 connections open" in line and "left open" in line for line in fleet.log)


def test_the_default_timeout_is_the_services(fleet):
    assert fleet.call("policy.set", service="web", lifecycle={"drain_timeout_ms": 1234})["ok"]
    fleet.report("a", 3, active=1)
    fleet.call("backend.drain", service="web", id="w1")
    assert fleet.record()["drain"]["timeout_ms"] == 1234


def test_an_operator_write_meanwhile_wins_and_is_read_again(fleet):
    fleet.report("a", 3, active=1)
    fleet.call("backend.drain", service="web", id="w1")
    fleet.step()
    # re-added while draining: active again, the drain gone
    assert fleet.call("backend.add", service="web", id="w1", address="127.0.0.1:9001")["ok"]
    fleet.report("a", 99, active=0)
    fleet.step()
    record = fleet.record()
    assert (record["state"], record["drain"]) == ("active", None)
    assert fleet.watch.draining == {}


def test_remove_of_a_draining_backend_makes_its_drain_a_removal(fleet):
    fleet.report("a", 3, active=1)
    fleet.call("backend.drain", service="web", id="w1")
    version = fleet.record()["version"]
    assert fleet.call("backend.remove", service="web", id="w1")["ok"]
    record = fleet.record()
    assert (record["state"], record["drain"]["then"]) == ("draining", "remove")
    assert record["version"] == version + 1


@pytest.mark.parametrize(("args", "fragment"), [
    ({"id": "nope"}, "no backend web/nope"),
    ({"id": "w1", "timeout_ms": -1}, "timeout_ms must be an integer 0.."),
    ({"id": "w1", "timeout_ms": 10**13}, "timeout_ms must be an integer 0.."),
    ({"id": "w1", "then": "explode"}, "then must be one of keep, remove"),
])
def test_a_bad_drain_is_refused_and_changes_nothing(fleet, args, fragment):
    before = fleet.store.read()
    reply = fleet.call("backend.drain", service="web", **args)
    assert not reply["ok"] and fragment in reply["error"]["message"], reply
    assert fleet.store.read() == before


def test_drain_of_a_removed_or_drained_backend_is_refused(fleet):
    assert fleet.call("backend.remove", service="web", id="w1", final=True)["ok"]
    before = fleet.store.read()
    reply = fleet.call("backend.drain", service="web", id="w1")
    assert reply["error"]["message"] == "backend web/w1 is removed: only an active backend can be drained"
    assert fleet.store.read() == before


def test_a_restarted_watch_confirms_nothing_before_the_nodes_had_time_to_report(fleet):
    fleet.report("a", 3, active=1)
    version = fleet.call("backend.drain", service="web", id="w1")["result"]["version"]
    # a control plane started again knows no node yet: none to wait for is not all confirmed
    nodes: dict[str, dict] = {}
    fresh = DrainWatch(fleet.store, fleet.plane.record_drain, lambda: nodes, lambda: EPOCH, fleet.log.append)
    fresh.step()
    assert fleet.store.read().backends[0].state is Membership.DRAINING
    nodes["a"] = {**fleet.nodes["a"], "reported": time.monotonic()}  # its report, still with 1 open
    fresh._started -= START_GRACE_S
    fresh._next = 0.0
    fresh.step()
    assert fleet.store.read().backends[0].state is Membership.DRAINING
    fleet.report("a", version, active=0)
    nodes["a"] = fleet.nodes["a"]
    fresh._next = 0.0
    fresh.step()
    assert fleet.store.read().backends[0].state is Membership.DRAINED


def test_counters_the_control_plane_did_not_keep_confirm_nothing(fleet):
    fleet.report("a", 3, active=5)
    version = fleet.call("backend.drain", service="web", id="w1")["result"]["version"]
    # past its budget the server keeps no counters of a node, and says so (server._record_report)
    fleet.nodes["a"] = {**fleet.nodes["a"], "version": version, "counters": {}, "counters_version": -1,
                        "reported": time.monotonic()}
    fleet.step()
    record = fleet.record()
    assert record["state"] == "draining"
    assert record["drain"]["unconfirmed"][0]["why"].startswith("no counters of the drain's version yet")


def test_a_second_drain_moves_its_timeout_and_then(fleet):
    fleet.report("a", 3, active=1)
    fleet.call("backend.drain", service="web", id="w1")
    assert fleet.record()["drain"]["timeout_ms"] == 300_000
    version = fleet.store.read().version
    moved = fleet.call("backend.drain", service="web", id="w1", timeout_ms=1000)["result"]["version"]
    assert moved == version + 1
    assert (fleet.record()["drain"]["timeout_ms"], fleet.record()["drain"]["then"]) == (1000, "keep")
    # the same again changes nothing
    assert fleet.call("backend.drain", service="web", id="w1", timeout_ms=1000)["result"]["version"] == moved


def test_remove_final_ends_a_running_drain(fleet):
    fleet.report("a", 3, active=1)
    fleet.call("backend.drain", service="web", id="w1")
    assert fleet.call("backend.remove", service="web", id="w1", final=True)["ok"]
    record = fleet.record()
    assert (record["state"], record["drain"]["ended"]) == ("removed", "removed")
    assert record["drain"]["unconfirmed"] == []


def test_a_node_whose_counters_the_server_could_not_keep_confirms_nothing(tmp_path, monkeypatch):
    """The server's own records (orchestrator/server.py): past its budget of
    counter rows it keeps none of a node's, and that node once read as 0
    open, its drains confirmed with connections still open."""
    from orchestrator import server
    from orchestrator.settings import Endpoints
    from tests.support import free_port

    store = SqliteStore(tmp_path / "state.db")
    endpoints = Endpoints(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}", 500)
    orch = server.Orchestrator(store, endpoints, log=io.StringIO())
    try:
        call = lambda verb, **args: orch.plane.answer(json.dumps({"verb": verb, "args": args}).encode())[1]  # noqa: E731
        assert call("policy.set", service="web", algorithm="wrr", listen="127.0.0.1:8080")["ok"]
        assert call("backend.add", service="web", id="w1", address="127.0.0.1:9001")["ok"]
        orch._publish_if_dirty(force=True)
        version = call("backend.drain", service="web", id="w1")["result"]["version"]
        orch._publish_if_dirty(force=True)
        monkeypatch.setattr(server, "MAX_COUNTER_ROWS", 0)  # a fleet past the budget
        orch._record_report("n1", orch.published_epoch, version, 0,
                            {"web": {"w1": {"active": 5, "total": 5, "failed": 0}}}, "")
        orch.drains._started -= START_GRACE_S
        orch.drains.step()
        (record,) = call("backend.list")["result"]
        assert record["state"] == "draining", record
        assert record["drain"]["unconfirmed"][0]["node"] == "n1"
    finally:
        orch.close()
        store.close()
