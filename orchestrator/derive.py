"""RoutingState = eligible(membership, health, policy) (I2): derived in
full (``eligible``, ``routing_snapshot``) and, by the single writer of the
running control plane, one change at a time (``Deriver``).

A backend is routable when its membership is active, its last health
observation says up (no observation yet counts as up: a new backend takes
traffic at once, and health checks take it out), and its weight is above 0.
"""
from __future__ import annotations

from lbcore.config import Backend, Service
from lbcore.routing import Routing
from lbcore.wire import Delta, WireError, decode_snapshot, encode_snapshot
from orchestrator import model
from orchestrator.model import Change, Membership, State
from orchestrator.store import Store

FULL_READ_AFTER = 256  # touched rows beyond which one whole read is cheaper than row reads


class InconsistentSnapshotError(Exception):
    """A derived snapshot failed its check; it is not published."""


def routable(record: model.Backend, up: bool) -> bool:
    return record.state is Membership.ACTIVE and up and record.weight > 0


def eligible(state: State) -> tuple[Service, ...]:
    up = {h.backend_id: h.up for h in state.health}
    services = []
    for policy in state.policies:
        backends = tuple(
            Backend(b.id, b.address, b.weight) for b in state.backends
            if b.service == policy.service and routable(b, up.get(b.id, True)))
        services.append(Service(policy.service, policy.listen, policy.algorithm, backends))
    return tuple(services)


def routing_snapshot(state: State) -> bytes:
    """The wire snapshot of ``state``, derived in full and checked:
    deterministic bytes that decode back to exactly what was derived (the
    model is go-control-plane's Consistent())."""
    services = eligible(state)
    data = encode_snapshot(state.version, services)
    try:
        version, decoded = decode_snapshot(data)
    except ValueError as exc:
        raise InconsistentSnapshotError(str(exc)) from None
    if version != state.version or {s.name: s for s in decoded} != {s.name: _sorted(s) for s in services}:
        raise InconsistentSnapshotError("snapshot does not decode to the routing state it was built from")
    return data


def _sorted(service: Service) -> Service:
    return Service(service.name, service.listen, service.algorithm,
                   tuple(sorted(service.backends, key=lambda b: b.id)))


class Deriver:
    """The single writer of RoutingState. Writes report what they touched;
    ``next()`` reads those rows back from the store (the truth), derives
    them, and makes the delta from the published routing. The delta is then
    applied by the nodes' own code (Routing.apply, which checks every row,
    reference and limit) and the result compared with what was derived:
    only a routing that passes both is published."""

    def __init__(self, store: Store) -> None:
        self.store = store
        state = store.read()
        self.routing = Routing.of(state.version, eligible(state))
        self._services: set[str] = set()
        self._backends: set[tuple[str, str]] = set()
        self._health: set[str] = set()
        self._everything = False

    def touch(self, change: Change) -> None:
        if change.service is not None:
            self._services.add(change.service)
        if change.backend is not None:
            self._backends.add(change.backend)
        if change.health is not None:
            self._health.add(change.health)

    def next(self) -> tuple[Routing, Delta] | None:
        """The routing of the store's current version and the delta to it,
        or None when nothing changed. InconsistentSnapshotError (nothing is
        published; the next call derives everything again) if a check fails."""
        services, backends, ids = self._services, self._backends, self._health
        everything = self._everything or len(services) + len(backends) + len(ids) > FULL_READ_AFTER
        self._services, self._backends, self._health, self._everything = set(), set(), set(), False
        if everything:
            state = self.store.read()
            services = {p.service for p in state.policies} | set(self.routing.services)
            backends = {(s.name, i) for s in self.routing.services.values() for i in s.backends}
        else:
            state = self.store.read_rows(services, backends, ids)
        if state.version == self.routing.version:
            return None
        backends = backends | {(b.service, b.id) for b in state.backends}  # incl. those found by health
        try:
            delta = self._delta(state, services, backends)
            routing = self.routing.apply(delta)
            self._check(routing, delta)
        except (WireError, InconsistentSnapshotError) as exc:
            self._everything = True
            raise InconsistentSnapshotError(f"version {state.version}: {exc}") from None
        self.routing = routing
        return routing, delta

    def _delta(self, state: State, services: set[str], backends: set[tuple[str, str]]) -> Delta:
        up = {h.backend_id: h.up for h in state.health}
        policies = {p.service: p for p in state.policies}
        records = {(b.service, b.id): b for b in state.backends}
        current = self.routing.services
        delta = Delta(state.version, self.routing.version)
        for name in sorted(services):
            policy, held = policies.get(name), current.get(name)
            if policy is None and held is not None:
                delta.removed_services.append(name)
            elif policy is not None and (held is None or (held.listen, held.algorithm)
                                         != (policy.listen, policy.algorithm)):
                delta.services.append({"name": name, "listen": policy.listen, "algorithm": policy.algorithm})
        for service, backend_id in sorted(backends):
            if service in delta.removed_services:
                continue
            record = records.get((service, backend_id))
            row = Backend(backend_id, record.address, record.weight) \
                if record is not None and routable(record, up.get(backend_id, True)) else None
            held_row = current[service].backends.get(backend_id) if service in current else None
            if row is not None and row != held_row:
                delta.backends.append({"service": service, "id": backend_id, "address": row.address,
                                       "weight": row.weight})
            elif row is None and held_row is not None:
                delta.removed_backends.append({"service": service, "id": backend_id})
        return delta

    @staticmethod
    def _check(routing: Routing, delta: Delta) -> None:
        """What the nodes will hold after ``delta`` is what was derived."""
        for row in delta.services:
            held = routing.services.get(row["name"])
            if held is None or (held.listen, held.algorithm) != (row["listen"], row["algorithm"]):
                raise InconsistentSnapshotError(f"service {row['name']} not as derived")
        for row in delta.backends:
            held_row = routing.services[row["service"]].backends.get(row["id"])
            if held_row != Backend(row["id"], row["address"], row["weight"]):
                raise InconsistentSnapshotError(f"backend {row['service']}/{row['id']} not as derived")
        for row in delta.removed_backends:
            if row["id"] in routing.services[row["service"]].backends:
                raise InconsistentSnapshotError(f"backend {row['service']}/{row['id']} still routed")
        for name in delta.removed_services:
            if name in routing.services:
                raise InconsistentSnapshotError(f"service {name} still routed")
