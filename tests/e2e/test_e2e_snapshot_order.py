"""I6 on a real node: snapshots out of order, duplicated, or lost. The test
plays the control plane with real ZeroMQ sockets (PUB + ROUTER) so that it can
drop and reorder messages; the node is a real lbproxy process."""
from __future__ import annotations

import json
import time

import pytest
import zmq
from e2e_support import Client, free_port, wait_until

from lbcore.config import Backend, Service
from tests.wire_reference import encode_snapshot


def snapshot(version: int, port: int, backends: dict[str, str]) -> bytes:
    return encode_snapshot(version, [Service("web", f"127.0.0.1:{port}", "wrr",
                                             tuple(Backend(i, a, 1) for i, a in backends.items()))])


def fake_control_plane(control: int, publish: int) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    """The two sockets a node talks to, played by the test (PUB, ROUTER)."""
    context = zmq.Context.instance()
    pub, router = context.socket(zmq.PUB), context.socket(zmq.ROUTER)
    for sock in (pub, router):
        sock.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{publish}")
    router.bind(f"tcp://127.0.0.1:{control}")
    return pub, router


@pytest.mark.timeout(120)
def test_node_applies_only_newer_snapshots_and_fetches_on_a_gap(backends, lbproxy):
    b = backends({"v3": "127.0.0.1", "v2": "127.0.0.1", "v5": "127.0.0.1"})
    port, control, publish = free_port(), free_port(), free_port()
    pub, router = fake_control_plane(control, publish)
    fetches = []

    def serve_router(answer: bytes | None, seconds: float) -> None:
        """Answer fetches with ``answer`` (reports get {}), for a while."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not router.poll(20):
                continue
            *envelope, body = router.recv_multipart()
            verb = json.loads(body)["verb"]
            if verb == "snapshot.get" and answer is not None:
                fetches.append(time.monotonic())
                result = {"snapshot": answer.decode()}
            else:
                result = {}
            router.send_multipart([*envelope, json.dumps({"ok": True, "result": result}).encode()])

    try:
        node = lbproxy([], start=False, workers=1, control=f"tcp://127.0.0.1:{control}",
                       subscribe=f"tcp://127.0.0.1:{publish}", max_staleness_ms=5000)
        node.launch()
        # a late joiner: heartbeats announce version 3, it fetches the full snapshot
        deadline = time.monotonic() + 15
        while "applied: version 3" not in node.log() and time.monotonic() < deadline:
            pub.send_multipart([b"heartbeat", b'{"epoch": 0, "version": 3}'])
            serve_router(snapshot(3, port, {"v3": b["v3"]}), 0.1)
        assert "applied: version 3" in node.log(), node.log()
        with Client(f"127.0.0.1:{port}") as c:
            assert c.ident() == "v3"

        # an older snapshot delivered late and a duplicate change nothing
        pub.send_multipart([b"snapshot", snapshot(2, port, {"v2": b["v2"]})])
        pub.send_multipart([b"snapshot", snapshot(3, port, {"v2": b["v2"]})])
        serve_router(None, 0.5)
        assert node.stats()["version"] == 3
        with Client(f"127.0.0.1:{port}") as c:
            assert c.ident() == "v3"

        # versions 4 and 5 are lost on PUB; a heartbeat says 5: the node fetches
        fetched_before = len(fetches)
        deadline = time.monotonic() + 15
        while "applied: version 5" not in node.log() and time.monotonic() < deadline:
            pub.send_multipart([b"heartbeat", b'{"epoch": 0, "version": 5}'])
            serve_router(snapshot(5, port, {"v5": b["v5"]}), 0.1)
        assert "applied: version 5" in node.log(), node.log()
        assert len(fetches) > fetched_before
        wait_until(lambda: node.stats()["version"] == 5, 5)
        with Client(f"127.0.0.1:{port}") as c:
            assert c.ident() == "v5"
        assert "applied: version 4" not in node.log()

        # a malformed snapshot is refused; the node keeps serving version 5
        pub.send_multipart([b"snapshot", b'{"version": 9, "services": [{"name": "web"}]}'])
        serve_router(None, 0.5)
        assert node.stats()["version"] == 5
        assert "snapshot refused" in node.log()
    finally:
        pub.close(0)
        router.close(0)


@pytest.mark.timeout(120)
def test_node_applies_a_delta_on_its_base_and_fetches_when_the_base_differs(backends, lbproxy):
    from tests.wire_reference import encode_delta

    b = backends({"a": "127.0.0.1", "b": "127.0.0.1", "c": "127.0.0.1"})
    port, control, publish = free_port(), free_port(), free_port()
    v1 = [Service("web", f"127.0.0.1:{port}", "wrr", (Backend("a", b["a"], 1),))]
    v2 = [Service("web", f"127.0.0.1:{port}", "wrr", (Backend("b", b["b"], 1),))]
    v4 = [Service("web", f"127.0.0.1:{port}", "wrr", (Backend("c", b["c"], 1),))]
    pub, router = fake_control_plane(control, publish)
    answer = {"snapshot": encode_snapshot(1, v1)}

    def serve(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if router.poll(20):
                *envelope, body = router.recv_multipart()
                verb = json.loads(body)["verb"]
                result = {"snapshot": answer["snapshot"].decode()} if verb == "snapshot.get" else {}
                router.send_multipart([*envelope, json.dumps({"ok": True, "result": result}).encode()])

    def until(text: str, heartbeat: int, message: list[bytes] | None = None) -> None:
        deadline = time.monotonic() + 15
        while text not in node.log() and time.monotonic() < deadline:
            if message:
                pub.send_multipart(message)
            pub.send_multipart([b"heartbeat", json.dumps({"epoch": 0, "version": heartbeat}).encode()])
            serve(0.1)
        assert text in node.log(), node.log()

    try:
        node = lbproxy([], start=False, workers=1, control=f"tcp://127.0.0.1:{control}",
                       subscribe=f"tcp://127.0.0.1:{publish}")
        node.launch()
        until("applied: version 1", 1)
        # a delta on the version held applies without a fetch
        until("applied: version 2", 1, [b"delta", encode_delta(1, v1, 2, v2)])
        with Client(f"127.0.0.1:{port}") as c:
            assert c.ident() == "b"
        # a delta whose base (3) is not what the node holds (2): fetch in full
        # (heartbeats still say 2, so only the delta's base can cause the fetch)
        answer["snapshot"] = encode_snapshot(4, v4)
        # the delta itself would route to "a": applying it would fail the check below
        until("applied: version 4", 2, [b"delta", encode_delta(3, v2, 4, v1)])
        with Client(f"127.0.0.1:{port}") as c:
            assert c.ident() == "c"
        # a delta on an OLDER base (2) than the node holds (4): never applied
        # (it would route to "a"); the node fetches the control plane's 5
        answer["snapshot"] = encode_snapshot(5, v2)
        until("applied: version 5", 4, [b"delta", encode_delta(2, v2, 5, v1)])
        with Client(f"127.0.0.1:{port}") as c:
            assert c.ident() == "b"
    finally:
        pub.close(0)
        router.close(0)
