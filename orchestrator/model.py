"""The primary state of the control plane, as plain immutable records.

BackendMembership moves active -> draining -> removed (one record per
service + backend, I3); HealthState is overwritten only by a newer
observation revision (I4); LoadBalancingPolicy versions strictly increase
(I5). RoutingState is derived, never stored (see derive.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Membership(str, Enum):
    ACTIVE = "active"
    DRAINING = "draining"
    REMOVED = "removed"


# Allowed membership transitions; a removed backend may be added again.
TRANSITIONS: dict[Membership, frozenset[Membership]] = {
    Membership.ACTIVE: frozenset({Membership.DRAINING, Membership.REMOVED}),
    Membership.DRAINING: frozenset({Membership.ACTIVE, Membership.REMOVED}),
    Membership.REMOVED: frozenset({Membership.ACTIVE}),
}


@dataclass(frozen=True)
class Backend:
    service: str
    id: str
    address: str
    weight: int
    state: Membership
    version: int        # per record, for compare-and-swap


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
