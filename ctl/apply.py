"""``lbctl apply -f FILE``: make the control plane's services and backends
those of FILE. Shows the diff, then applies it change by change, each a
compare-and-swap on the version read when the diff was made, so a change
made by someone else meanwhile is refused (exit 3), not overwritten; the
changes before it stay applied, and the output says which (run it again to
finish: the diff is made afresh).

Backends the file no longer lists are removed (drained first, then
removed); an address cannot change in place (remove the backend, add it
under a new id). A service's [service.health] and [service.outlier] and
its lifecycle keys (drain, slow start, queue) are made the file's too (a
table or key the file leaves out: its defaults), and so is each backend's
weight and max_conns.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.settings import Service


@dataclass(frozen=True)
class Change:
    text: str                  # the diff line shown
    verb: str
    args: dict[str, Any]


def _changed(before: dict[str, Any], after: dict[str, Any]) -> str:
    return ", ".join(f"{k} {before[k]} -> {v}" if k in before else f"{k} {v}"
                     for k, v in after.items() if before.get(k) != v)


def plan_changes(services: tuple[Service, ...], policies: dict[str, dict[str, Any]],
                 backends: list[dict[str, Any]]) -> list[Change]:
    """The changes that turn the current state into ``services``."""
    changes: list[Change] = []
    current = {(b["service"], b["id"]): b for b in backends}
    for service in services:
        policy = policies.get(service.name)
        health, outlier = asdict(service.health), asdict(service.outlier)
        lifecycle = asdict(service.lifecycle)
        if policy is None or (policy["algorithm"], policy["listen"], policy["health"], policy["outlier"],
                              policy["lifecycle"]) \
                != (service.algorithm, service.listen, health, outlier, lifecycle):
            version = policy["version"] if policy else 0
            sign = "+" if policy is None else "~"
            settings = ""
            for table, wanted in (("health", health), ("outlier", outlier), ("lifecycle", lifecycle)):
                # a new service starts from the defaults: only what differs is shown
                before = policy[table] if policy else asdict(type(getattr(service, table))())
                if before != wanted:
                    settings += f"; {table} {_changed(before, wanted)}"
            changes.append(Change(f"{sign} service {service.name} listen {service.listen} "
                                  f"algorithm {service.algorithm}{settings}", "policy.set",
                                  {"service": service.name, "algorithm": service.algorithm,
                                   "listen": service.listen, "health": health, "outlier": outlier,
                                   "lifecycle": lifecycle, "expected_version": version}))
        for backend in service.backends:
            record = current.get((service.name, backend.id))
            where = f"{service.name}/{backend.id}"
            # a backend the file lists is active: one drained, draining or removed is added again
            if record is None or record["state"] in ("removed", "drained", "draining"):
                limit = f" max_conns {backend.max_conns}" if backend.max_conns else ""
                changes.append(Change(f"+ backend {where} {backend.address} weight {backend.weight}{limit}",
                                      "backend.add",
                                      {"service": service.name, "id": backend.id, "address": backend.address,
                                       "weight": backend.weight, "max_conns": backend.max_conns,
                                       "expected_version": record["version"] if record else 0}))
            elif record["address"] != backend.address:
                raise ValueError(f"backend {where}: address {record['address']} -> {backend.address} "
                                 "cannot change in place; remove it and add it under a new id")
            elif (record["weight"], record["max_conns"]) != (backend.weight, backend.max_conns):
                wanted = {"weight": backend.weight, "max_conns": backend.max_conns}
                changes.append(Change(f"~ backend {where} {_changed(record, wanted)}", "backend.set",
                                      {"service": service.name, "id": backend.id, **wanted,
                                       "expected_version": record["version"]}))
    listed = {(s.name, b.id) for s in services for b in s.backends}
    for key, record in sorted(current.items()):
        if key not in listed and record["state"] == "active":
            changes.append(Change(f"- backend {key[0]}/{key[1]} (drained)", "backend.remove",
                                  {"service": key[0], "id": key[1], "expected_version": record["version"]}))
    return changes


def apply_file(services: tuple[Service, ...], call: Callable[[str, dict[str, Any]], Any], dry_run: bool,
               out: Callable[[str], None]) -> int:
    """Show and apply the diff; returns how many changes were applied."""
    backends = call("backend.list", {})
    policies = {}
    for name in {s.name for s in services} | {b["service"] for b in backends}:
        try:
            policies[name] = call("policy.get", {"service": name})
        except Exception as exc:  # a service not yet in the store
            if "no service" not in str(exc):
                raise
    changes = plan_changes(services, policies, backends)
    if not changes:
        out("no changes")
        return 0
    for change in changes:
        out(change.text)
    if dry_run:
        return 0
    version = None
    for done, change in enumerate(changes):
        try:
            version = call(change.verb, change.args)["version"]
        except Exception:
            # each change is its own CAS: say exactly what is in and what is not
            out(f"stopped at change {done + 1} of {len(changes)} ({change.text}); "
                + (f"the {done} before it are applied (version {version})" if done else "nothing applied"))
            raise
    out(f"ok: {len(changes)} changes, version {version}")
    return len(changes)
