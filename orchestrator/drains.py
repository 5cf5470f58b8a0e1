"""Drains confirmed by the data plane.

A drain starts with ``lbctl backend drain`` (or ``remove``): the backend's
record becomes draining at config version D, and every snapshot from D on
carries it as ``state: draining``, so nodes route nothing new to it and
keep reporting the connections still open to it. It is *drained* when
every node the control plane knows of has reported, from a version at or
after D, 0 open connections to it. A node that stopped reporting is not
counted as done: it is named as blocking, until it speaks again or the
drain times out.

At the drain's timeout (its own, from ``--timeout-ms``, or the service's
``drain_timeout_ms`` when it started) the service's ``on_drain_timeout``
decides: ``keep`` ends the drain at once, the connections left open;
``close`` marks the row ``closing``, nodes reset what is left, and the
drain ends when they confirm it, or CLOSE_GRACE_S later. Either way the
log says how many connections were open, and the record becomes drained
(or removed, for a drain that was a removal).

The watch is derived, never stored beyond the record: after a restart it
reads the draining records again, and the nodes' next reports confirm; it
confirms nothing for START_GRACE_S, the time every node still running
takes to report to a control plane that knows none yet. A node's counters
count only when read once all its workers had taken up the version it
reports (lbcore/agent.py): a worker still picking from the image before
could yet open a connection to the backend.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from lbcore.wire import SILENT_S, SUMMED
from orchestrator.errors import ControlError
from orchestrator.model import Backend, Change, Drain, Membership
from orchestrator.policy import lifecycle_of
from orchestrator.store import Store

CLOSE_GRACE_S = 3.0   # after the nodes were told to close: drained even if one never confirms
STEP_S = 0.05         # how often running drains are looked at
# After a start the control plane knows no node yet: none is confirmed as
# done before every node still running has had time to report (and one
# that stays silent past this is the operator's to see, at the timeout)
START_GRACE_S = 2 * SILENT_S
Key = tuple[str, str]


def open_connections(counters: Mapping[str, Any], service: str, backend_id: str) -> int:
    """What a node's last counters say is open to a backend: its own row,
    else its service's summed row (an upper bound), else none."""
    rows = counters.get(service) or {}
    row = rows.get(backend_id) or rows.get(SUMMED)
    return max(0, int(row["active"])) if row else 0


