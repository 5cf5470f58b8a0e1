"""Active health checks on a node (DESIGN, "Health"): which backends this
node probes, the probes, and the node's own verdict where it applies.

- ``probers_for``: the ``k`` nodes that probe a backend, by rendezvous
  hashing over the nodes the control plane hears from (it announces them
  with each heartbeat). The control plane counts with the same function, so
  a node probes exactly the backends whose verdict counts its results:
  k x M probes in all, not N x M, and adding a node moves only its share.
- ``Prober``: a thread of the agent, never a worker: each target probed
  every interval shortened by up to ``jitter_percent`` (the first one at a
  random point of the first interval: no burst at start), at most
  ``max_in_flight`` at once, each bounded by ``timeout_ms``, leaving from
  the node's own address (the path traffic takes). A target's result is
  handed on only when it changes (``take_changes``): what the control plane
  hears grows with the rate of change, not with backends x interval.
- ``RiseFall``: one counter per backend (HAProxy's src/check.c): the
  control plane's verdict, and the node's own one, which holds a backend
  down locally in static mode and while the node is STALE.
"""
from __future__ import annotations

import errno
import hashlib
import heapq
import json
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from lbcore.config import HealthCheck, parse_expect

MAX_IN_FLIGHT = 256        # probes open at once on a node
BATCH_S = 0.005            # the prober's shortest sleep: probes due within it start in one turn
HTTP_RESPONSE_BYTES = 4096  # read at most this much of an HTTP check's answer
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: a source address without taking a port at bind
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def probers_for(backend: str, nodes: Iterable[str], k: int) -> list[str]:
    """The ``k`` nodes (all of them, when fewer) that probe ``backend``: the
    highest scores of hash(node, backend), in score order."""
    def score(node: str) -> bytes:
        return hashlib.blake2b(f"{node}\0{backend}".encode(), digest_size=8).digest()

    return sorted(set(nodes), key=score, reverse=True)[:max(0, k)]


