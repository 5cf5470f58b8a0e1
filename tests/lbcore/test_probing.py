"""The node's prober (lbcore/probing.py) against real sockets on loopback."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from lbcore.config import HealthCheck
from lbcore.probing import Prober, Target, source_applies
from lbcore.verdict import probers_for


class Backend:
    """A loopback server: counts connections and their peers; answers an
    HTTP request with ``status`` (None: says nothing, closes)."""

    def __init__(self, status: int | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.status = status
        self.peers: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.peers.append(peer[0])
            with conn:
                if self.status is not None:
                    conn.settimeout(1.0)
                    try:
                        conn.recv(4096)
                        conn.sendall(f"HTTP/1.0 {self.status} X\r\nContent-Length: 0\r\n\r\n".encode())
                    except OSError:
                        pass

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(kind: str = "tcp", **settings: object) -> HealthCheck:
    values = {"interval_ms": 100, "timeout_ms": 50, "rise": 1, "fall": 1, "jitter_percent": 0, **settings}
    return HealthCheck(kind=kind, **values)  # type: ignore[arg-type]


@pytest.fixture
def prober():
    wakes: list[int] = []
    p = Prober("", lambda: wakes.append(1))
    p.wakes = wakes
    p.start()
    yield p
    p.stop()


def wait_for(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_tcp_check_passes_on_connect_and_fails_on_refusal(prober):
    backend = Backend()
    try:
        prober.assign({"up": Target("up", "127.0.0.1", backend.port, check()),
                       "gone": Target("gone", "127.0.0.1", closed_port(), check(), slots=(7,))})
        assert wait_for(lambda: prober.results() == {"up": True, "gone": False})
        assert wait_for(lambda: prober.locally_down() == {"gone": (7,)})
    finally:
        backend.close()


def test_an_http_check_takes_the_status_into_account(prober):
    ok, failing = Backend(status=200), Backend(status=500)
    try:
        prober.assign({"ok": Target("ok", "127.0.0.1", ok.port, check("http")),
                       "failing": Target("failing", "127.0.0.1", failing.port, check("http")),
                       "tcp": Target("tcp", "127.0.0.1", failing.port, check("tcp"))})
        assert wait_for(lambda: prober.results() == {"ok": True, "failing": False, "tcp": True})
    finally:
        ok.close()
        failing.close()


def test_results_are_handed_on_only_when_they_change(prober):
    backend = Backend()
    try:
        prober.assign({"b": Target("b", "127.0.0.1", backend.port, check())})
        assert wait_for(lambda: prober.results() == {"b": True})
        assert prober.take_changes() == {"b": True}
        time.sleep(0.5)  # about five more probes, all good
        assert prober.take_changes() == {}
        prober.assign({})
        assert wait_for(lambda: prober.take_changes() == {"b": None})  # no longer probed: said so
    finally:
        backend.close()


def test_each_target_is_probed_once_an_interval(prober):
    backend = Backend()
    try:
        prober.assign({"b": Target("b", "127.0.0.1", backend.port, check(interval_ms=100))})
        time.sleep(0.3)
        before = len(backend.peers)
        time.sleep(2.0)
        probes = len(backend.peers) - before
        assert 14 <= probes <= 22, probes  # 20 expected; a loaded machine may lose a few
    finally:
        backend.close()


def test_probes_leave_from_the_nodes_address():
    backend = Backend()
    p = Prober("127.0.0.2", lambda: None)
    p.start()
    try:
        p.assign({"b": Target("b", "127.0.0.1", backend.port, check())})
        assert wait_for(lambda: backend.peers)
        assert set(backend.peers) == {"127.0.0.2"}
    finally:
        p.stop()
        backend.close()


def test_rendezvous_moves_only_the_share_of_a_node_that_comes_or_goes():
    nodes = [f"n{i}" for i in range(5)]
    backends = [f"b{i}" for i in range(400)]
    before = {b: probers_for(b, nodes, 2) for b in backends}
    after = {b: probers_for(b, nodes + ["n5"], 2) for b in backends}
    moved = sum(1 for b in backends if before[b] != after[b])
    assert moved < 400 * 0.6  # about 2/6 of the backends take the new node
    assert all(set(after[b]) - set(before[b]) <= {"n5"} for b in backends)
    load = [sum(1 for b in backends if n in before[b]) for n in nodes]
    assert min(load) > 400 * 2 / 5 * 0.6  # spread evenly


def a_port_that_never_answers() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: loopback drops further SYNs,
    so a connect to it hangs until its timeout (a dead host, without
    leaving the machine)."""
    server = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(server.getsockname())
        fillers.append(s)
    time.sleep(0.1)
    return server, fillers


def test_a_prober_at_its_in_flight_limit_waits_instead_of_spinning():
    server, fillers = a_port_that_never_answers()
    p = Prober("", lambda: None, max_in_flight=1)
    p.start()
    try:
        port = server.getsockname()[1]
        p.assign({f"b{i}": Target(f"b{i}", "127.0.0.1", port, check(interval_ms=1000, timeout_ms=900))
                  for i in range(3)})
        cpu0, t0 = time.process_time(), time.monotonic()
        time.sleep(1.5)
        assert (time.process_time() - cpu0) / (time.monotonic() - t0) < 0.3
    finally:
        p.stop()
        for s in [server, *fillers]:
            s.close()


def test_a_slow_probe_keeps_its_result_when_the_same_targets_are_assigned_again():
    server, fillers = a_port_that_never_answers()
    p = Prober("", lambda: None)
    p.start()
    try:
        port = server.getsockname()[1]
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and p.results() != {"slow": False}:
            # a new routing version: equal targets, new objects, every 50 ms
            p.assign({"slow": Target("slow", "127.0.0.1", port, check(interval_ms=400, timeout_ms=300))})
            time.sleep(0.05)
        assert p.results() == {"slow": False}
    finally:
        p.stop()
        for s in [server, *fillers]:
            s.close()


def test_a_loopback_source_is_not_used_towards_a_backend_off_loopback():
    assert source_applies("127.0.0.2", "127.0.0.1")
    assert not source_applies("127.0.0.2", "10.1.2.3")
    assert source_applies("10.0.0.5", "10.1.2.3")
    assert not source_applies("", "127.0.0.1")
