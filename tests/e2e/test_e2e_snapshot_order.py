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
from lbcore.wire import encode_snapshot


def snapshot(version: int, port: int, backends: dict[str, str]) -> bytes:
    return encode_snapshot(version, [Service("web", f"127.0.0.1:{port}", "wrr",
                                             tuple(Backend(i, a, 1) for i, a in backends.items()))])


@pytest.mark.timeout(120)
def test_node_applies_only_newer_snapshots_and_fetches_on_a_gap(backends, lbproxy):
    b = backends({"v3": "127.0.0.1", "v2": "127.0.0.1", "v5": "127.0.0.1"})
    port, control, publish = free_port(), free_port(), free_port()
    context = zmq.Context.instance()
    pub, router = context.socket(zmq.PUB), context.socket(zmq.ROUTER)
    for sock in (pub, router):
        sock.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{publish}")
    router.bind(f"tcp://127.0.0.1:{control}")
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
            pub.send_multipart([b"heartbeat", b'{"version": 3}'])
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
            pub.send_multipart([b"heartbeat", b'{"version": 5}'])
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
