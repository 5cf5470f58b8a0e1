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

import json
from collections.abc import Sequence
from typing import Any

from lbcore.config import ConfigError, Service, parse_document

# What a node sends on the control plane's ROUTER socket (one JSON frame
# each, answered by {"ok": true, "result": ...}):
#   {"verb": "snapshot.get", "args": {}}           -> {"snapshot": SNAPSHOT (text)}
#   {"verb": "node.report", "args": {"node": ID, "version": APPLIED,
#        "staleness_ms": MS, "counters": {SERVICE: {BACKEND: {...}}}}}  -> {}
# and what it receives on the PUB socket (two frames each):
#   [b"snapshot", SNAPSHOT]  a full snapshot, applied only if newer (I6)
#   [b"heartbeat", {"version": N}]  N newer than applied: a gap, so fetch
FETCH_REQUEST = b'{"args": {}, "verb": "snapshot.get"}'


def report_request(node: str, version: int, staleness_ms: int, counters: dict[str, Any]) -> bytes:
    args = {"node": node, "version": version, "staleness_ms": staleness_ms, "counters": counters}
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
