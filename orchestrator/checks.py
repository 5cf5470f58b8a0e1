"""The health checks' verdict on the control plane: the nodes' probe
results in, one health observation per change of verdict out (DESIGN,
"Health"; the pure rules are orchestrator/health.py).

Per checked backend (an active backend with weight above 0 of a service
whose ``health.kind`` is not "none", as the published routing has it):

1. the current probers are ``probers_for(backend, live nodes, probers)``;
2. every interval (and soon after a prober's result changes, at most
   twice an interval) their fresh results give a quorum verdict; verdicts
   fall due on a 50 ms grid, so many backends' changes are one recompute;
3. the verdict moves one RiseFall counter; a change of its state is
   damped (more than 4 changes in 60 s hold the backend down 120 s);
4. a change of the backend's state is written through the store's
   health path (``record_verdict``: the next revision, source "checks"),
   then routed like any write (coalesced recompute).

An operator's ``health report`` is a write like any other and sets the
counter to full or none (HAProxy's ``set server health``): the checks
then need ``fall`` bad verdicts to take a backend reported up down again,
or ``rise`` good ones to bring a backend reported down back.

Nodes report a result only when it changes; their periodic report carries
the digest of all their results (``vouch``): a match refreshes them all, a
mismatch asks the node for its full set again.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lbcore.config import HealthCheck
from lbcore.routing import Routing, ServiceRoutes
from lbcore.verdict import results_digest
from orchestrator.errors import BadRequestError
from orchestrator.health import FlapDamper, Result, RiseFall, fresh_for, probers_for, quorum

MAX_RESULTS = 16384  # results in one message (a node sends its full set in parts of at most this)
# Verdicts fall due on a grid of this step, so that those of many backends
# are made in one turn and give one recompute: health churn on a large pool
# makes at most 1 / VERDICT_STEP_S snapshots a second, not one per backend.
VERDICT_STEP_S = 0.05


def on_step(t: float) -> float:
    return math.ceil(t / VERDICT_STEP_S) * VERDICT_STEP_S


@dataclass
class Checked:
    service: str
    health: HealthCheck
    counter: RiseFall
    up: bool                      # the verdict as stored and published
    damper: FlapDamper = field(default_factory=FlapDamper)
    due_s: float = 0.0            # the next verdict
    last_s: float = -1e9          # the last verdict

    @property
    def interval_s(self) -> float:
        return self.health.interval_ms / 1000


class HealthChecks:
    def __init__(self, record_verdict: Callable[[str, bool], Any], log: Callable[[str], None]) -> None:
        self.record_verdict = record_verdict
        self.log = log
        self.checked: dict[str, Checked] = {}
        self._ids: dict[str, Any] = {}  # service -> its backend ids in the published routing
        self._by_service: dict[str, set[str]] = {}  # service -> the backends it checks
        self._probers: dict[tuple[str, int], list[str]] = {}
        self._probers_of: tuple[str, ...] = ()
        self._vouched: dict[str, float] = {}  # node -> when its digest last matched
        self.results: dict[str, dict[str, Result]] = {}  # backend -> node -> its latest result
        self.by_node: dict[str, dict[str, bool]] = {}  # node -> backend -> result: what the node holds
        self._digests: dict[str, str] = {}
        self._heap: list[tuple[float, str]] = []
        self._services: dict[str, ServiceRoutes] = {}

    # ------------------------------------------------------------ what is checked

    def follow(self, routing: Routing, now_s: float) -> None:
        """The checked backends of the published routing: only the services
        whose routes changed since the last call are looked at again (a
        backend in two checked services is checked by the first by name)."""
        services = routing.services
        held = self._services
        changed = sorted(n for n in services.keys() | held.keys() if services.get(n) is not held.get(n))
        if not changed:
            return
        self._services = dict(services)
        for name in changed:
            routes = services.get(name)
            if routes is None:
                self._ids.pop(name, None)
            else:
                self._ids[name] = routes.backends.keys()
            before, now_checked = self._by_service.pop(name, set()), set()
            if routes is not None and routes.health.kind != "none":
                for row in routes.backends.values():
                    c = self.checked.get(row.id)
                    if c is not None and c.service != name and c.service < name and c.service in services:
                        continue  # checked by a service before this one
                    if c is None or c.health != routes.health:
                        counter = RiseFall(routes.health.rise, routes.health.fall, row.up)
                        c = self.checked[row.id] = Checked(name, routes.health, counter, row.up)
                        c.due_s = on_step(now_s + c.interval_s)
                        heapq.heappush(self._heap, (c.due_s, row.id))
                    c.service, c.up = name, row.up
                    now_checked.add(row.id)
                self._by_service[name] = now_checked
            for gone in before - now_checked:
                if gone in self.checked and self.checked[gone].service == name:
                    del self.checked[gone]

    def is_known(self, backend: str) -> bool:
        """A backend of the published routing (of any service)."""
        return any(backend in ids for ids in self._ids.values())

    def probers(self, backend: str, k: int, nodes: tuple[str, ...]) -> list[str]:
        """probers_for, remembered until the nodes change."""
        if nodes != self._probers_of or len(self._probers) > 4 * len(self.checked) + 1024:
            self._probers.clear()
            self._probers_of = nodes
        found = self._probers.get((backend, k))
        if found is None:
            found = self._probers[(backend, k)] = probers_for(backend, nodes, k)
        return found

    # ------------------------------------------------------------ the nodes' results

    def receive(self, node: str, results: Any, replace: bool, now_s: float) -> None:
        """A node's changed results (or, ``replace``, the first part of its
        full set): ``{backend: true | false | null}`` (null: no longer
        probed). BadRequestError, and nothing taken, when one is malformed
        or names a backend the routing does not have."""
        if not isinstance(results, dict) or len(results) > MAX_RESULTS:
            raise BadRequestError(f"health.results: results must be an object of at most {MAX_RESULTS} "
                                  "backends")
        for backend, up in results.items():
            if up is not None and not isinstance(up, bool):
                raise BadRequestError(f"health.results: {backend}: must be true, false or null")
            if up is not None and not self.is_known(backend):
                raise BadRequestError(f"health.results: no backend {backend!r} in the routing (probed by "
                                      f"node {node}); nothing taken")
        held = self.by_node.setdefault(node, {})
        if replace:
            for backend in held:
                self._drop(backend, node)
            held.clear()
        for backend, up in results.items():
            if up is None:
                held.pop(backend, None)
                self._drop(backend, node)
                continue
            before = held.get(backend)
            held[backend] = up
            self.results.setdefault(backend, {})[node] = Result(up, now_s)
            c = self.checked.get(backend)
            if c is not None and before != up:
                # soon, not at once: two probers' news close together are one verdict, not two
                due = on_step(max(now_s, c.last_s + c.interval_s / 2))
                if due < c.due_s:
                    c.due_s = due
                    heapq.heappush(self._heap, (due, backend))
        self._digests.pop(node, None)

    def vouch(self, node: str, digest: str, now_s: float) -> bool:
        """A node's periodic word on all its results: True when it matches
        what was received (they are all current as of now), False when
        something was lost (the node is to send its full set)."""
        held = self.by_node.get(node, {})
        mine = self._digests.get(node)
        if mine is None:
            mine = self._digests[node] = results_digest(held)
        if mine != digest:
            return False
        self._vouched[node] = now_s  # every result it holds is current as of now: O(1), not O(results)
        return True

    def _current(self, backend: str) -> dict[str, Result]:
        """The results of ``backend``, each as recent as its node last vouched for it."""
        vouched = self._vouched
        return {n: Result(r.up, max(r.at_s, vouched.get(n, r.at_s)))
                for n, r in self.results.get(backend, {}).items()}

    def _drop(self, backend: str, node: str) -> None:
        results = self.results.get(backend)
        if results is not None:
            results.pop(node, None)
            if not results:
                del self.results[backend]

    def forget(self, node: str) -> None:
        for backend in self.by_node.pop(node, {}):
            self._drop(backend, node)
        self._digests.pop(node, None)
        self._vouched.pop(node, None)

    def operator_set(self, backend: str, up: bool) -> None:
        """An operator's report: the counter full or none, and a hold for
        flapping lifted (the operator's word wins until the checks' next change)."""
        c = self.checked.get(backend)
        if c is not None:
            c.counter.set(up)
            c.up = up
            c.damper.lift()

    # ------------------------------------------------------------ verdicts

    def next_due(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def tick(self, now_s: float, live: Iterable[str]) -> float:
        """The verdicts due by ``now_s``; when the next one is due."""
        nodes = tuple(sorted(live))
        heap = self._heap
        while heap and heap[0][0] <= now_s:
            due, backend = heapq.heappop(heap)
            c = self.checked.get(backend)
            if c is None or due != c.due_s:
                continue  # dropped, or rescheduled (a newer entry stands)
            self._verdict(backend, c, now_s, nodes)
            c.due_s = on_step(now_s + c.interval_s)
            heapq.heappush(heap, (c.due_s, backend))
        return heap[0][0] if heap else now_s + 1.0

    def _verdict(self, backend: str, c: Checked, now_s: float, nodes: tuple[str, ...]) -> None:
        c.last_s = now_s
        probers = self.probers(backend, c.health.probers, nodes)
        good = quorum(self._current(backend), probers, now_s, c.interval_s)
        if good is not None:
            c.counter.observe(good)
        wanted = c.counter.up and not c.damper.held(now_s)
        if wanted == c.up:
            return
        if c.damper.record(now_s):
            self.log(f"health: {c.service}/{backend} changed state more than {c.damper.max_changes} times "
                     f"in {c.damper.window_s:g} s: held down for {c.damper.hold_s:g} s")
            wanted = False
            if wanted == c.up:
                return
        try:
            self.record_verdict(backend, wanted)
        except Exception as exc:  # the store failed: stays as stored, asked again next verdict
            self.log(f"health: {c.service}/{backend}: verdict {'up' if wanted else 'down'} not written "
                     f"({exc.__class__.__name__}: {exc}); tried again at the next verdict")
            return
        c.up = wanted

    # ------------------------------------------------------------ what is shown

    def evidence(self, backend: str, now_s: float, live: Iterable[str]) -> dict[str, Any] | None:
        """What the verdict of ``backend`` rests on now, or None if unchecked."""
        c = self.checked.get(backend)
        if c is None:
            return None
        results = self._current(backend)
        probers = []
        for node in self.probers(backend, c.health.probers, tuple(sorted(live))):
            r = results.get(node)
            fresh = r is not None and now_s - r.at_s <= fresh_for(c.interval_s)
            probers.append({"node": node, "result": None if r is None else ("up" if r.up else "down"),
                            "age_ms": None if r is None else int((now_s - r.at_s) * 1000), "fresh": fresh})
        return {"counter": {"health": c.counter.health, "rise": c.counter.rise, "fall": c.counter.fall},
                "probers": probers, "flaps": c.damper.flaps,
                "held_for_s": max(0.0, c.damper.held_until_s - now_s) if c.damper.held(now_s) else None}
