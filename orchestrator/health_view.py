"""What ``lbctl health show`` and ``lbctl explain`` answer: the stored
health, the checks' evidence and the nodes' ejections, put together for a
reader. Derived only (a view), never a source of truth."""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.checks import HealthChecks
from orchestrator.errors import NotFoundError
from orchestrator.model import Backend, Health, Membership, State


@dataclass(frozen=True)
class NodeEjections:
    """What one node's last periodic report said of its ejections."""

    ejected: dict[str, dict[str, int]]  # service -> backend -> ms left when reported
    panics: dict[str, int]
    at_s: float                         # when it was reported (monotonic)


def _ejected_by(ejections: Mapping[str, NodeEjections], service: str, backend: str,
                now_s: float) -> list[dict[str, Any]]:
    found = []
    for node, report in sorted(ejections.items()):
        left = report.ejected.get(service, {}).get(backend)
        if left is not None:
            left -= int((now_s - report.at_s) * 1000)
            if left > 0:
                found.append({"node": node, "for_ms": left})
    return found


def health_rows(state: State, checks: HealthChecks, ejections: Mapping[str, NodeEjections],
                live: list[str], service: str | None) -> list[dict[str, Any]]:
    """One row per backend (not removed) of ``service``, or of all."""
    now_s = time.monotonic()
    health = {h.backend_id: h for h in state.health}
    rows = []
    for b in state.backends:
        if b.state is Membership.REMOVED or service not in (None, b.service):
            continue
        h = health.get(b.id)
        evidence = checks.evidence(b.id, now_s, live)
        rows.append({
            "service": b.service, "id": b.id, "state": _state(h, evidence),
            "since": h.since if h else None, "revision": h.revision if h else None,
            "source": h.source if h else None,
            "counter": evidence["counter"] if evidence else None,
            "probers": [{k: v for k, v in p.items() if k != "fresh"} for p in evidence["probers"]]
            if evidence else [],
            "ejected_by": _ejected_by(ejections, b.service, b.id, now_s),
            "flaps": evidence["flaps"] if evidence else 0,
            "held_until": time.time() + evidence["held_for_s"]
            if evidence and evidence["held_for_s"] else None,
        })
    return rows


def _state(h: Health | None, evidence: dict[str, Any] | None) -> str:
    """up / down as stored; unknown for a checked backend that no
    observation and no fresh result speaks of yet."""
    if h is not None:
        return "up" if h.up else "down"
    if evidence is not None and not any(p["fresh"] for p in evidence["probers"]):
        return "unknown"
    return "up"


def explain(state: State, checks: HealthChecks, ejections: Mapping[str, NodeEjections], live: list[str],
            service: str, backend: str) -> dict[str, Any]:
    """Whether ``backend`` of ``service`` takes new connections now, and why
    (or why not): each reason starts with what it is about."""
    record: Backend | None = next(
        (b for b in state.backends if (b.service, b.id) == (service, backend)), None)
    if record is None:
        raise NotFoundError(f"no backend {service}/{backend}")
    now_s = time.monotonic()
    h = next((x for x in state.health if x.backend_id == backend), None)
    evidence = checks.evidence(backend, now_s, live)
    reasons = []
    if record.state is not Membership.ACTIVE:
        reasons.append(f"membership: {record.state.value} (takes no new connections)")
    if h is not None and not h.up:
        reasons.append(f"health: down ({_why_down(h, evidence)})")
    if record.weight == 0:
        reasons.append("weight: 0 (takes no share of new connections)")
    if evidence is not None and evidence["held_for_s"]:
        reasons.append(f"flapping: held down for {evidence['held_for_s']:.1f} s more "
                       f"({evidence['flaps']} changes of state within 60 s)")
    for ejection in _ejected_by(ejections, service, backend, now_s):
        reasons.append(f"ejected: on node {ejection['node']} for {ejection['for_ms']} ms more "
                       "(consecutive connect failures there)")
    eligible = not reasons
    if eligible:
        checked = f", {_evidence_text(evidence)}" if evidence else ""
        reasons.append(f"eligible: active, weight {record.weight}, health "
                       f"{'up (' + h.source + ')' if h else 'up (no observation)'}{checked}")
    for node, report in sorted(ejections.items()):
        if report.panics.get(service):
            reasons.append(f"panic: node {node} routes {service} to all its eligible backends "
                           f"({report.panics[service]} connections in its last report's interval)")
    return {"eligible": eligible, "reasons": reasons}


def _why_down(h: Health, evidence: dict[str, Any] | None) -> str:
    if h.source == "report":
        return f"an operator's report, revision {h.revision}"
    return f"checks, revision {h.revision}" + (f"; {_evidence_text(evidence)}" if evidence else "")


def _evidence_text(evidence: dict[str, Any]) -> str:
    probers = evidence["probers"]
    down = sum(1 for p in probers if p["fresh"] and p["result"] == "down")
    fresh = sum(1 for p in probers if p["fresh"])
    counter = evidence["counter"]
    return (f"{down} of {len(probers)} probers say down ({fresh} fresh), "
            f"counter {counter['health']} (up at {counter['rise']} or more)")