def results_digest(results: Mapping[str, bool]) -> str:
    """What a node's periodic report says of its current results, so that a
    lost result message is noticed and repaired (the full set sent again)."""
    text = json.dumps(sorted(results.items()), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class RiseFall:
    """One counter in [0, rise + fall - 1], up while at least ``rise``:
    ``fall`` bad verdicts in a row take an up backend down, ``rise`` good
    ones bring it back, and alternating verdicts never change its state. A
    new backend starts up (full health), as one with no observation is
    routable."""

    def __init__(self, rise: int, fall: int, up: bool = True) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise, self.fall = rise, fall
        self.health = rise + fall - 1 if up else 0

    @property
    def up(self) -> bool:
        return self.health >= self.rise

    def set(self, up: bool) -> None:
        """Full health, or none (an operator's report: check.c's ``set server health``)."""
        self.health = self.rise + self.fall - 1 if up else 0

    def observe(self, good: bool) -> bool | None:
        """Count one verdict; the new state when it changed, else None."""
        was = self.up
        if good:
            self.health = min(self.health + 1, self.rise + self.fall - 1)
            if not was and self.health >= self.rise:
                self.health = self.rise + self.fall - 1  # up again: full health, as check.c does
        else:
            self.health = max(self.health - 1, 0)
            if was and self.health < self.rise:
                self.health = 0  # down: rise good verdicts to come back
        return None if self.up == was else self.up


@dataclass(frozen=True)
class Target:
    """One backend to probe: health is per backend id (a backend in two
    services is probed once, by its first service's settings)."""

    backend: str
    ip: str
    port: int
    health: HealthCheck
    slots: tuple[int, ...] = ()  # its counter slots on this node (where a local verdict is applied)


class _Probe:
    __slots__ = ("target", "sock", "deadline", "sent", "answer")

    def __init__(self, target: Target, sock: socket.socket, deadline: float) -> None:
        self.target, self.sock, self.deadline = target, sock, deadline
        self.sent = False
        self.answer = b""


class Prober(threading.Thread):
    """Probes the targets it is given, off the data path; ``wake`` is
    called (from this thread) when a result changed."""

    def __init__(self, source_ip: str, wake: Callable[[], None], max_in_flight: int = MAX_IN_FLIGHT) -> None:
        super().__init__(name="fulcrum-prober", daemon=True)
        self.source_ip, self.wake, self.max_in_flight = source_ip, wake, max_in_flight
        self._lock = threading.Lock()
        self._targets: dict[str, Target] = {}
        self._assigned: dict[str, Target] | None = None  # handed over, taken by the thread
        self._due: dict[str, float] = {}        # each target's next probe
        self._heap: list[tuple[float, str]] = []  # (due, target), stale entries skipped
        self._results: dict[str, bool] = {}     # the latest probe result of each target
        self._changes: dict[str, bool | None] = {}  # since the last take: None, a target dropped
        self._local: dict[str, RiseFall] = {}   # the node's own verdict of each target
        self._down: set[str] = set()            # targets the node's own verdict holds down
        self._in_flight: dict[int, _Probe] = {}
        self._epoll = select.epoll()
        self._stopping = threading.Event()
        self.probes = 0  # probes started (the node's share of the checks' load)

    # ------------------------------------------------------------ the agent's side

    def assign(self, targets: Mapping[str, Target]) -> None:
        with self._lock:
            self._assigned = dict(targets)

    def take_changes(self) -> dict[str, bool | None]:
        with self._lock:
            changes, self._changes = self._changes, {}
        return changes

    def results(self) -> dict[str, bool]:
        with self._lock:
            return dict(self._results)

    def locally_down(self) -> dict[str, tuple[int, ...]]:
        """The targets the node's own verdict holds down, with their slots."""
        with self._lock:
            return {b: self._targets[b].slots for b in self._down if b in self._targets}

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=2.0)
        for probe in list(self._in_flight.values()):
            probe.sock.close()
        self._in_flight.clear()
        self._epoll.close()

    # ------------------------------------------------------------ the thread

    def run(self) -> None:
        heap = self._heap
        while not self._stopping.is_set():
            now = time.monotonic()
            self._take_assignment(now)
            self._start_due(now)
            # at least BATCH_S between turns: the probes due meanwhile start
            # together, one wake for many (a wake costs about what a probe does)
            wait = max(min(heap[0][0] if heap else now + 0.05, now + 0.05), now + BATCH_S)
            if self._in_flight:
                wait = min(wait, min(p.deadline for p in self._in_flight.values()))
            for fd, events in self._epoll.poll(max(0.0, wait - time.monotonic())):
                probe = self._in_flight.get(fd)
                if probe is not None:
                    self._advance(probe, events)
            if self._in_flight:
                now = time.monotonic()
                for probe in [p for p in self._in_flight.values() if p.deadline <= now]:
                    self._finish(probe, False)

    def _take_assignment(self, now: float) -> None:
        with self._lock:
            assigned, self._assigned = self._assigned, None
            if assigned is None:
                return
            for backend in set(self._targets) - set(assigned):
                self._due.pop(backend, None)
                self._local.pop(backend, None)
                self._down.discard(backend)
                if self._results.pop(backend, None) is not None:
                    self._changes[backend] = None
            for backend, target in assigned.items():
                old = self._targets.get(backend)
                if old is None or old.health != target.health:
                    # a random point of the first interval: nodes that start together do not probe together
                    due = self._due[backend] = now + random.random() * target.health.interval_ms / 1000
                    heapq.heappush(self._heap, (due, backend))
                    self._local[backend] = RiseFall(target.health.rise, target.health.fall,
                                                    backend not in self._down)
            self._targets = assigned

    def _start_due(self, now: float) -> None:
        heap, due_of = self._heap, self._due
        while heap and heap[0][0] <= now and len(self._in_flight) < self.max_in_flight:
            due, backend = heapq.heappop(heap)
            if due_of.get(backend) != due:
                continue  # dropped, or rescheduled (a newer entry stands)
            target = self._targets[backend]
            health = target.health
            jitter = 1 - health.jitter_percent / 100 * random.random()
            due = due_of[backend] = now + health.interval_ms / 1000 * jitter
            heapq.heappush(heap, (due, backend))
            self._start(target, now + health.timeout_ms / 1000)

    def _start(self, target: Target, deadline: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            if self.source_ip:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.source_ip, 0))
            code = sock.connect_ex((target.ip, target.port))
        except OSError:
            sock.close()
            return  # out of descriptors or ports: no result this time, none changed
        self.probes += 1
        probe = _Probe(target, sock, deadline)
        if code == errno.EINPROGRESS:
            # Asked again, a connect says how it went without waiting: a
            # near backend (loopback, the same host) has answered already,
            # and the probe costs no epoll registration at all.
            code = sock.connect_ex((target.ip, target.port))
            code = 0 if code == errno.EISCONN else code
        if code == 0 and target.health.kind != "http":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            sock.close()
            self._record(target, True)
            return
        if code not in (0, errno.EINPROGRESS, errno.EALREADY):
            sock.close()
            self._record(target, False)
            return
        self._in_flight[sock.fileno()] = probe
        self._epoll.register(sock.fileno(), select.EPOLLOUT | select.EPOLLIN | select.EPOLLRDHUP)

    def _advance(self, probe: _Probe, events: int) -> None:
        sock = probe.sock
        if not probe.sent:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                self._finish(probe, False)
                return
            if probe.target.health.kind != "http":
                # connected: a tcp check passes; closed with a reset, as HAProxy does, so
                # that neither side keeps the connection in TIME_WAIT
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                self._finish(probe, True)
                return
            target = probe.target
            request = (f"GET {target.health.path} HTTP/1.0\r\nHost: {target.ip}:{target.port}\r\n"
                       "User-Agent: fulcrum-health-check\r\nConnection: close\r\n\r\n").encode()
            try:
                sock.send(request)
            except OSError:
                self._finish(probe, False)
                return
            probe.sent = True
            self._epoll.modify(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
            return
        try:
            data = sock.recv(HTTP_RESPONSE_BYTES - len(probe.answer))
        except BlockingIOError:
            return
        except OSError:
            self._finish(probe, False)
            return
        probe.answer += data
        if b"\n" in probe.answer or not data or len(probe.answer) >= HTTP_RESPONSE_BYTES:
            self._finish(probe, _status_passes(probe.answer, probe.target.health.expect))

    def _finish(self, probe: _Probe, good: bool) -> None:
        fd = probe.sock.fileno()
        self._in_flight.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        probe.sock.close()
        self._record(probe.target, good)

    def _record(self, target: Target, good: bool) -> None:
        backend = target.backend
        woke = False
        with self._lock:
            if self._targets.get(backend) is not target:
                return  # dropped or changed meanwhile
            if self._results.get(backend) != good:
                self._results[backend] = good
                self._changes[backend] = good
                woke = True
            local = self._local[backend]
            if local.observe(good) is not None:
                (self._down.discard if local.up else self._down.add)(backend)
                woke = True
        if woke:
            self.wake()


def _status_passes(answer: bytes, expect: str) -> bool:
    """An HTTP answer's status line against the statuses that pass."""
    line = answer.split(b"\n", 1)[0].split()
    if len(line) < 2 or not line[0].startswith(b"HTTP/") or not line[1].isdigit():
        return False
    status = int(line[1])
    return any(low <= status <= high for low, high in parse_expect(expect))
