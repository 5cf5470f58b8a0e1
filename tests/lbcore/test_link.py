"""A node's link to the control plane over real ZeroMQ sockets: whatever
arrives on PUB, the link never raises, applies only what is newer (I6), and
asks for the full snapshot only when something was missed."""
from __future__ import annotations

import json
import threading
import time

import pytest
import zmq

from lbcore.config import Backend, Service
from lbcore.link import ControlLink
from tests.support import free_port
from tests.wire_reference import encode_delta, encode_snapshot

V1 = [Service("web", "127.0.0.1:8080", "wrr", (Backend("a", "127.0.0.1:9001", 1),))]
V2 = [Service("web", "127.0.0.1:8080", "wrr", (Backend("a", "127.0.0.1:9001", 3),))]


class Plane:
    """A PUB socket and a ROUTER that answers fetches with ``answer``."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.pub = self.context.socket(zmq.PUB)
        self.router = self.context.socket(zmq.ROUTER)
        for sock in (self.pub, self.router):
            sock.setsockopt(zmq.LINGER, 0)
        self.publish, self.control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        self.pub.bind(self.publish)
        self.router.bind(self.control)
        self.answer: dict = {"ok": False, "error": {"code": "error", "message": "no snapshot here"}}
        self.report_answer: dict = {"ok": True, "result": {}}
        self.fetches = 0
        self.reports: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self.router.poll(20):
                *envelope, body = self.router.recv_multipart()
                if json.loads(body)["verb"] == "snapshot.get":
                    self.fetches += 1
                    self.router.send_multipart([*envelope, json.dumps(self.answer).encode()])
                else:
                    self.reports.append(body)
                    self.router.send_multipart([*envelope, json.dumps(self.report_answer).encode()])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pub.close(0)
        self.router.close(0)
        self.context.term()


@pytest.fixture
def link():
    plane = Plane()
    logged: list[str] = []
    link = ControlLink("n1", 5000, plane.control, plane.publish, logged.append)
    link.plane, link.logged = plane, logged  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the slow joiner: wait until PUB reaches us
        plane.pub.send_multipart([b"hello", b""])  # any message: ignored, but it says PUB reaches us
        if link.sub.poll(50):
            link.receive()
            break
    yield link
    link.close()
    plane.close()


def deliver(link: ControlLink, *messages: list[bytes]):
    for frames in messages:
        link.plane.pub.send_multipart(frames)  # type: ignore[attr-defined]
    time.sleep(0.2)
    return link.receive()


@pytest.mark.parametrize("frames", [
    [b"heartbeat", b'{"version": 1e999}'],
    [b"heartbeat", b'{"version": 18446744073709551616}'],
    [b"heartbeat", b"[" * 100_000],
    [b"heartbeat", b"\xff\xfe"],
    [b"snapshot", b"[" * 100_000],
    [b"snapshot", b'{"version": 18446744073709551616, "services": []}'],
    [b"delta", b'{"version": 1e999}'],
    [b"delta", json.dumps({"version": 1 << 70, "base": -1, "services": [], "removed_services": [],
                           "backends": [], "removed_backends": []}).encode()],
    [b"gossip", b"{}"],
    [b"snapshot", b"{}", b"extra frame"],
])
def test_malformed_messages_are_refused_and_change_nothing(link, frames):
    assert deliver(link, frames) is None
    assert link.version == -1
    assert link.logged, "a refusal says what was refused"
    assert link.plane.fetches <= 1  # a refused delta asks once; the error answer ends the fetch at once


def test_only_newer_applies_and_a_gap_fetches_the_full_snapshot(link):
    routing = deliver(link, [b"snapshot", encode_snapshot(1, V1)])
    assert routing is not None and routing.version == 1
    link.routing = routing
    assert deliver(link, [b"snapshot", encode_snapshot(1, V2)]) is None  # not newer: ignored
    assert deliver(link, [b"delta", encode_delta(1, V1, 2, V2)]).version == 2  # on its base
    assert link.plane.fetches == 0
    # a delta on a base the node does not hold: the full snapshot, fetched
    link.plane.answer = {"ok": True, "result": {"snapshot": encode_snapshot(5, V1).decode()}}
    fetched = deliver(link, [b"delta", encode_delta(4, V2, 5, V1)])
    assert fetched is not None and fetched.version == 5 and link.plane.fetches == 1
    # a heartbeat announcing a version the node lacks: fetched too
    link.routing = fetched
    link.plane.answer = {"ok": True, "result": {"snapshot": encode_snapshot(7, V2).decode()}}
    assert deliver(link, [b"heartbeat", b'{"epoch": 0, "version": 7}']).version == 7
    assert link.plane.fetches == 2


def test_a_fetch_answered_with_an_error_returns_at_once(link):
    t0 = time.monotonic()
    assert deliver(link, [b"heartbeat", b'{"epoch": 0, "version": 3}']) is None
    assert time.monotonic() - t0 < 1.5  # not the 2 s fetch timeout
    assert any("refused by the control plane" in line for line in link.logged), link.logged


def test_a_fetch_reads_its_own_answer_not_a_queued_reply_to_a_report(link):
    link.plane.report_answer = {"ok": False, "error": {"code": "bad_request", "message": "report refused"}}
    link.plane.answer = {"ok": True, "result": {"snapshot": encode_snapshot(7, V1).decode()}}
    link.report({})
    time.sleep(0.1)  # the refusal of the report is queued when the fetch starts
    fetched = link.fetch()
    assert fetched is not None and fetched.version == 7


def test_a_report_too_large_for_one_request_sums_its_counters_per_service(link):
    from lbcore.wire import MAX_REPORT_BYTES

    counters = {"web": {f"backend-with-a-rather-long-name-{i:05d}": {"active": 10**9, "total": 10**12,
                                                                      "failed": 10**6} for i in range(600)}}
    link.report(counters)
    deadline = time.monotonic() + 5
    while not link.plane.reports and time.monotonic() < deadline:
        time.sleep(0.02)
    (sent,) = link.plane.reports
    assert len(sent) <= MAX_REPORT_BYTES
    assert json.loads(sent)["args"]["counters"] == {
        "web": {"(all)": {"active": 600 * 10**9, "total": 600 * 10**12, "failed": 600 * 10**6}}}


def test_an_ack_is_the_same_json_as_any_report():
    from lbcore.wire import report_request

    for node in ("n1", 'node "é" 2'):
        args = {"node": node, "epoch": 5, "version": 12, "staleness_ms": 3}
        expected = json.dumps({"verb": "node.report", "args": args}, sort_keys=True).encode()
        assert report_request(node, 5, 12, 3, None) == expected


def test_the_control_plane_reads_an_ack_as_the_node_writes_it_and_nothing_else():
    from lbcore.wire import read_ack, report_request

    assert read_ack(report_request("prop-1.a_b:c", 9, 12, 3, None)) == ("prop-1.a_b:c", 9, 12, 3)
    assert read_ack(report_request("n1", 2**62 - 1, 2**62 - 1, 0, None)) == ("n1", 2**62 - 1, 2**62 - 1, 0)
    not_acks = [
        report_request('node "é" 2', 9, 12, 3, None),          # an id json.dumps escapes: parsed as JSON
        report_request("n1", 9, 12, 3, {}),                      # a report with counters
        report_request("n1", 9, 12, 3, None, "d"),               # ... or a digest
        report_request("n1", 9, -1, 3, None),                    # left to the regular path
        b'{"args": {"epoch": 9, "node": "n1", "staleness_ms": 3, "version": 012}, "verb": "node.report"}',
        b'{"args": {"epoch": 09, "node": "n1", "staleness_ms": 3, "version": 12}, "verb": "node.report"}',
        b'{"args": {"epoch": 9, "node": "n1", "staleness_ms": 3, "version": 12}, "verb": "node.report"} ',
        b'{"args":{"epoch":9,"node":"n1","staleness_ms":3,"version":12},"verb":"node.report"}',
        b'{"args": {"epoch": 9, "node": "n1", "staleness_ms": 3, "version": 12345678901234567890}, '
        b'"verb": "node.report"}',
        b'{"args": {"epoch": 9, "node": "", "staleness_ms": 3, "version": 12}, "verb": "node.report"}',
        b'{"args": {"node": "n1", "staleness_ms": 3, "version": 12}, "verb": "node.report"}',  # no epoch
    ]
    for message in not_acks:
        assert read_ack(message) is None, message


V3 = [Service("web", "127.0.0.1:8080", "wrr", (Backend("a", "127.0.0.1:9001", 1),
                                              Backend("b", "127.0.0.1:9002", 2)))]


def test_a_delta_on_an_older_base_is_never_applied_the_full_snapshot_is_fetched(link):
    """I6 at the node: it holds version 5; a delta from version 3 to 6 (a
    base older than what it holds) would, applied, make a routing the
    control plane never derived. The node fetches the full snapshot."""
    link.routing = deliver(link, [b"snapshot", encode_snapshot(5, V2)])
    assert link.routing is not None and link.routing.version == 5
    link.plane.answer = {"ok": True, "result": {"snapshot": encode_snapshot(6, V1).decode()}}
    routing = deliver(link, [b"delta", encode_delta(3, V1, 6, V3)])
    assert routing is not None and link.plane.fetches == 1
    assert routing.version == 6 and routing.encode() == encode_snapshot(6, V1)  # the fetched one


def test_a_refused_snapshot_of_another_epoch_is_not_fetched_again_on_every_heartbeat(link):
    """The node refused a snapshot of another epoch (a listen address in
    use, say): heartbeats of that epoch and version do not fetch it again
    before the retry time, as for a refused version of its own epoch."""
    from lbcore.routing import Routing

    link.routing = deliver(link, [b"snapshot", encode_snapshot(1, V1, 1)])
    link.plane.answer = {"ok": True, "result": {"snapshot": encode_snapshot(3, V2, 2).decode()}}
    fetched = deliver(link, [b"heartbeat", b'{"epoch": 2, "version": 3}'])
    assert fetched is not None and (fetched.epoch, fetched.version) == (2, 3) and link.plane.fetches == 1
    link.refuse(Routing.of(3, V2, 2))
    for _ in range(5):
        assert deliver(link, [b"heartbeat", b'{"epoch": 2, "version": 3}']) is None
    assert link.plane.fetches == 1


def test_a_periodic_report_goes_without_counters_while_workers_take_up_the_version(link):
    # the agent gives no counters until every worker has the image published
    # (lbcore/agent.py _remote_counters): a count of the version before could
    # still grow, and the control plane would take it for this version's
    link.tick(lambda: None)
    deadline = time.monotonic() + 5
    while not link.plane.reports and time.monotonic() < deadline:
        time.sleep(0.02)
    (sent,) = link.plane.reports
    args = json.loads(sent)["args"]
    assert "counters" not in args
    assert "digest" in args and args["max_staleness_ms"] == link.max_staleness_ms  # still the periodic report
