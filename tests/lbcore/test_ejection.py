"""Passive ejection, node-local and immediate: the picks skip an ejected or
locally-down slot in every algorithm (and fall back to panic when nothing
else is left); real worker processes count connect failures (refused, or
reset before the first byte), eject within max_ejection_percent, back off,
take the backend back when its time is over; connects leave from the node's
address. Backends are real listeners on 127.0.0.0/8."""
from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest

from lbcore.balance.probe import monotonic_ms, picks
from lbcore.config import Config, parse_config
from lbcore.ejection import ejected, panics, release_eject_locks, set_local_down
from lbcore.stats import format_stats, node_stats
from tests.conftest import unique_node_id
from tests.lbcore.test_balance import positions, service
from tests.lbcore.test_image_swap import WORKERS, start_workers, stop_workers
from tests.support import free_port, wait_for

ALGORITHMS = ["wrr", "least_conn", "p2c", "maglev"]
LONG_MS = 60_000  # an ejection that outlasts the test


# ---------------------------------------------------------------- picks (probe)

def client_hashes(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.uint64) * 2654435761 % (1 << 32)).astype(np.uint32)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_picks_skip_ejected_and_locally_down_slots(published, algorithm):
    image = published.publish_text([service(algorithm, [1, 1, 1, 1])])
    slots = [int(s) for s in image.backends["slot"]]
    counters, now = published.segment.counters, monotonic_ms()
    counters["ejected_until_ms"][slots[0]] = now + LONG_MS
    set_local_down(published.segment, slots[1], True)
    counters["ejected_until_ms"][slots[2]] = now - 1  # over: back in the picks
    got = positions(published, picks(published.segment.base_address, 0, 1000,
                                     client_hashes=client_hashes(1000), now_ms=now))
    assert set(got) == {2, 3}
    set_local_down(published.segment, slots[1], False)
    got = positions(published, picks(published.segment.base_address, 0, 1000,
                                     client_hashes=client_hashes(1000), now_ms=now))
    assert set(got) == {1, 2, 3}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_heavy_backend_ejected_still_leaves_the_light_ones(published, algorithm):
    # its entries fill the WRR schedule and the Maglev table: the bounded
    # steps and probes miss the rows left, the scan finds them
    image = published.publish_text([service(algorithm, [256, 1, 1])])
    published.segment.counters["ejected_until_ms"][int(image.backends["slot"][0])] = monotonic_ms() + LONG_MS
    got = positions(published, picks(published.segment.base_address, 0, 2000,
                                     client_hashes=client_hashes(2000)))
    assert -1 not in got and set(got) <= {1, 2}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_panic_routes_among_eligible_rows_only(published, algorithm):
    image = published.publish_text([service(algorithm, [1, 0, 1, 1])])
    slots = [int(s) for s in image.backends["slot"]]
    counters, now = published.segment.counters, monotonic_ms()
    counters["ejected_until_ms"][slots[0]] = now + LONG_MS
    counters["ejected_until_ms"][slots[2]] = now + LONG_MS
    set_local_down(published.segment, slots[3], True)
    base, hashes = published.segment.base_address, client_hashes(500)
    assert set(picks(base, 0, 500, client_hashes=hashes, now_ms=now).tolist()) == {-1}
    rows, panicked = picks(base, 0, 500, client_hashes=hashes, now_ms=now, panic=True, hold=True)
    assert panicked.all()
    assert set(positions(published, rows)) == {0, 2, 3}  # never the row of weight 0
    # a retry in panic skips what the connection tried
    rows, panicked = picks(base, 0, 200, client_hashes=hashes[:200], now_ms=now, panic=True,
                           excluded_slots=[slots[0], slots[2]])
    assert panicked.all() and set(positions(published, rows)) == {3}
    # one row left in the picks: no panic
    set_local_down(published.segment, slots[3], False)
    rows, panicked = picks(base, 0, 200, client_hashes=hashes[:200], now_ms=now, panic=True)
    assert not panicked.any() and set(positions(published, rows)) == {3}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_no_eligible_row_is_no_panic(published, algorithm):
    published.publish_text([service(algorithm, [0, 0])])
    rows, panicked = picks(published.segment.base_address, 0, 10, panic=True)
    assert set(rows.tolist()) == {-1} and not panicked.any()


# ---------------------------------------------------------------- the module

