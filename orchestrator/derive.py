"""RoutingState = eligible(membership, health, policy) (I2): derived in
full (``eligible``, ``derive_in_full``) and, by the single writer of the
running control plane, one change at a time (``Deriver``).

A backend is routable when its membership is active, its last health
observation says up (no observation yet counts as up: a new backend takes
traffic at once, and health checks take it out), and its weight is above 0.
An active backend with weight above 0 that its health verdict holds down is
in the snapshot too, marked ``up: false``: nodes route nothing to it and
keep probing it, which is how it comes back. A draining backend is in it,
marked ``state: draining`` (``closing`` once its drain timed out with
on_drain_timeout = close): nodes route nothing new to it and report the
connections still open to it, which is how its drain is confirmed.
"""
from __future__ import annotations

from lbcore.config import Backend, Service
from lbcore.routing import Routing
from lbcore.wire import Delta, WireError, backend_row, decode_snapshot, diff_delta, service_row
from orchestrator import model
from orchestrator.model import Change, Membership, State
from orchestrator.policy import health_of, lifecycle_of, outlier_of
from orchestrator.store import Store

# Touched rows beyond which one whole read beats reading them one by one (a
# row read costs about four rows of a whole read): this, or a quarter of the pool.
ROW_READS_AT_MOST = 256


class InconsistentSnapshotError(Exception):
    """A derived snapshot failed its check; it is not published."""


def row_of(record: model.Backend | None, up: bool) -> Backend | None:
    """The snapshot's row of a membership record: active with weight above
    0, marked down when its health says so, or draining; None when not in
    the snapshot."""
    if record is None:
        return None
    if record.state is Membership.DRAINING:
        closing = record.drain is not None and record.drain.closing
        return Backend(record.id, record.address, record.weight, up, record.max_conns,
                       "closing" if closing else "draining")
    if record.state is not Membership.ACTIVE or record.weight <= 0:
        return None
    return Backend(record.id, record.address, record.weight, up, record.max_conns)


def eligible(state: State) -> tuple[Service, ...]:
    up = {h.backend_id: h.up for h in state.health}
    routed: dict[str, list[Backend]] = {p.service: [] for p in state.policies}
    for b in state.backends:
        row = row_of(b, up.get(b.id, True)) if b.service in routed else None
        if row is not None:
            routed[b.service].append(row)
    return tuple(Service(p.service, p.listen, p.algorithm, tuple(routed[p.service]),
                         health_of(p.health), outlier_of(p.outlier), lifecycle_of(p.lifecycle, p.algorithm))
                 for p in state.policies)


def derive_in_full(state: State) -> Routing:
    """The routing of ``state``, derived in full and checked: deterministic
    bytes that a node's own rules accept and decode back to exactly what was
    derived (the model is go-control-plane's Consistent())."""
    routing = Routing.of(state.version, eligible(state), state.epoch)
    try:
        version, decoded, epoch = decode_snapshot(routing.encode())
    except WireError as exc:
        raise InconsistentSnapshotError(f"version {state.version}: {exc}") from None
    if Routing.of(version, decoded, epoch).encode() != routing.encode():
        raise InconsistentSnapshotError(f"version {state.version}: the snapshot does not decode to "
                                        "the routing state it was built from")
    return routing


