"""RoutingState = eligible(membership, health, policy) (I2), and the checks
a snapshot passes before it is published.

A backend is routable when its membership is active, its last health
observation says up (no observation yet counts as up: a new backend takes
traffic at once, and health checks take it out), and its weight is above 0.
"""
from __future__ import annotations

from lbcore.config import Backend, Service
from lbcore.wire import decode_snapshot, encode_snapshot
from orchestrator.model import Membership, State


class InconsistentSnapshotError(Exception):
    """A derived snapshot failed its check; it is not published."""


def eligible(state: State) -> tuple[Service, ...]:
    up = {h.backend_id: h.up for h in state.health}
    services = []
    for policy in state.policies:
        backends = tuple(
            Backend(b.id, b.address, b.weight) for b in state.backends
            if b.service == policy.service and b.state is Membership.ACTIVE
            and up.get(b.id, True) and b.weight > 0)
        services.append(Service(policy.service, policy.listen, policy.algorithm, backends))
    return tuple(services)


def routing_snapshot(state: State) -> bytes:
    """The wire snapshot of ``state``, checked: deterministic bytes that
    decode back to exactly what was derived (the model is go-control-plane's
    Consistent())."""
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
