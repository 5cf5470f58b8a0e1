"""The distribution wire format of a routing snapshot: what the control
plane publishes and a node applies.

A snapshot is canonical JSON (sorted keys, no spaces, UTF-8):

    {"version": N, "services": [{"name", "listen", "algorithm",
      "backends": [{"id", "address", "weight"}, ...]}, ...]}

services sorted by name, backends by id, so the same routing state always
gives the same bytes and any node's snapshot can be audited by recomputing
it. ``decode_snapshot`` refuses anything else with what was wrong and where.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from lbcore.config import ConfigError, Service, parse_document

# What a node sends on the control plane's ROUTER socket (one JSON frame
# each, answered by {"ok": true, "result": ...}):
#   {"verb": "snapshot.get", "args": {}}           -> {"snapshot": SNAPSHOT (text)}
#   {"verb": "node.report", "args": {"node": ID, "version": APPLIED,
#        "staleness_ms": MS, "digest": SHA256 of the applied SNAPSHOT,
#        "counters": {SERVICE: {BACKEND: {...}}}}}  -> {}
# and what it receives on the PUB socket (two frames each):
#   [b"snapshot", SNAPSHOT]  a full snapshot, applied only if newer (I6)
#   [b"heartbeat", {"version": N}]  N newer than applied: a gap, so fetch
FETCH_REQUEST = b'{"args": {}, "verb": "snapshot.get"}'


def snapshot_digest(data: bytes) -> str:
    """What a node reports of the snapshot it applied: equal digests, equal
    routing (the bytes are canonical), so the control plane can audit it."""
    return hashlib.sha256(data).hexdigest()


def report_request(node: str, version: int, staleness_ms: int, counters: dict[str, Any],
                   digest: str = "") -> bytes:
    args = {"node": node, "version": version, "staleness_ms": staleness_ms, "counters": counters,
            "digest": digest}
    return json.dumps({"verb": "node.report", "args": args}, sort_keys=True).encode()


class WireError(ValueError):
    """A snapshot that cannot be applied; the message says what and where."""


def encode_snapshot(version: int, services: Sequence[Service]) -> bytes:
    body = {
        "version": version,
        "services": [
            {"name": s.name, "listen": s.listen, "algorithm": s.algorithm,
             "backends": [{"id": b.id, "address": b.address, "weight": b.weight}
                          for b in sorted(s.backends, key=lambda b: b.id)]}
            for s in sorted(services, key=lambda s: s.name)
        ],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def decode_snapshot(data: bytes) -> tuple[int, tuple[Service, ...]]:
    """(version, services), validated by the same rules as a config file."""
    try:
        body: Any = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"snapshot: not JSON: {exc}") from None
    if not isinstance(body, dict) or set(body) != {"version", "services"}:
        raise WireError("snapshot: must be an object with exactly 'version' and 'services'")
    version = body["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise WireError(f"snapshot.version: must be an integer >= 0 (got {version!r})")
    if not isinstance(body["services"], list):
        raise WireError("snapshot.services: must be a list")
    # The config schema already states every rule a service must meet.
    document = {"node": {"id": "snapshot"}, "service": [
        {**{k: v for k, v in s.items() if k != "backends"}, "backend": s.get("backends", [])}
        if isinstance(s, dict) else s for s in body["services"]]}
    try:
        config = parse_document(document, "snapshot")
    except ConfigError as exc:
        raise WireError(f"snapshot: {exc.key}: {exc.reason}") from None
    return version, config.services


# A delta carries only what changed since its base version:
#
#     {"version": N, "base": B,
#      "services": [{"name", "listen", "algorithm"}, ...],   # added or changed
#      "removed_services": [NAME, ...],
#      "backends": [{"service", "id", "address", "weight"}, ...],  # added or changed
#      "removed_backends": [{"service", "id"}, ...]}
#
# A node applies it only when B is the version it holds; otherwise it fetches
# the full snapshot (I6). Canonical JSON, like the full snapshot.


def encode_delta(base: int, old: Sequence[Service], version: int, new: Sequence[Service]) -> bytes:
    before = {s.name: s for s in old}
    after = {s.name: s for s in new}
    services, backends, removed_backends = [], [], []
    for name, service in sorted(after.items()):
        previous = before.get(name)
        if previous is None or (previous.listen, previous.algorithm) != (service.listen, service.algorithm):
            services.append({"name": name, "listen": service.listen, "algorithm": service.algorithm})
        old_rows = {b.id: b for b in previous.backends} if previous else {}
        new_rows = {b.id: b for b in service.backends}
        backends += [{"service": name, "id": b.id, "address": b.address, "weight": b.weight}
                     for i, b in sorted(new_rows.items()) if old_rows.get(i) != b]
        removed_backends += [{"service": name, "id": i} for i in sorted(old_rows) if i not in new_rows]
    body = {"version": version, "base": base, "services": services,
            "removed_services": sorted(set(before) - set(after)),
            "backends": backends, "removed_backends": removed_backends}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def apply_delta(data: bytes, base_services: Sequence[Service]) -> tuple[int, int, tuple[Service, ...]]:
    """(version, base, services) after the delta, validated whole."""
    try:
        body: Any = json.loads(data)
        keys = {"version", "base", "services", "removed_services", "backends", "removed_backends"}
        if not isinstance(body, dict) or set(body) != keys:
            raise WireError(f"delta: must be an object with exactly {', '.join(sorted(keys))}")
        services: dict[str, dict[str, Any]] = {
            s.name: {"name": s.name, "listen": s.listen, "algorithm": s.algorithm,
                     "backends": {b.id: {"id": b.id, "address": b.address, "weight": b.weight}
                                  for b in s.backends}}
            for s in base_services}
        for name in body["removed_services"]:
            services.pop(name, None)
        for s in body["services"]:
            row = services.setdefault(s["name"], {"backends": {}})
            row.update({"name": s["name"], "listen": s["listen"], "algorithm": s["algorithm"]})
        for b in body["removed_backends"]:
            services[b["service"]]["backends"].pop(b["id"], None)
        for b in body["backends"]:
            services[b["service"]]["backends"][b["id"]] = {"id": b["id"], "address": b["address"],
                                                           "weight": b["weight"]}
        full = {"version": body["version"], "services": [
            {**{k: v for k, v in s.items() if k != "backends"}, "backends": list(s["backends"].values())}
            for s in services.values()]}
        base = body["base"]
    except WireError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WireError(f"delta: malformed ({exc!r})") from None
    if isinstance(base, bool) or not isinstance(base, int):
        raise WireError("delta.base: must be an integer")
    version, result = decode_snapshot(json.dumps(full).encode())
    return version, base, result