def test_ejected_panics_and_locks_read_from_the_segment(published):
    image = published.publish_text([service("wrr", [1, 1, 1]), service("maglev", [1], name="api", port=7001)])
    segment, now = published.segment, 1_000_000
    slots = {r["id"].decode() + "@" + str(int(r["service_slot"])): int(r["slot"]) for r in image.backends}
    segment.counters["ejected_until_ms"][slots["b1@0"]] = now + 250
    segment.counters["ejected_until_ms"][slots["b2@0"]] = now  # ends now: not ejected
    assert ejected(segment, image, now) == {"svc": {"b1": 250}}
    assert ejected(segment, image, now + 250) == {}
    segment.service_states["panics"][0] = 7
    assert panics(segment, image) == {"svc": 7, "api": 0}
    segment.service_states["eject_lock"][:2] = [3, 4]  # held by workers 2 and 3
    assert release_eject_locks(segment, 2) == 1
    assert segment.service_states["eject_lock"][:2].tolist() == [0, 4]
    assert release_eject_locks(segment, 2) == 0
    set_local_down(segment, slots["b0@0"], True)
    assert int(segment.counters["local_down"][slots["b0@0"]]) == 1
    with pytest.raises(ValueError):
        set_local_down(segment, -1, True)


def test_stats_show_ejections_and_panics(published):
    image = published.publish_text([service("wrr", [1, 1])])
    segment = published.segment
    plain = format_stats(node_stats(segment))
    assert "ejected" not in plain and "panics" not in plain and "down here" not in plain
    segment.counters["ejected_until_ms"][int(image.backends["slot"][0])] = monotonic_ms() + LONG_MS
    set_local_down(segment, int(image.backends["slot"][1]), True)
    segment.service_states["panics"][0] = 3
    stats = node_stats(segment)
    [svc] = stats["services"]
    assert svc["panics"] == 3
    by_id = {b["id"]: b for b in svc["backends"]}
    assert 0 < by_id["b0"]["ejected_ms"] <= LONG_MS and by_id["b1"]["ejected_ms"] == 0
    assert (by_id["b0"]["local_down"], by_id["b1"]["local_down"]) == (False, True)
    table = format_stats(stats)
    assert "    ejected: b0 (" in table and "    down here: b1" in table and "    panics: 3 " in table


# ---------------------------------------------------------------- real workers