class DrainWatch:
    """Follows the draining records and ends each drain when the nodes
    confirm it or it times out. ``nodes`` gives what the control plane
    knows of each node (the server's records: ``epoch``, ``version``,
    ``counters``, ``counters_version``, ``reported`` on time.monotonic);
    ``epoch`` the published epoch; ``write`` commits a drain's progress
    (ControlPlane.record_drain)."""

    def __init__(self, store: Store, write: Callable[[str, str, Drain, Membership, int], int],
                 nodes: Callable[[], Mapping[str, Mapping[str, Any]]], epoch: Callable[[], int],
                 log: Callable[[str], None]) -> None:
        self.store, self.write, self.nodes, self.epoch, self.log = store, write, nodes, epoch, log
        self.draining: dict[Key, Backend] | None = None  # None: not read yet
        self._touched: set[Key] = set()
        self._closing_since: dict[Key, float] = {}
        self._unrecorded: dict[Key, Drain] = {}  # draining records of a store made before drains were kept
        self._next = 0.0
        self._failed = False
        self._started = time.monotonic()

    def touch(self, change: Change) -> None:
        if change.backend is not None:
            self._touched.add(change.backend)

    # ------------------------------------------------------------ what the nodes say

    def confirmation(self, record: Backend, drain: Drain, now: float) -> tuple[int, list[dict[str, str]]]:
        """(open connections summed over the nodes' last reports, the nodes
        not yet confirmed, each with why)."""
        epoch, total, waiting = self.epoch(), 0, []
        for name, node in sorted(self.nodes().items()):
            active = open_connections(node["counters"], record.service, record.id) \
                if node["epoch"] == epoch else 0
            total += active
            silent = now - node["reported"]
            if silent > SILENT_S:
                why = f"silent for {silent:.1f} s"
            elif node["epoch"] != epoch:
                why = f"on epoch {node['epoch']}, not the published {epoch}"
            elif node["version"] < drain.version:
                why = f"applied version {node['version']} < {drain.version}"
            elif node.get("counters_version", -1) < drain.version:
                why = "no counters of the drain's version yet (its workers taking it up, or not kept)"
            elif active:
                why = f"{active} open"
            else:
                continue
            waiting.append({"node": name, "why": why})
        return total, waiting

    def progress(self, record: Backend) -> dict[str, Any]:
        """The record's drain as ``backend list`` shows it: null when it
        never drained; how it ended; or, running, what is still open."""
        drain = record.drain
        if drain is None:
            return {"drain": None}
        shown = dataclasses.asdict(drain)
        if record.state is Membership.DRAINING and not drain.ended:
            shown["open"], shown["unconfirmed"] = self.confirmation(record, drain, time.monotonic())
        else:
            shown["open"], shown["unconfirmed"] = drain.open_at_end, []
        return {"drain": shown}

    # ------------------------------------------------------------ the watch

    def step(self, now_wall: float | None = None, now: float | None = None) -> float:
        """Look at the running drains (at most every STEP_S, or at once after
        a failed write); end those confirmed or timed out. Returns when the
        next look is due (monotonic; inf while nothing drains)."""
        now = time.monotonic() if now is None else now
        if now < self._next:
            return self._next
        self._next = now + STEP_S
        now_wall = time.time() if now_wall is None else now_wall
        try:
            self._read()
            for key, record in sorted((self.draining or {}).items()):
                self._look(key, record, now_wall, now)
            self._failed = False
        except ControlError:  # an operator's write meanwhile: read again next step
            self._next = now
        except Exception as exc:  # the store failed: the next step retries
            if not self._failed:
                self.log(f"drains: {exc.__class__.__name__}: {exc}; retrying")
            self._failed = True
        return self._next if self.draining or self.draining is None or self._touched else math.inf

    def _read(self) -> None:
        if self.draining is None:
            self._touched.clear()
            self.draining = {(b.service, b.id): b for b in self.store.read().backends
                             if b.state is Membership.DRAINING}
        elif self._touched:
            keys, self._touched = self._touched, set()
            for b in self.store.read_rows(set(), keys, set()).backends:
                self.draining.pop((b.service, b.id), None)
                if b.state is Membership.DRAINING:
                    self.draining[(b.service, b.id)] = b
        for held in (self._closing_since, self._unrecorded):
            for key in set(held) - set(self.draining):
                del held[key]

    def _look(self, key: Key, record: Backend, now_wall: float, now: float) -> None:
        service, backend_id = key
        drain = record.drain
        if drain is None:  # draining in a store made before drains were confirmed: from now on
            drain = self._unrecorded.setdefault(
                key, Drain(now_wall, 0, self._service_timeout(service), "keep"))
        total, waiting = self.confirmation(record, drain, now)
        if not waiting and now - self._started >= START_GRACE_S:
            self._end(record, drain, "confirmed", total)
            return
        if now_wall < drain.since + drain.timeout_ms / 1000 or not waiting:
            return
        blocking = ", ".join(f"{w['node']} ({w['why']})" for w in waiting)
        if drain.closing:
            if now - self._closing_since.setdefault(key, now) >= CLOSE_GRACE_S:
                self.log(f"drain of {service}/{backend_id}: {total} connections still reported open "
                         f"{CLOSE_GRACE_S:.0f} s after the nodes were told to close them "
                         f"(waiting for {blocking})")
                self._end(record, drain, "timeout", total)
        elif self._on_timeout(service) == "keep":
            self.log(f"drain of {service}/{backend_id} timed out after {drain.timeout_ms} ms with {total} "
                     f"connections open (waiting for {blocking}); on_drain_timeout = keep: left open")
            self._end(record, drain, "timeout", total)
        else:
            self.log(f"drain of {service}/{backend_id} timed out after {drain.timeout_ms} ms with {total} "
                     f"connections open (waiting for {blocking}); on_drain_timeout = close: nodes close them")
            self._closing_since[key] = now
            self._commit(record, dataclasses.replace(drain, closing=True), Membership.DRAINING)

    def _end(self, record: Backend, drain: Drain, how: str, total: int) -> None:
        state = Membership.REMOVED if drain.then == "remove" else Membership.DRAINED
        self._commit(record, dataclasses.replace(drain, ended=how, open_at_end=total), state)
        self.log(f"backend {record.service}/{record.id} {state.value}: drain "
                 f"{'confirmed by every node' if how == 'confirmed' else 'timed out'}, "
                 f"{total} connections were open")

    def _commit(self, record: Backend, drain: Drain, state: Membership) -> None:
        self.write(record.service, record.id, drain, state, record.version)
        self._touched.add((record.service, record.id))
        self._read()

    def _policy_lifecycle(self, service: str) -> Any:
        policy = next(iter(self.store.read_rows({service}, set(), set()).policies), None)
        return lifecycle_of(policy.lifecycle, policy.algorithm) if policy else None

    def _service_timeout(self, service: str) -> int:
        lifecycle = self._policy_lifecycle(service)
        return lifecycle.drain_timeout_ms if lifecycle else 0

    def _on_timeout(self, service: str) -> str:
        lifecycle = self._policy_lifecycle(service)
        return lifecycle.on_drain_timeout if lifecycle else "keep"
