"""A node's part in health checking, for the agent: what its prober probes,
what it tells the control plane, and where its own verdict applies.

- Targets: with a control plane, the backends of checked services (health
  kind other than "none") whose probers, by rendezvous hashing over the
  nodes the control plane announces (lbcore.probing.probers_for), include
  this node; in static mode, every backend of the file's checked services.
  A backend held down by the verdict stays in the snapshot and is probed
  too: that is how it comes back.
- Reports: the results that changed, at once (ControlLink.send_results);
  the digest of all of them, the node's ejections and panics with each
  periodic report; the full set again when the control plane asks.
- Local verdicts: in static mode, and while the node is STALE (I7), the
  node's own rise/fall verdict holds a backend down on this node
  (``local_down`` of its counter slot, which picks skip as they skip an
  ejected backend); otherwise the control plane's verdict is the only one.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lbcore.config import HealthCheck, Service, parse_address
from lbcore.ejection import ejected, panics, set_local_down
from lbcore.image import Image
from lbcore.probing import Prober, Target
from lbcore.segment import Segment
from lbcore.slots import SlotMap
from lbcore.verdict import probers_for, results_digest
from lbcore.wire import MAX_REPORT_BACKENDS, NodeHealth

PANIC_LOG_EVERY_S = 10.0
REASSIGN_EVERY_S = 0.2


class NodeChecks:
    def __init__(self, node_id: str, source_ip: str, segment: Segment, wake_fd: int) -> None:
        self.node_id = node_id
        self.segment = segment
        self._wake_fd = wake_fd
        self.prober = Prober(source_ip, self._wake)
        self.prober.start()
        self._key: tuple[Any, ...] = ()
        self._assigned_at = -REASSIGN_EVERY_S
        self._mine: dict[tuple[str, int], bool] = {}  # (backend, probers) -> probed by this node, for _nodes
        self._nodes: tuple[str, ...] | None = ()
        self._down_slots: set[int] = set()
        self._panics: dict[str, int] = {}
        self._panic_logged: dict[str, float] = {}
        self._error_logged = ""

    def _wake(self) -> None:
        try:
            os.write(self._wake_fd, b"h")
        except BlockingIOError:
            pass  # a wake is pending already

    def close(self) -> None:
        self.prober.stop()

    # ------------------------------------------------------------ targets

    def assign(self, services: Callable[[], Iterable[tuple[str, HealthCheck, Iterable[Any]]]],
               slots: SlotMap[tuple[str, str]], key: Any, nodes: tuple[str, ...] | None) -> None:
        """Probe the backends of ``services()`` ((name, health, backends) in
        name order) that this node is a prober of: all of them when
        ``nodes`` is None (static mode). ``key`` names the input: the same
        key, nothing to do; another one, at most every REASSIGN_EVERY_S
        unless the nodes changed (a routing that changes all the time, a
        weight at a time, is read again a few times a second, not each time)."""
        if (key, nodes) == self._key:
            return
        now = time.monotonic()
        if nodes == self._nodes and now - self._assigned_at < REASSIGN_EVERY_S:
            return
        self._key, self._assigned_at = (key, nodes), now
        if nodes != self._nodes:
            self._mine.clear()
            self._nodes = nodes
        targets: dict[str, Target] = {}
        rows: dict[str, list[int]] = {}
        for name, health, backends in services():
            if health.kind == "none":
                continue
            for b in backends:
                rows.setdefault(b.id, []).append(slots.slot_of((name, b.id)))
                if b.id in targets or not self._probes(b.id, health.probers, nodes):
                    continue
                ip, port = parse_address(b.address)
                targets[b.id] = Target(b.id, ip, health.port or port, health)
        self.prober.assign({b: Target(t.backend, t.ip, t.port, t.health, tuple(rows[b]))
                            for b, t in targets.items()})

    def _probes(self, backend: str, k: int, nodes: tuple[str, ...] | None) -> bool:
        if nodes is None:
            return True
        mine = self._mine.get((backend, k))
        if mine is None:
            mine = self._mine[(backend, k)] = self.node_id in probers_for(backend, nodes, k)
        return mine

    def assign_static(self, services: tuple[Service, ...], slots: SlotMap[tuple[str, str]]) -> None:
        self.assign(lambda: ((s.name, s.health, s.backends) for s in services), slots, services, None)

    # ------------------------------------------------------------ verdicts applied here

    def apply_local(self, local: bool) -> None:
        """Hold down on this node what its own verdict says is down, when
        ``local`` (static mode, STALE); else nothing (the control plane's
        verdict, in the snapshot, is the one)."""
        down = {slot for slots in self.prober.locally_down().values() for slot in slots} if local else set()
        for slot in down - self._down_slots:
            set_local_down(self.segment, slot, True)
        for slot in self._down_slots - down:
            set_local_down(self.segment, slot, False)
        self._down_slots = down

    # ------------------------------------------------------------ what the node says

    def node_health(self, image: Image | None, log: Any) -> NodeHealth:
        now_ms = time.monotonic_ns() // 1_000_000
        out = ejected(self.segment, image, now_ms) if image is not None else {}
        room = MAX_REPORT_BACKENDS  # what a report may carry: the rest is left out, not the report refused
        for service in list(out):
            out[service] = dict(list(out[service].items())[:room])
            room -= len(out[service])
            if not out[service]:
                del out[service]
        counts = panics(self.segment, image) if image is not None else {}
        if self.prober.error != self._error_logged:
            self._error_logged = self.prober.error
            log(f"health checks: the prober's last error (it goes on): {self.prober.error}")
        return NodeHealth(results_digest(self.prober.results()), out, self._panicking(counts, log))

    def _panicking(self, counts: Mapping[str, int], log: Any) -> dict[str, int]:
        """The services that routed in panic since the last call, with how
        many connections: what is reported (now, not ever), and logged."""
        now = time.monotonic()
        grew = {s: n - self._panics.get(s, 0) for s, n in counts.items() if n > self._panics.get(s, 0)}
        for service, count in grew.items():
            if now - self._panic_logged.get(service, -PANIC_LOG_EVERY_S) >= PANIC_LOG_EVERY_S:
                self._panic_logged[service] = now
                log(f"PANIC: service {service}: every backend left is ejected or down here; "
                    f"routing to all of its eligible backends ({count} connections since the last word)")
        self._panics = dict(counts)
        return grew
