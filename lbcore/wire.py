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

import dataclasses
import functools
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lbcore.config import ConfigError, Service, parse_document

# What a node sends on the control plane's ROUTER socket (one JSON frame
# each, answered by {"ok": true, "result": ...}):
#   {"verb": "snapshot.get", "args": {}}           -> {"snapshot": SNAPSHOT (text)}
#   {"verb": "node.report", "args": {"node": ID, "version": APPLIED,
#        "staleness_ms": MS, "digest": SHA256 of the applied SNAPSHOT,
#        "counters": {SERVICE: {BACKEND: {...}}}}}  -> {}
#     counters and digest optional: the ACK sent right after an apply has
#     neither; the periodic report both. Sent from a DEALER (no empty
#     delimiter frame) a report is fire and forget: answered only if refused.
#     The control plane reads an ACK in exactly the bytes report_request
#     writes without a JSON parse (read_ack); any other bytes are a request.
# and what it receives on the PUB socket (two frames each):
#   [b"snapshot", SNAPSHOT]  a full snapshot, applied only if newer (I6)
#   [b"delta", DELTA]  what changed since its base version (format below)
#   [b"heartbeat", {"version": N}]  N newer than applied: a gap, so fetch
FETCH_REQUEST = b'{"args": {}, "verb": "snapshot.get"}'


def snapshot_digest(data: bytes) -> str:
    """What a node reports of the snapshot it applied: equal digests, equal
    routing (the bytes are canonical), so the control plane can audit it."""
    return hashlib.sha256(data).hexdigest()


# A report is one request to the control plane, which refuses requests
# past 64 KiB (orchestrator.control.MAX_REQUEST): past this, counters go
# summed per service.
MAX_REPORT_BYTES = 48 * 1024


def report_request(node: str, version: int, staleness_ms: int, counters: dict[str, Any] | None,
                   digest: str | None = None) -> bytes:
    """A report; without counters (the ACK sent right after an apply) the
    control plane keeps the ones last reported, without a digest it knows
    none for a version it had no digest of."""
    if counters is None and digest is None:  # the ACK, once per version: formatted, not encoded
        return _ACK % (_json_text(node), staleness_ms, version)
    args: dict[str, Any] = {"node": node, "version": version, "staleness_ms": staleness_ms}
    if digest is not None:
        args["digest"] = digest
    if counters is not None:
        args["counters"] = counters
    message = json.dumps({"verb": "node.report", "args": args}, sort_keys=True).encode()
    if len(message) > MAX_REPORT_BYTES and counters is not None:
        args["counters"] = {service: {"(all)": _summed(rows.values())} for service, rows in counters.items()}
        message = json.dumps({"verb": "node.report", "args": args}, sort_keys=True).encode()
    return message


# json.dumps({"verb": "node.report", "args": {...}}, sort_keys=True) of an ACK
_ACK = b'{"args": {"node": %s, "staleness_ms": %d, "version": %d}, "verb": "node.report"}'
# ... and the same bytes read back, for a node id that json.dumps leaves as it is
_NUMBER = rb"(0|[1-9][0-9]{0,18})"  # as json.dumps writes an int (no leading zero), at most 19 digits
_ACK_READ = re.compile(rb'\{"args": \{"node": "([A-Za-z0-9_.:-]{1,128})", "staleness_ms": ' + _NUMBER
                       + rb', "version": ' + _NUMBER + rb'\}, "verb": "node\.report"\}')


def read_ack(message: bytes) -> tuple[str, int, int] | None:
    """(node, version, staleness_ms) of an ACK exactly as ``report_request``
    writes it, else None (then it is a request like any other): the control
    plane takes one per node and version, and this costs a fifth of a JSON
    parse and its checks."""
    match = _ACK_READ.fullmatch(message)
    if match is None:
        return None
    return match[1].decode(), int(match[3]), int(match[2])


@functools.lru_cache(maxsize=16)
def _json_text(text: str) -> bytes:
    return json.dumps(text).encode()


def _summed(rows: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            total[key] = total.get(key, 0) + value
    return total


class WireError(ValueError):
    """A snapshot that cannot be applied; the message says what and where."""


# Versions are counted by the store in signed 64-bit (orchestrator.store);
# anything larger on the wire is not one of ours, and would not fit the
# snapshot header either.
MAX_VERSION = (1 << 62) - 1


def _load(what: str, data: bytes) -> Any:
    """JSON, or WireError: whatever the bytes (bad UTF-8, bad JSON, nesting
    deep enough to exhaust the parser)."""
    try:
        return json.loads(data.decode())  # UTF-8 only (the format's), and no encoding to detect
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise WireError(f"{what}: not JSON: {exc.__class__.__name__}: {exc}") from None


def _version(where: str, value: Any, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_VERSION:
        raise WireError(f"{where}: must be an integer {low}..{MAX_VERSION} (got {str(value)[:40]})")
    return value


def decode_heartbeat(data: bytes) -> int:
    """The version a heartbeat announces."""
    body = _load("heartbeat", data)
    if not isinstance(body, dict) or "version" not in body:
        raise WireError('heartbeat: must be {"version": N}')
    return _version("heartbeat.version", body["version"], low=-1)


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
    body = _load("snapshot", data)
    if not isinstance(body, dict) or set(body) != {"version", "services"}:
        raise WireError("snapshot: must be an object with exactly 'version' and 'services'")
    version = _version("snapshot.version", body["version"])
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


@dataclass
class Delta:
    """A delta as received: its shape checked, its rows not yet (that is
    lbcore.routing.Routing.apply, against the version it is applied to)."""

    version: int
    base: int
    services: list[Any] = field(default_factory=list)
    removed_services: list[Any] = field(default_factory=list)
    backends: list[Any] = field(default_factory=list)
    removed_backends: list[Any] = field(default_factory=list)

    def encode(self) -> bytes:
        body = {f: getattr(self, f) for f in DELTA_KEYS}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


DELTA_KEYS = frozenset(f.name for f in dataclasses.fields(Delta))


def diff_delta(base: int, old: Sequence[Service], version: int, new: Sequence[Service]) -> Delta:
    """The delta from ``old`` (version ``base``) to ``new``, in canonical order."""
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
    return Delta(version, base, services, sorted(set(before) - set(after)), backends, removed_backends)


def encode_delta(base: int, old: Sequence[Service], version: int, new: Sequence[Service]) -> bytes:
    return diff_delta(base, old, version, new).encode()


def decode_delta(data: bytes) -> Delta:
    body = _load("delta", data)
    if not isinstance(body, dict) or set(body) != DELTA_KEYS:
        raise WireError(f"delta: must be an object with exactly {', '.join(sorted(DELTA_KEYS))}")
    _version("delta.version", body["version"])
    _version("delta.base", body["base"], low=-1)
    for key in DELTA_KEYS - {"version", "base"}:
        if not isinstance(body[key], list):
            raise WireError(f"delta.{key}: must be a list")
    return Delta(**body)
