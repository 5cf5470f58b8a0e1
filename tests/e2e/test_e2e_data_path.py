"""The relay itself: bulk bytes, half-close, failover past a dead backend,
a thousand concurrent connections."""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections import Counter

import pytest
from e2e_support import Client, dead_address, free_port, service, wait_until

MIB = 1 << 20


def _send_in_thread(sock: socket.socket, payload: bytes,
                    chunk: int = 256 * 1024) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def send() -> None:
        try:
            view = memoryview(payload)
            for i in range(0, len(payload), chunk):
                sock.sendall(view[i:i + chunk])
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.timeout(120)
def test_32_mib_echo_is_byte_identical(backends, lbproxy):
    b = backends({"web-1": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [("web-1", b["web-1"], 1)])])
    payload = os.urandom(32 * MIB)
    with Client(listen, timeout=30) as c:
        assert c.ident() == "web-1"
        thread, errors = _send_in_thread(c.sock, payload)
        received = c.recv_exact(len(payload))
        thread.join(30)
        assert not thread.is_alive() and not errors, f"sender: {errors}"
        assert len(received) == len(payload)
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest(), \
            "echoed bytes differ from the bytes sent"
        # Counted while the connection is still open (workers flush every 100 ms).
        wait_until(lambda: node.backend_stats()["web-1"]["bytes_to_backend"] == len(payload), 5,
                   message=lambda: f"bytes_to_backend of an open connection: {node.backend_stats()}")
        c.sock.shutdown(socket.SHUT_WR)
        assert c.read_to_eof() == b"EOF\n"

    # Byte counters (flushed every 100 ms and on close) match the exchange.
    want_up = len(payload)
    want_down = len(b"web-1\n") + len(payload) + len(b"EOF\n")

    def counted():
        s = node.backend_stats()["web-1"]
        return (s["bytes_to_backend"], s["bytes_to_client"]) == (want_up, want_down)
    wait_until(counted, 5, message=lambda: f"bytes {want_up}/{want_down} in {node.backend_stats()}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [5, 4 * MIB], ids=["small", "4MiB"])
def test_half_close_backend_sees_eof_client_reads_everything(backends, lbproxy, size):
    b = backends({"web-1": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    lbproxy([service("web", listen, [("web-1", b["web-1"], 1)])])
    payload = os.urandom(size) if size > 5 else b"hello"
    with Client(listen, timeout=30) as c:
        # Send everything and half-close before reading anything back: the
        # echo of the tail is still on its way when the backend sees EOF.
        thread, errors = _send_in_thread(c.sock, payload)
        thread.join(30)
        assert not thread.is_alive() and not errors, f"sender: {errors}"
        c.sock.shutdown(socket.SHUT_WR)
        data = c.read_to_eof()
    assert data[:6] == b"web-1\n"
    assert data[6:6 + len(payload)] == payload, "echo after half-close incomplete or altered"
    assert data[6 + len(payload):] == b"EOF\n", f"tail {data[6 + len(payload):][:40]!r}"


@pytest.mark.timeout(120)
def test_dead_backend_is_skipped_without_client_failures(backends, lbproxy):
    b = backends({"live-1": "127.0.0.1", "live-2": "127.0.0.1"})
    dead = dead_address()
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [("live-1", b["live-1"], 1), ("dead", dead, 1),
                                            ("live-2", b["live-2"], 1)])], retries=3)
    seen: Counter[str] = Counter()
    failures = []
    for i in range(200):
        try:
            with Client(listen, timeout=5) as c:
                ident = c.ident()
                assert c.echo(b"ping %d\n" % i) == b"ping %d\n" % i
                seen[ident] += 1
        except (OSError, EOFError, AssertionError) as exc:
            failures.append(f"{i}: {exc!r}")
    assert not failures, f"{len(failures)} client failures, first: {failures[:3]}"
    assert set(seen) == {"live-1", "live-2"} and sum(seen.values()) == 200, dict(seen)

    def settled():
        s = node.backend_stats()
        return s if s["live-1"]["total"] + s["live-2"]["total"] == 200 else None
    stats = wait_until(settled, 5, message=lambda: f"totals of 200: {node.backend_stats()}")
    assert stats["dead"]["failed"] > 0, stats["dead"]
    assert stats["dead"]["total"] == 0, stats["dead"]
    assert stats["live-1"]["failed"] == 0 and stats["live-2"]["failed"] == 0, stats
    assert {i: stats[i]["total"] for i in ("live-1", "live-2")} == dict(seen)


@pytest.mark.timeout(120)
def test_thousand_concurrent_connections_all_complete(backends, lbproxy):
    ids = ["web-1", "web-2", "web-3"]
    b = backends({i: "127.0.0.1" for i in ids})
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [(i, b[i], 1) for i in ids])], workers=2)
    n = 1000
    clients: list[Client] = []
    deadline = time.monotonic() + 60
    try:
        for _ in range(n):
            clients.append(Client(listen, timeout=20))
        # all open at once: every one is relaying at the same time
        for i, c in enumerate(clients):
            c.sock.sendall(b"message %d\n" % i)
        seen: Counter[str] = Counter()
        for i, c in enumerate(clients):
            ident = c.ident()
            assert ident in ids, ident
            assert c.readline() == b"message %d\n" % i
            seen[ident] += 1
            assert time.monotonic() < deadline, f"too slow: {i} of {n} done"
        assert sum(seen.values()) == n
        assert sorted(seen.values()) == [333, 333, 334], f"wrr 1:1:1 shares: {dict(seen)}"
        active = sum(s["active"] for s in node.backend_stats().values())
        assert active == n, f"stats: {active} active with {n} open"
    finally:
        for c in clients:
            c.close()
    wait_until(lambda: all(s["active"] == 0 for s in node.backend_stats().values()), 10,
               message=lambda: f"active back to 0: {node.backend_stats()}")
    assert node.stats()["services"][0]["accepted"] == n


@pytest.mark.timeout(120)
def test_a_connect_that_fails_at_once_is_retried_on_another_backend(backends, lbproxy):
    """connect() itself fails (ENETUNREACH for the broadcast address: no
    packet leaves the machine) rather than later through the event loop,
    as a refusal on loopback does: that branch retries the next backend too."""
    b = backends({"good": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    rows = [("unreachable", "255.255.255.255:9", 1), ("good", b["good"], 1)]
    node = lbproxy([service("web", listen, rows)], workers=1)
    for n in range(20):
        with Client(listen) as c:
            assert c.ident() == "good"
            assert c.echo(b"x%d\n" % n) == b"x%d\n" % n
    counters = {x["id"]: x for x in node.stats()["services"][0]["backends"]}
    assert counters["unreachable"]["failed"] >= 5 and counters["good"]["total"] == 20