class Listener:
    """A listener on ``host``:``port`` served by a thread. Each connection is
    greeted with ``greeting`` and closed, or, with ``reset_after_s``, held
    that long and reset with nothing sent. Peers' addresses are recorded."""

    def __init__(self, port: int = 0, greeting: bytes = b"", reset_after_s: float | None = None,
                 host: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(512)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.greeting, self.reset_after_s = greeting, reset_after_s
        self.peers: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(peer[0])
            with conn:
                if self.reset_after_s is not None:
                    time.sleep(self.reset_after_s)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    with contextlib.suppress(OSError):
                        conn.sendall(self.greeting)

    @property
    def accepted(self) -> int:
        return len(self.peers)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@contextlib.contextmanager
def listeners(*specs: dict) -> Iterator[list[Listener]]:
    opened: list[Listener] = []
    try:
        for spec in specs:
            opened.append(Listener(**spec))
        yield opened
    finally:
        for listener in opened:
            listener.close()


def config(listen: int, backends: list[tuple[str, int]], outlier: dict[str, int], algorithm: str = "wrr",
           address: str = "") -> Config:
    """One service on 127.0.0.1:``listen``, backends (id, port) on 127.0.0.1."""
    lines = ["[node]", f'id = "{unique_node_id()}"', "workers = 1", "retries = 3"]
    if address:
        lines.append(f'address = "{address}"')
    lines += ["[[service]]", 'name = "web"', f'listen = "127.0.0.1:{listen}"', f'algorithm = "{algorithm}"',
              "[service.outlier]", *(f"{k} = {v}" for k, v in outlier.items())]
    for backend_id, port in backends:
        lines += ["[[service.backend]]", f'id = "{backend_id}"', f'address = "127.0.0.1:{port}"',
                  "weight = 1"]
    return parse_config("\n".join(lines) + "\n")


@contextlib.contextmanager
def serving(published, cfg: Config) -> Iterator[dict[str, int]]:
    """``cfg`` published and served by real workers; yields backend id -> slot."""
    image = published.publish(cfg)
    workers = start_workers(published.segment.path)
    try:
        wait_for(lambda: all(int(published.segment.workers[i]["listening"]) for i in range(WORKERS)),
                 10, "workers listening")
        yield {r["id"].decode(): int(r["slot"]) for r in image.backends}
    finally:
        stop_workers(workers)


def ask(port: int) -> bytes | None:
    """One client connection: the first line it gets, or None when it is
    closed or reset before one."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(64)
                if not chunk:
                    return None
                data += chunk
            return data
    except OSError:
        return None


def ejected_now(published) -> dict[str, int]:
    return ejected(published.segment, published.image).get("web", {})


def ask_until_ejected(published, port: int, backend_id: str, attempts: int = 60) -> list[bytes | None]:
    answers = []
    for _ in range(attempts):
        answers.append(ask(port))
        if backend_id in ejected_now(published):
            return answers
    raise AssertionError(f"{backend_id} not ejected after {attempts} connections: {Counter(answers)}")


@pytest.mark.timeout(60)
def test_a_refusing_backend_is_ejected_and_costs_no_client_anything(published):
    listen, dead = free_port(), free_port()
    with listeners({"greeting": b"a\n"}, {"greeting": b"b\n"}) as (a, b):
        cfg = config(listen, [("a", a.port), ("dead", dead), ("b", b.port)],
                     {"consecutive_failures": 3, "base_ejection_ms": LONG_MS, "max_ejection_percent": 50})
        with serving(published, cfg) as slots:
            counters = published.segment.counters
            answers = ask_until_ejected(published, listen, "dead")
            failed = int(counters[slots["dead"]]["failed"])
            assert failed >= 3
            answers += [ask(listen) for _ in range(60)]
            assert set(answers) == {b"a\n", b"b\n"}, "a client connection failed"
            assert int(counters[slots["dead"]]["failed"]) == failed, "the ejected backend was tried"
            assert int(counters[slots["dead"]]["ejections"]) == 1
            assert int(counters[slots["a"]]["consecutive_failures"]) == 0
            assert panics(published.segment, published.image) == {"web": 0}


@pytest.mark.timeout(60)
def test_never_more_than_max_ejection_percent_at_once(published):
    listen = free_port()
    dead = [free_port() for _ in range(4)]
    cfg = config(listen, [(f"d{i}", port) for i, port in enumerate(dead)],
                 {"consecutive_failures": 1, "base_ejection_ms": LONG_MS, "max_ejection_percent": 50})
    with serving(published, cfg):
        stop = threading.Event()
        answers: list[bytes | None] = []

        def client() -> None:
            for _ in range(40):
                if stop.is_set():
                    return
                answers.append(ask(listen))

        clients = [threading.Thread(target=client) for _ in range(4)]
        for t in clients:
            t.start()
        most = 0
        while any(t.is_alive() for t in clients):
            most = max(most, len(ejected_now(published)))
            time.sleep(0.001)
        stop.set()
        for t in clients:
            t.join(timeout=30)
        assert set(answers) == {None} and len(answers) == 160
        assert most <= 2
        ejected = ejected_now(published)
        assert len(ejected) == 2
        # the two left are not all held out: no panic, and a connection's
        # retries never go to what the node ejected (their failures stop)
        assert panics(published.segment, published.image)["web"] == 0
        counters = published.segment.counters
        slot_of = {row["id"].decode(): int(row["slot"]) for row in published.image.backends}
        before = {b: int(counters[slot_of[b]]["failed"]) for b in ejected}
        assert {ask(listen) for _ in range(20)} == {None}
        assert {b: int(counters[slot_of[b]]["failed"]) for b in ejected} == before


@pytest.mark.timeout(60)
def test_an_ejected_backend_comes_back_when_its_time_is_over(published):
    listen, revived = free_port(), free_port()
    with listeners({"greeting": b"good\n"}) as (good,):
        cfg = config(listen, [("good", good.port), ("revived", revived)],
                     {"consecutive_failures": 2, "base_ejection_ms": 300, "max_ejection_ms": 10_000,
                      "max_ejection_percent": 50})
        with serving(published, cfg) as slots:
            counters = published.segment.counters
            ask_until_ejected(published, listen, "revived")
            assert int(counters[slots["revived"]]["ejections"]) == 1
            assert ejected_now(published)["revived"] <= 300
            # still refusing when it comes back: ejected again, for twice as long
            wait_for(lambda: "revived" not in ejected_now(published), 2, "the first ejection to end")
            ask_until_ejected(published, listen, "revived")
            assert int(counters[slots["revived"]]["ejections"]) == 2
            left = ejected_now(published)["revived"]
            assert 300 < left <= 600, left
            with listeners({"port": revived, "greeting": b"revived\n"}) as (back,):
                # ejected: no connection reaches it before its time is over
                while ejected_now(published).get("revived", 0) > 50:
                    assert ask(listen) == b"good\n"
                assert back.accepted == 0
                wait_for(lambda: "revived" not in ejected_now(published), 2, "the second ejection to end")
                time.sleep(0.05)  # the workers' clock is CLOCK_MONOTONIC_COARSE: up to a tick behind
                answers = [ask(listen) for _ in range(10)]
                assert answers.count(b"revived\n") >= 4, answers
                assert back.accepted >= 4
            assert int(counters[slots["revived"]]["consecutive_failures"]) == 0


@pytest.mark.timeout(60)
def test_panic_routes_when_every_backend_is_ejected(published):
    """Both backends refuse and are ejected (cap 100%); then one comes back
    while both are still ejected: connections reach it in panic, counted."""
    listen, first, second = free_port(), free_port(), free_port()
    cfg = config(listen, [("first", first), ("second", second)],
                 {"consecutive_failures": 1, "base_ejection_ms": LONG_MS, "max_ejection_percent": 100})
    with serving(published, cfg):
        answers = [ask(listen) for _ in range(3)]
        assert set(answers) == {None}
        assert set(ejected_now(published)) == {"first", "second"}
        before = panics(published.segment, published.image)["web"]
        with listeners({"port": second, "greeting": b"second\n"}) as (back,):
            answers = [ask(listen) for _ in range(20)]
            assert answers == [b"second\n"] * 20
            assert back.accepted == 20
        assert panics(published.segment, published.image)["web"] >= before + 20
        # it serves, in panic, until its time is over
        assert set(ejected_now(published)) == {"first", "second"}


@pytest.mark.timeout(60)
def test_locally_down_backends_are_skipped_and_panic_routes_to_them(published):
    listen = free_port()
    with listeners({"greeting": b"a\n"}, {"greeting": b"b\n"}) as (a, b):
        cfg = config(listen, [("a", a.port), ("b", b.port)], {"consecutive_failures": 0})
        with serving(published, cfg) as slots:
            set_local_down(published.segment, slots["a"], True)
            assert {ask(listen) for _ in range(10)} == {b"b\n"}
            set_local_down(published.segment, slots["b"], True)
            assert {ask(listen) for _ in range(10)} == {b"a\n", b"b\n"}
            assert panics(published.segment, published.image)["web"] == 10
            set_local_down(published.segment, slots["a"], False)
            set_local_down(published.segment, slots["b"], False)
            time.sleep(0.05)  # a worker that found the service in panic picks so for PANIC_RECHECK_MS more
            assert {ask(listen) for _ in range(10)} == {b"a\n", b"b\n"}
            assert panics(published.segment, published.image)["web"] == 10


@pytest.mark.timeout(60)
def test_backend_connects_leave_from_the_node_address(published):
    listen = free_port()
    with listeners({"greeting": b"hi\n"}) as (backend,):
        cfg = config(listen, [("only", backend.port)], {}, address="127.0.0.2")
        with serving(published, cfg):
            assert [ask(listen) for _ in range(5)] == [b"hi\n"] * 5
        assert backend.peers == ["127.0.0.2"] * 5


@pytest.mark.timeout(60)
def test_a_reset_before_the_first_byte_counts_as_a_failure(published):
    """The backend accepts, then resets with nothing sent (after its connect
    has surely completed: the relay's path, not the connect's)."""
    listen = free_port()
    with listeners({"greeting": b"good\n"}, {"reset_after_s": 0.05}) as (good, resetting):
        cfg = config(listen, [("good", good.port), ("resetting", resetting.port)],
                     {"consecutive_failures": 3, "base_ejection_ms": LONG_MS, "max_ejection_percent": 50})
        with serving(published, cfg) as slots:
            answers = ask_until_ejected(published, listen, "resetting", attempts=30)
            assert None in answers  # a client of the resetting backend saw the reset
            # its connects succeeded: the relay counted the reset
            assert int(published.segment.counters[slots["resetting"]]["failed"]) == 0
            accepted = resetting.accepted
            assert [ask(listen) for _ in range(20)] == [b"good\n"] * 20
            assert resetting.accepted == accepted
