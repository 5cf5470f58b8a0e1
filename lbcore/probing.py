"""Active health checks on a node (DESIGN, "Health"): the probes, and the
node's own verdict where it applies (which backends it probes:
lbcore.verdict.probers_for, the rule it shares with the control plane).

- ``Prober``: a thread of the agent, never a worker: each target probed
  every interval shortened by up to ``jitter_percent`` (the first one at a
  random point of the first interval: no burst at start), at most
  ``max_in_flight`` at once, each bounded by ``timeout_ms``, leaving from
  the node's own address (the path traffic takes). A target's result is
  handed on only when it changes (``take_changes``): what the control plane
  hears grows with the rate of change, not with backends x interval.
- Each target's own ``RiseFall`` counter is the node's verdict, which holds
  a backend down locally in static mode and while the node is STALE.
"""
from __future__ import annotations

import errno
import heapq
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lbcore.config import HealthCheck, parse_expect
from lbcore.verdict import RiseFall

MAX_IN_FLIGHT = 256        # probes open at once on a node
BATCH_S = 0.005            # the prober's shortest sleep: probes due within it start in one turn
HTTP_RESPONSE_BYTES = 4096  # read at most this much of an HTTP check's answer
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: a source address without taking a port at bind
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
# A connect that fails with these failed on this node's side (its address,
# its ports): no result, not a backend's failure
LOCAL_ERRORS = frozenset({errno.EINVAL, errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.EAFNOSUPPORT})


def source_applies(source_ip: str, destination_ip: str) -> bool:
    """Probes (and backend connections: the workers' rule is the same) leave
    from the node's address, except a loopback address towards a backend
    that is not on loopback: no route leads there from 127/8."""
    return bool(source_ip) and (not source_ip.startswith("127.") or destination_ip.startswith("127."))


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
        self._done: dict[str, float] = {}  # when each target's last probe completed
        self._next_expiry = 0.0
        self.error = ""  # the last error of the prober's loop (it goes on)

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
        while not self._stopping.is_set():
            try:
                self._turn()
            except Exception as exc:  # never a dead thread whose old results go on being vouched for
                self.error = f"{exc.__class__.__name__}: {exc}"
                time.sleep(0.1)

    def _turn(self) -> None:
        heap = self._heap
        now = time.monotonic()
        self._take_assignment(now)
        self._start_due(now)
        if now >= self._next_expiry:
            self._expire(now)
        if len(self._in_flight) >= self.max_in_flight:
            wait = min(p.deadline for p in self._in_flight.values())  # nothing starts before one ends
        else:
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

    def _expire(self, now: float) -> None:
        """A result with no probe completed for longer than it may count
        (3 intervals, at least 1.5 s) is no result: dropped, and said so,
        rather than vouched for as if it were current."""
        self._next_expiry = now + 1.0
        with self._lock:
            for backend, done in list(self._done.items()):
                target = self._targets.get(backend)
                if target is not None and now - done > max(3 * target.health.interval_ms / 1000, 1.5):
                    del self._done[backend]
                    if self._results.pop(backend, None) is not None:
                        self._changes[backend] = None

    def _take_assignment(self, now: float) -> None:
        with self._lock:
            assigned, self._assigned = self._assigned, None
            if assigned is None:
                return
            for backend in set(self._targets) - set(assigned):
                self._due.pop(backend, None)
                self._done.pop(backend, None)
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
            # never before this probe's timeout: two probes of a backend never overlap
            due = due_of[backend] = now + max(health.interval_ms * jitter, health.timeout_ms) / 1000
            heapq.heappush(heap, (due, backend))
            self._start(target, now + health.timeout_ms / 1000)

    def _start(self, target: Target, deadline: float) -> None:
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError:
            return  # out of descriptors: no result this time, none changed
        try:
            if source_applies(self.source_ip, target.ip):
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.source_ip, 0))
            code = sock.connect_ex((target.ip, target.port))
        except OSError:
            sock.close()
            return  # no port or address of ours: no result this time, none changed
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
        if code in LOCAL_ERRORS:
            sock.close()
            return  # the node's own trouble, not the backend's: no result this time
        if code not in (0, errno.EINPROGRESS, errno.EALREADY):
            sock.close()
            self._record(target, False)
            return
        self._in_flight[sock.fileno()] = probe
        try:
            self._epoll.register(sock.fileno(), select.EPOLLOUT | select.EPOLLIN | select.EPOLLRDHUP)
        except OSError:
            del self._in_flight[sock.fileno()]
            sock.close()

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
            current = self._targets.get(backend)
            if current is None or (current.ip, current.port, current.health) != (target.ip, target.port,
                                                                                 target.health):
                return  # dropped, or its address or check changed meanwhile
            self._done[backend] = time.monotonic()
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
