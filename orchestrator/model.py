"""The primary state of the control plane, as plain immutable records.

BackendMembership moves active -> draining -> drained -> removed (one
record per service + backend, I3; a drain is confirmed by the nodes, see
orchestrator/drains.py); HealthState is overwritten only by a newer
observation revision (I4); LoadBalancingPolicy versions strictly increase
(I5). RoutingState is derived, never stored (see derive.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Membership(str, Enum):
    ACTIVE = "active"
    DRAINING = "draining"   # no new connections; nodes still hold open ones
    DRAINED = "drained"     # every node confirmed none left (or its drain timed out)
    REMOVED = "removed"


# Allowed membership transitions; a drained or removed backend may be added again.
TRANSITIONS: dict[Membership, frozenset[Membership]] = {
    Membership.ACTIVE: frozenset({Membership.DRAINING, Membership.REMOVED}),
    Membership.DRAINING: frozenset({Membership.ACTIVE, Membership.DRAINED, Membership.REMOVED}),
    Membership.DRAINED: frozenset({Membership.ACTIVE, Membership.REMOVED}),
    Membership.REMOVED: frozenset({Membership.ACTIVE}),
}
DRAIN_THEN = ("keep", "remove")  # what a drain ends in: drained, or removed


@dataclass(frozen=True)
class Drain:
    """A backend's drain, kept with its record from its start: while it
    runs and, after, how it ended."""

    since: float        # wall clock, seconds
    version: int        # the config version that started it: nodes confirm from there
    timeout_ms: int
    then: str           # DRAIN_THEN
    closing: bool = False   # timed out with on_drain_timeout = close: nodes close what is left
    ended: str = ""     # "": running; "confirmed" (every node said 0 open) or "timeout"
    open_at_end: int = 0    # open connections the nodes last reported when it ended


@dataclass(frozen=True)
class Backend:
    service: str
    id: str
    address: str
    weight: int
    state: Membership
    version: int        # per record, for compare-and-swap
    max_conns: int = 0  # per node (0: no limit)
    drain: Drain | None = None  # the last drain, if any (cleared when added again)


@dataclass(frozen=True)
class Health:
    backend_id: str
    up: bool
    revision: int       # observation revision; only a newer one applies
    source: str = "report"  # who observed it: "report" (lbctl health report) or "checks" (the verdict)
    since: float = 0.0  # when it was written (wall clock, seconds)


@dataclass(frozen=True)
class Policy:
    service: str
    listen: str
    algorithm: str
    version: int        # strictly increasing per service
    health: str = "{}"  # [service.health] settings that differ from the defaults (orchestrator.policy)
    outlier: str = "{}"  # [service.outlier] likewise
    lifecycle: str = "{}"  # the [[service]] lifecycle keys likewise (drain, slow start, queue)


@dataclass(frozen=True)
class State:
    """Everything the store holds, read in one transaction."""

    version: int                     # global config version: +1 per mutation
    policies: tuple[Policy, ...]     # sorted by service
    backends: tuple[Backend, ...]    # sorted by (service, id)
    health: tuple[Health, ...]       # sorted by backend_id
    epoch: int = 0                   # the store's identity: versions compare within one


@dataclass(frozen=True)
class Change:
    """What one committed write touched: the rows to derive again."""

    service: str | None = None               # the policy of this service
    backend: tuple[str, str] | None = None   # the membership record (service, id)
    health: str | None = None                # the health of this backend id, in any service
