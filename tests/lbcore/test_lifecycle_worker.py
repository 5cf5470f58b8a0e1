"""A backend's lifecycle in real worker processes (two, on one image in a
real segment), with real sockets on 127.0.0.1: max_conns is never passed;
connections wait in the queue when every backend is full and are served as
slots free, or closed at their queue_timeout_ms, or at once past max_queue;
a client that resets while waiting leaves, one that half-closes keeps its
place; the waiting count never leaks; a draining backend keeps its
connections and takes no new one, a closing one has them reset."""
from __future__ import annotations

import contextlib
import dataclasses
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from lbcore.config import Config, parse_config
from lbcore.stats import report_counters
from tests.conftest import unique_node_id
from tests.lbcore.test_image_swap import WORKERS, start_workers, stop_workers
from tests.support import free_port, wait_for


class HoldingBackend:
    """A listener whose connections are greeted with ``hi\\n``, echo what
    they get and are held until the client closes; it counts those open
    at once (``most``)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.open = self.most = self.accepted = 0
        self.received: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.open += 1
                self.accepted += 1
                self.most = max(self.most, self.open)
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        got = b""
        try:
            conn.sendall(b"hi\n")
            while True:
                data = conn.recv(4096)
                if not data:
                    break
                got += data
                conn.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:  # before the close: the node frees its slot only once it sees it
                self.open -= 1
                self.received.append(got)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@contextlib.contextmanager
def holding_backends(n: int) -> Iterator[list[HoldingBackend]]:
    opened = [HoldingBackend() for _ in range(n)]
    try:
        yield opened
    finally:
        for b in opened:
            b.close()


def lifecycle_config(listen: int, backends: list[tuple[str, int, int]], algorithm: str = "wrr",
                     **lifecycle: object) -> Config:
    """One service "web" on 127.0.0.1:``listen``; backends (id, port, max_conns)."""
    lines = ["[node]", f'id = "{unique_node_id()}"', "workers = 2", "retries = 1",
             "[[service]]", 'name = "web"', f'listen = "127.0.0.1:{listen}"', f'algorithm = "{algorithm}"',
             *(f"{key} = {value}" for key, value in lifecycle.items())]
    for backend_id, port, max_conns in backends:
        lines += ["[[service.backend]]", f'id = "{backend_id}"', f'address = "127.0.0.1:{port}"',
                  f"max_conns = {max_conns}"]
    return parse_config("\n".join(lines) + "\n")


def with_states(config: Config, **states: str) -> Config:
    """``config`` with backends in drain (id -> "draining" or "closing"), as a snapshot says it."""
    [service] = config.services
    backends = tuple(dataclasses.replace(b, state=states.get(b.id, b.state)) for b in service.backends)
    return dataclasses.replace(config, services=(dataclasses.replace(service, backends=backends),))


@contextlib.contextmanager
def serving(published, config: Config) -> Iterator[list]:
    published.publish(config)
    workers = start_workers(published.segment.path)
    try:
        wait_for(lambda: all(int(published.segment.workers[i]["listening"]) for i in range(WORKERS)),
                 10, "workers listening")
        yield workers
    finally:
        stop_workers(workers)


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def greeted(self, timeout: float) -> bool | None:
        """True: the backend's greeting came; False: nothing yet; None:
        closed or reset by the node."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(3)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return None
        if not data:
            return None
        assert data == b"hi\n", data
        return True

    def closed_within(self, timeout: float) -> bool:
        """Closed or reset by the node within ``timeout`` (what came before is read and dropped)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                if self.sock.recv(64) == b"":
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            pass
        return False

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def queue_state(published) -> dict[str, int]:
    state = published.segment.service_states[0]
    return {k: int(state[k]) for k in ("waiting", "queued", "queue_timeouts", "rejected")}


def waiting_shares(published) -> list[int]:
    from lbcore.agent import worker_waiting
    return [int(worker_waiting(published.segment, i)[0]) for i in range(WORKERS)]


@pytest.mark.timeout(60)
def test_connections_wait_for_a_slot_and_never_pass_max_conns(published):
    listen = free_port()
    with holding_backends(1) as (backend,):
        config = lifecycle_config(listen, [("only", backend.port, 2)], max_queue=2, queue_timeout_ms=20_000)
        clients: list[Client] = []
        with serving(published, config):
            try:
                clients += [Client(listen) for _ in range(2)]
                assert [c.greeted(5) for c in clients] == [True, True]
                clients += [Client(listen) for _ in range(2)]
                assert [c.greeted(0.3) for c in clients[2:]] == [False, False]
                wait_for(lambda: queue_state(published)["waiting"] == 2, 5, "two waiting")
                extra = Client(listen)
                assert extra.closed_within(5), "a connection past max_queue was not closed at once"
                extra.close()
                assert queue_state(published) == \
                    {"waiting": 2, "queued": 2, "queue_timeouts": 0, "rejected": 1}
                held, waiting = clients[:2], clients[2:]
                held[0].close()  # a slot frees: one waiting is served, the other still waits
                first = next(c for c in waiting if c.greeted(5))
                second = next(c for c in waiting if c is not first)
                assert second.greeted(0.3) is False
                assert queue_state(published)["waiting"] == 1
                held[1].close()
                assert second.greeted(5)
                wait_for(lambda: queue_state(published)["waiting"] == 0, 5, "none waiting")
                assert backend.most == 2 and backend.accepted == 4
                assert sorted(waiting_shares(published)) == [0, 0]
            finally:
                for c in clients:
                    c.close()
        assert queue_state(published) == {"waiting": 0, "queued": 2, "queue_timeouts": 0, "rejected": 1}


@pytest.mark.timeout(60)
def test_a_waiting_connection_is_closed_at_its_queue_timeout(published):
    listen = free_port()
    with holding_backends(1) as (backend,):
        config = lifecycle_config(listen, [("only", backend.port, 1)], max_queue=2, queue_timeout_ms=500)
        with serving(published, config):
            held = Client(listen)
            assert held.greeted(5)
            started = time.monotonic()
            waiting = [Client(listen) for _ in range(2)]
            for c in waiting:
                assert c.closed_within(3)
            took = time.monotonic() - started
            assert 0.4 <= took <= 1.5, took
            assert queue_state(published) == {"waiting": 0, "queued": 2, "queue_timeouts": 2, "rejected": 0}
            assert backend.accepted == 1
            held.close()
            for c in waiting:
                c.close()


@pytest.mark.timeout(60)
def test_no_queue_closes_at_once(published):
    listen = free_port()
    with holding_backends(1) as (backend,):
        with serving(published, lifecycle_config(listen, [("only", backend.port, 1)])):
            held = Client(listen)
            assert held.greeted(5)
            refused = Client(listen)
            assert refused.closed_within(2)
            assert queue_state(published) == {"waiting": 0, "queued": 0, "queue_timeouts": 0, "rejected": 1}
            held.close()
            refused.close()
            wait_for(lambda: int(published.segment.counters["active"].sum()) == 0, 5, "the slot given back")
            again = Client(listen)
            assert again.greeted(5)  # the slot is free again
            again.close()


@pytest.mark.timeout(60)
def test_a_waiting_client_that_resets_leaves_the_queue(published):
    listen = free_port()
    with holding_backends(1) as (backend,):
        config = lifecycle_config(listen, [("only", backend.port, 1)], max_queue=5, queue_timeout_ms=20_000)
        with serving(published, config):
            held = Client(listen)
            assert held.greeted(5)
            gone = Client(listen)
            wait_for(lambda: queue_state(published)["waiting"] == 1, 5, "one waiting")
            gone.reset()
            wait_for(lambda: queue_state(published)["waiting"] == 0, 5, "the reset one out of the queue")
            held.close()
            served = Client(listen)  # not behind a connection that is gone
            assert served.greeted(5)
            served.close()
            assert backend.accepted == 2
            assert queue_state(published)["queue_timeouts"] == 0


@pytest.mark.timeout(60)
def test_a_waiting_client_that_half_closes_keeps_its_place(published):
    listen = free_port()
    with holding_backends(1) as (backend,):
        config = lifecycle_config(listen, [("only", backend.port, 1)], max_queue=5, queue_timeout_ms=20_000)
        with serving(published, config):
            held = Client(listen)
            assert held.greeted(5)
            asking = Client(listen)
            asking.sock.sendall(b"ping\n")
            asking.sock.shutdown(socket.SHUT_WR)
            time.sleep(0.3)
            assert queue_state(published)["waiting"] == 1
            held.close()
            asking.sock.settimeout(5)
            got = b""
            while True:
                data = asking.sock.recv(64)
                if not data:
                    break
                got += data
            assert got == b"hi\nping\n"
            asking.close()
            assert queue_state(published)["waiting"] == 0


@pytest.mark.timeout(60)
def test_new_connections_queue_behind_those_waiting(published):
    # Another worker's connections wait (the count says so): a new one
    # does not take the free slot ahead of them, it queues, and is served
    # from the queue; with the queue full it is refused.
    listen = free_port()
    with holding_backends(1) as (backend,):
        config = lifecycle_config(listen, [("only", backend.port, 5)], max_queue=2, queue_timeout_ms=20_000)
        with serving(published, config):
            states = published.segment.service_states
            states["waiting"][0] = 1
            try:
                behind = Client(listen)
                assert behind.greeted(5)
                assert queue_state(published)["queued"] == 1  # through the queue
                behind.close()
                states["waiting"][0] = 2
                refused = Client(listen)
                assert refused.closed_within(5)
                refused.close()
                assert queue_state(published)["rejected"] == 1
            finally:
                states["waiting"][0] = 0
            direct = Client(listen)
            assert direct.greeted(5)
            direct.close()
            assert queue_state(published)["queued"] == 1


@pytest.mark.timeout(60)
def test_waiting_connections_close_when_workers_stop(published):
    listen = free_port()
    with holding_backends(1) as (backend,):
        config = lifecycle_config(listen, [("only", backend.port, 1)], max_queue=4, queue_timeout_ms=60_000)
        published.publish(config)
        workers = start_workers(published.segment.path)
        clients: list[Client] = []
        try:
            wait_for(lambda: all(int(published.segment.workers[i]["listening"]) for i in range(WORKERS)),
                     10, "workers listening")
            clients = [Client(listen) for _ in range(4)]
            wait_for(lambda: queue_state(published)["waiting"] == 3, 5, "three waiting")
            assert sum(waiting_shares(published)) == 3
        finally:
            stop_workers(workers)  # they drain (1 s here), then close what is left
        for c in clients:
            assert c.closed_within(1)
            c.close()
        assert queue_state(published)["waiting"] == 0
        assert waiting_shares(published) == [0, 0]


@pytest.mark.timeout(60)
def test_a_closing_backend_has_its_connections_reset_and_a_draining_one_keeps_them(published):
    listen = free_port()
    with holding_backends(3) as (a, b, c):
        config = lifecycle_config(listen, [("a", a.port, 0), ("b", b.port, 0), ("c", c.port, 0)])
        with serving(published, config):
            clients = [Client(listen) for _ in range(9)]
            assert all(x.greeted(5) for x in clients)
            wait_for(lambda: (a.open, b.open, c.open) == (3, 3, 3), 5, "three at each backend")
            published.version += 1
            published.image = published.publish(with_states(config, a="draining", b="closing"))
            started = time.monotonic()
            wait_for(lambda: b.open == 0, 2, "b's connections reset")
            took = time.monotonic() - started
            assert took < 0.3, took
            assert (a.open, c.open) == (3, 3)
            # b's clients got a reset (not a clean end of stream); a's and c's still echo
            reset = 0
            for x in clients:
                try:
                    x.sock.sendall(b"x")
                    x.sock.settimeout(2)
                    assert x.sock.recv(1), "a clean end of stream, not a reset"
                except (ConnectionResetError, BrokenPipeError):
                    reset += 1
            assert reset == 3
            fresh = [Client(listen) for _ in range(6)]
            assert all(x.greeted(5) for x in fresh)
            assert (a.accepted, b.accepted, c.accepted) == (3, 3, 9)  # only c takes new ones
            # a summed report still carries the backends in drain, each on its own row
            report = report_counters(published.segment, 1, published.image)
            assert set(report["web"]) == {"(all)", "a", "b"}
            assert report["web"]["a"]["active"] == 3 and report["web"]["b"]["active"] == 0
            for x in clients + fresh:
                x.close()