class Deriver:
    """The single writer of RoutingState. Writes report what they touched;
    ``next()`` reads those rows back from the store (the truth), derives
    them, and makes the delta from the published routing. The delta is then
    applied by the nodes' own code (Routing.apply, which checks every row,
    reference and limit) and the result compared with what was derived.

    In full (at start, after a failed step, when a write touched much of
    the pool, and as an audit when idle) the whole state is derived, checked
    by the nodes' rules, and compared byte for byte (I2)."""

    def __init__(self, store: Store, row_reads_at_most: int = ROW_READS_AT_MOST) -> None:
        self.store = store
        self.row_reads_at_most = row_reads_at_most
        self.routing = Routing(-1, {}, epoch=-1)  # nothing published yet
        self._services: set[str] = set()
        self._backends: set[tuple[str, str]] = set()
        self._health: set[str] = set()
        self._everything = True

    def touch(self, change: Change) -> None:
        if change.service is not None:
            self._services.add(change.service)
        if change.backend is not None:
            self._backends.add(change.backend)
        if change.health is not None:
            self._health.add(change.health)

    def next(self) -> tuple[Routing, Delta] | None:
        """The routing of the store's current version and the delta to it,
        or None when nothing changed. On any failure (InconsistentSnapshotError
        when a check fails, or the store's own error) nothing is published
        and nothing touched is forgotten: the next call derives in full."""
        touched = len(self._services) + len(self._backends) + len(self._health)
        pool = sum(len(s.backends) for s in self.routing.services.values())
        try:
            if self._everything or touched > max(self.row_reads_at_most, pool // 4):
                derived = self._next_in_full()
            else:
                derived = self._next_by_rows()
        except BaseException:
            self._everything = True
            raise
        self._services, self._backends, self._health, self._everything = set(), set(), set(), False
        if derived is not None:
            self.routing = derived[0]
        return derived

    def audit(self) -> None:
        """I2 at rest: the published routing is what a full derivation from
        the store gives, byte for byte. If not: InconsistentSnapshotError,
        after advancing the store's version, so that the next call derives
        in full and publishes the correction as a new version (nodes take
        only newer ones)."""
        state = self.store.read()
        if (state.epoch, state.version) == (self.routing.epoch, self.routing.version) \
                and derive_in_full(state).encode() != self.routing.encode():
            self._everything = True
            self.store.advance_version()
            raise InconsistentSnapshotError(f"version {state.version}: the published routing differs "
                                            "from a full derivation from the store; republishing")

    def derive_in_full_next(self) -> None:
        """The next ``next()`` derives the whole state (a new epoch, say)."""
        self._everything = True

    def _next_in_full(self) -> tuple[Routing, Delta] | None:
        state = self.store.read()
        if (state.epoch, state.version) == (self.routing.epoch, self.routing.version):
            return None
        derived = derive_in_full(state)  # every row checked by the nodes' rules already
        delta = diff_delta(self.routing.version, self.routing.as_services(), state.version,
                           derived.as_services(), state.epoch)
        return derived, delta

    def _next_by_rows(self) -> tuple[Routing, Delta] | None:
        services, backends = self._services, self._backends
        state = self.store.read_rows(services, backends, self._health)
        if state.version == self.routing.version:
            return None
        if state.epoch != self.routing.epoch:  # a new epoch meanwhile: the whole state
            return self._next_in_full()
        backends = backends | {(b.service, b.id) for b in state.backends}  # incl. those found by health
        try:
            delta = self._delta(state, services, backends)
            routing = self.routing.apply(delta)
            self._check(routing, delta)
        except (WireError, InconsistentSnapshotError) as exc:
            raise InconsistentSnapshotError(f"version {state.version}: {exc}") from None
        return routing, delta

    def _delta(self, state: State, services: set[str], backends: set[tuple[str, str]]) -> Delta:
        up = {h.backend_id: h.up for h in state.health}
        policies = {p.service: p for p in state.policies}
        records = {(b.service, b.id): b for b in state.backends}
        current = self.routing.services
        delta = Delta(state.version, self.routing.version, epoch=state.epoch)
        for name in sorted(services):
            policy, held = policies.get(name), current.get(name)
            if policy is None and held is not None:
                delta.removed_services.append(name)
            elif policy is not None:
                health, outlier = health_of(policy.health), outlier_of(policy.outlier)
                lifecycle = lifecycle_of(policy.lifecycle, policy.algorithm)
                if held is None or (held.listen, held.algorithm, held.health, held.outlier, held.lifecycle) \
                        != (policy.listen, policy.algorithm, health, outlier, lifecycle):
                    delta.services.append(service_row(Service(name, policy.listen, policy.algorithm, (),
                                                              health, outlier, lifecycle)))
        for service, backend_id in sorted(backends):
            if service in delta.removed_services:
                continue
            row = row_of(records.get((service, backend_id)), up.get(backend_id, True))
            held_row = current[service].backends.get(backend_id) if service in current else None
            if row is not None and row != held_row:
                delta.backends.append(backend_row(service, row))
            elif row is None and held_row is not None:
                delta.removed_backends.append({"service": service, "id": backend_id})
        return delta

    @staticmethod
    def _check(routing: Routing, delta: Delta) -> None:
        """What the nodes will hold after ``delta`` is what was derived."""
        for row in delta.services:
            held = routing.services.get(row["name"])
            if held is None or service_row(held.service) != row:
                raise InconsistentSnapshotError(f"service {row['name']} not as derived")
        for row in delta.backends:
            held_row = routing.services[row["service"]].backends.get(row["id"])
            if held_row != Backend(row["id"], row["address"], row["weight"], row.get("up", True),
                                   row.get("max_conns", 0), row.get("state", "active")):
                raise InconsistentSnapshotError(f"backend {row['service']}/{row['id']} not as derived")
        for row in delta.removed_backends:
            if row["id"] in routing.services[row["service"]].backends:
                raise InconsistentSnapshotError(f"backend {row['service']}/{row['id']} still routed")
        for name in delta.removed_services:
            if name in routing.services:
                raise InconsistentSnapshotError(f"service {name} still routed")
