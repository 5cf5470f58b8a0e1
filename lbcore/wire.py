"""Every message between a node, the control plane and lbctl: formats,
frame kinds and size limits, in this one module. The data plane owns it
because it consumes the snapshots; the control plane and lbctl import it
(lbctl through orchestrator.control, the admin API).

Canonical JSON (``canonical_json``: sorted keys, no spaces, UTF-8) is the
form of everything that is compared or audited: snapshots and deltas.

On the control plane's ROUTER socket, one frame each way, UTF-8 JSON:

    request  {"args": {...}, "verb": VERB}          (encode_request, decode_request)
             at most MAX_REQUEST bytes; the socket drops anything past
             MAX_RECEIVED with its connection, unread
    reply    {"ok": true, "result": RESULT}        (ok_reply, encode_reply, decode_reply)
             {"ok": false, "error": {"code": CODE, "message": TEXT[, "expected": N, "current": N]}}

The verbs and their arguments are the admin API's (orchestrator.control);
two of them are a node's:

    snapshot.get  {}  -> {"snapshot": SNAPSHOT (text)}           FETCH_REQUEST
    node.report   {"node": ID, "epoch": E, "version": APPLIED, "staleness_ms": MS,
                   "digest": SHA256 of the applied SNAPSHOT, "max_staleness_ms": ITS BOUND, "counters":
                   {SERVICE: {BACKEND: {"active", "total", "failed"}}},
                   "services": {SERVICE: {"waiting", "queued", "queue_timeouts", "rejected"}}}  -> {}
      counters, digest and services optional: the ACK sent right after an
      apply has none (its exact bytes: ``report_request``, read back by
      ``read_ack`` without a JSON parse); the periodic report has the
      digest, and the counters once every worker of the node has taken up
      the version it reports (they are what confirms a drain of that
      version: orchestrator/drains.py). Summed per service, counters still
      carry the own rows of the backends in drain (MAX_DRAINING_REPORTED).
      Sent from a DEALER (no empty delimiter frame) a report is fire and
      forget: answered only if refused. At most MAX_REPORT_BYTES: past it
      the counters go summed per service.

On the control plane's PUB socket, two frames each:

    [KIND_SNAPSHOT, SNAPSHOT]     a full snapshot, applied only if newer (I6)
    [KIND_DELTA, DELTA]           what changed since its base version
    [KIND_HEARTBEAT, {"epoch": E, "nodes": [ID, ...], "version": N}]
                                  N newer than applied, or another epoch:
                                  a gap, so fetch; nodes: those the control
                                  plane hears from (probers are chosen among them)

A snapshot (canonical JSON):

    {"epoch": E, "services": [{"algorithm", "backends": [{"address", "id",
     ["max_conns": N,] ["state": "draining" | "closing",] ["up": false,] "weight"}, ...],
     [LIFECYCLE KEY: VALUE, ...] ["health": {...},] "listen", "name",
     ["outlier": {...}]}, ...], "version": N}

"up": false marks a backend held out by its health verdict: nodes route
nothing to it and keep probing it. "state" marks a backend being drained:
nodes route nothing new to it and report its open connections until it is
drained; "closing": its drain timed out, nodes close what is left.
"max_conns" only when set. "health" and "outlier" are the service's
[service.health] and [service.outlier] settings that differ from their
defaults (absent when none do), and the lifecycle keys (drain_timeout_ms,
slow_start_ms, max_queue, ...: lbcore.config.LIFECYCLE_SETTINGS) likewise,
so the same policy is the same bytes. (Keys are in canonical, sorted order
on the wire: the lifecycle keys fall among the others.)

E is the epoch of the store it was derived from: a store's identity, made
with it (and made anew when the store is found behind its nodes, say a
restored copy). Versions compare only within an epoch (I6); a node re-bases
on a full snapshot of another epoch.

services sorted by name, backends by id, so the same routing state always
gives the same bytes and any node's snapshot can be audited by recomputing
it (lbcore.routing assembles these bytes; ``decode_snapshot`` refuses
anything else with what was wrong and where).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lbcore.config import (
    MAX_SERVICES,
    Backend,
    ConfigError,
    Service,
    changed_settings,
    check_name,
    parse_document,
)

# ---------------------------------------------------------------- limits

MAX_REQUEST = 64 * 1024          # a request past this is refused with a reply that says so
MAX_RECEIVED = 16 * MAX_REQUEST  # past this the socket drops the message and its connection
MAX_REPORT_BYTES = 48 * 1024     # a node's report stays under MAX_REQUEST: counters summed past this
MAX_REPORT_BACKENDS = 500        # past this many backends a node sums its counters per service at once
MAX_RESULTS_PER_MESSAGE = 1000   # probe results in one health.results message
MAX_HEARTBEAT_NODES = 1024       # nodes a heartbeat names (the control plane keeps at most this many)
REPORT_FIELDS = ("active", "total", "failed")  # the counters a report carries per backend
QUEUE_FIELDS = ("waiting", "queued", "queue_timeouts", "rejected")  # and per service: its queue
MAX_DRAINING_REPORTED = 100      # summed counters still carry the own rows of this many draining backends
REPORT_INTERVAL_S = 0.5          # a node's periodic report
SILENT_S = 3 * REPORT_INTERVAL_S  # a node not heard from for this long is silent: not live, not done
SUMMED = "(all)"                 # the backend of a service's counters summed
_DIGEST = re.compile(r"[0-9a-f]{64}")
MAX_COUNTER = (1 << 63) - 1
# Versions are counted by the store in signed 64-bit (orchestrator.store);
# anything larger on the wire is not one of ours, and would not fit the
# image header either.
MAX_VERSION = (1 << 62) - 1

# ---------------------------------------------------------------- PUB frame kinds

KIND_SNAPSHOT = b"snapshot"
KIND_DELTA = b"delta"
KIND_HEARTBEAT = b"heartbeat"


class WireError(ValueError):
    """A message that is not of this format; the message says what and where."""


def canonical_json(value: Any) -> bytes:
    """The one encoding of what is compared byte for byte."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _load(what: str, data: bytes) -> Any:
    """JSON, or WireError: whatever the bytes (bad UTF-8, bad JSON, nesting
    deep enough to exhaust the parser)."""
    try:
        return json.loads(data.decode())  # UTF-8 only (the format's), and no encoding to detect
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise WireError(f"{what}: not JSON: {exc.__class__.__name__}: {exc}") from None


# ---------------------------------------------------------------- requests and replies

def encode_request(verb: str, args: dict[str, Any]) -> bytes:
    return json.dumps({"verb": verb, "args": args}, sort_keys=True).encode()


def decode_request(raw: bytes) -> tuple[Any, Any]:
    """(verb, args) of a request's frame, its envelope checked; WireError
    if not. The verb and its arguments (an object) are the admin API's to
    check (orchestrator.control.parse_request), the verb first."""
    if len(raw) > MAX_REQUEST:
        raise WireError(f"request of {len(raw)} bytes exceeds {MAX_REQUEST}")
    try:
        request = json.loads(raw.decode())  # UTF-8, the format's: no encoding to detect
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise WireError(f"request is not JSON: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(request, dict) or set(request) - {"verb", "args"} or "verb" not in request:
        raise WireError('request must be {"verb": ..., "args": {...}}')
    return request["verb"], request.get("args", {})


def ok_reply(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}


def error_reply(code: str, message: str, **extra: int) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message, **extra}}


def encode_reply(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, sort_keys=True).encode()


def decode_reply(raw: bytes) -> dict[str, Any]:
    """A reply as ``ok_reply`` or ``error_reply`` made it; WireError if the
    bytes are not one (say, something else answering on that port)."""
    reply = _load("reply", raw)
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise WireError('reply must be {"ok": true|false, ...}')
    if reply["ok"]:
        if "result" not in reply:
            raise WireError("reply: ok without a result")
    else:
        error = reply.get("error")
        if not isinstance(error, dict) or not isinstance(error.get("code"), str) \
                or not isinstance(error.get("message"), str):
            raise WireError("reply: an error must carry a code and a message")
    return reply


FETCH_REQUEST = encode_request("snapshot.get", {})


def fetch_result(snapshot: bytes) -> dict[str, str]:
    """The result of ``snapshot.get``: the current snapshot, as text."""
    return {"snapshot": snapshot.decode()}


def snapshot_of_fetch_result(result: Any) -> bytes:
    """The snapshot a ``snapshot.get`` result carries; WireError if none."""
    if not isinstance(result, dict) or not isinstance(result.get("snapshot"), str):
        raise WireError('snapshot.get result must be {"snapshot": TEXT}')
    return result["snapshot"].encode()


# ---------------------------------------------------------------- the embedded control plane's endpoints
# What ``lborch --check --endpoints`` prints (one line) for the node that
# embeds it: the endpoints the control plane read from the file.

def encode_endpoints(control: str, publish: str) -> str:
    return json.dumps({"control": control, "publish": publish})


def decode_endpoints(text: str) -> tuple[str, str]:
    """(control, publish); WireError if the line is not one."""
    body = _load("endpoints", text.encode())
    if not isinstance(body, dict) or set(body) != {"control", "publish"} \
            or not all(isinstance(v, str) for v in body.values()):
        raise WireError('endpoints: must be {"control": ENDPOINT, "publish": ENDPOINT}')
    return body["control"], body["publish"]


# ---------------------------------------------------------------- node reports

def snapshot_digest(data: bytes) -> str:
    """What a node reports of the snapshot it applied: equal digests, equal
    routing (the bytes are canonical), so the control plane can audit it."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Report:
    """A ``node.report`` as the control plane takes it."""

    node: str
    epoch: int
    version: int
    staleness_ms: int
    counters: dict[str, Any] | None  # None: keep the ones last reported (an ACK)
    digest: str | None               # None: none for this version yet (an ACK)
    max_staleness_ms: int | None = None  # the node's bound (I7), with the periodic report
    health: NodeHealth | None = None     # with the periodic report of a node that probes or ejects
    services: dict[str, dict[str, int]] | None = None  # per service: its queue (QUEUE_FIELDS)


@dataclass(frozen=True)
class NodeHealth:
    """What a periodic report says of a node's health checking: the digest
    of its current probe results (results_digest), the backends it ejects
    now (service -> backend -> ms left) and its panics (service -> count)."""

    digest: str
    ejected: dict[str, dict[str, int]]
    panics: dict[str, int]

    def as_args(self) -> dict[str, Any]:
        return {"digest": self.digest, "ejected": self.ejected, "panics": self.panics}


_RESULTS_DIGEST = re.compile(r"[0-9a-f]{32}")


def decode_node_health(value: Any) -> NodeHealth:
    if not isinstance(value, dict) or set(value) != {"digest", "ejected", "panics"}:
        raise WireError('node.report: health must be {"digest", "ejected", "panics"}')
    digest, ejected, panics = value["digest"], value["ejected"], value["panics"]
    if not isinstance(digest, str) or not _RESULTS_DIGEST.fullmatch(digest):
        raise WireError("node.report: health.digest must be 32 hex digits")
    if not isinstance(ejected, dict) or len(ejected) > MAX_SERVICES or not isinstance(panics, dict) \
            or len(panics) > MAX_SERVICES:
        raise WireError(f"node.report: health.ejected and health.panics: objects of at most {MAX_SERVICES} "
                        "services")
    rows = 0
    for service, backends in ejected.items():
        if check_name(service) or not isinstance(backends, dict):
            raise WireError(f"node.report: health.ejected: {str(service)[:64]!r}: "
                            "must be a service of backends")
        rows += len(backends)
        if rows > MAX_REPORT_BACKENDS or any(
                check_name(b) or isinstance(ms, bool) or not isinstance(ms, int) or not 0 <= ms <= MAX_VERSION
                for b, ms in backends.items()):
            raise WireError(f"node.report: health.ejected.{service}: at most {MAX_REPORT_BACKENDS} "
                            "backend ids, each with its ms left")
    for service, count in panics.items():
        if check_name(service) or isinstance(count, bool) or not isinstance(count, int) \
                or not 0 <= count <= MAX_COUNTER:
            raise WireError(f"node.report: health.panics: {str(service)[:64]!r}: "
                            "must be a service and a count")
    return NodeHealth(digest, ejected, panics)


def decode_report(args: dict[str, Any]) -> Report:
    """The arguments of a ``node.report`` (present, as the admin API's verb
    table requires), checked like any request: a report is what a node
    writes (report_request), or it is refused; WireError saying what is wrong."""
    node = args["node"]
    problem = check_name(node) if isinstance(node, str) else "must be a string"
    if problem:
        raise WireError(f"node.report: node: {problem}")
    epoch = _version("node.report: epoch", args["epoch"], low=-1)
    version = _version("node.report: version", args["version"], low=-1)
    staleness = _version("node.report: staleness_ms", args["staleness_ms"])
    digest = args.get("digest")
    if digest is not None and not (isinstance(digest, str) and (digest == "" or _DIGEST.fullmatch(digest))):
        raise WireError("node.report: digest must be a SHA-256 in hex, or empty")
    counters = args.get("counters")
    if counters is not None:
        _check_counters(counters)
    bound = args.get("max_staleness_ms")
    if bound is not None:
        bound = _version("node.report: max_staleness_ms", bound, low=1)
    health = decode_node_health(args["health"]) if args.get("health") is not None else None
    services = args.get("services")
    if services is not None:
        _check_queues(services)
    return Report(node, epoch, version, staleness, counters, digest, bound, health, services)


def _check_queues(services: Any) -> None:
    """{SERVICE: {"waiting", "queued", "queue_timeouts", "rejected"}}."""
    if not isinstance(services, dict) or len(services) > MAX_SERVICES:
        raise WireError(f"node.report: services must be an object of at most {MAX_SERVICES} services")
    for service, row in services.items():
        if check_name(service) or not isinstance(row, dict) or set(row) != set(QUEUE_FIELDS) or any(
                isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COUNTER
                for v in row.values()):
            raise WireError(f"node.report: services.{str(service)[:64]}: must be "
                            f"{{{', '.join(QUEUE_FIELDS)}}}, integers >= 0")


def _check_counters(counters: Any) -> None:
    """{SERVICE: {BACKEND (or "(all)"): {"active", "total", "failed"}}},
    at most MAX_REPORT_BACKENDS rows in all."""
    if not isinstance(counters, dict):
        raise WireError("node.report: counters must be an object")
    if len(counters) > MAX_SERVICES:
        raise WireError(f"node.report: counters: more than {MAX_SERVICES} services")
    rows = 0
    for service, backends in counters.items():
        if check_name(service):
            raise WireError(f"node.report: counters: {str(service)[:64]!r} is not a service name")
        if not isinstance(backends, dict):
            raise WireError(f"node.report: counters.{service}: must be an object of backends")
        rows += len(backends)
        if rows > MAX_REPORT_BACKENDS:
            raise WireError(f"node.report: counters: more than {MAX_REPORT_BACKENDS} rows")
        for backend, row in backends.items():
            if backend != SUMMED and check_name(backend):
                raise WireError(f"node.report: counters.{service}: {str(backend)[:64]!r} is not a backend id")
            if not isinstance(row, dict) or set(row) != set(REPORT_FIELDS) or any(
                    isinstance(v, bool) or not isinstance(v, int) or not -MAX_COUNTER <= v <= MAX_COUNTER
                    for v in row.values()):
                raise WireError(f"node.report: counters.{service}.{backend}: must be "
                                f"{{{', '.join(REPORT_FIELDS)}}}, integers")


def report_request(node: str, epoch: int, version: int, staleness_ms: int, counters: dict[str, Any] | None,
                   digest: str | None = None, max_staleness_ms: int | None = None,
                   health: NodeHealth | None = None,
                   services: dict[str, dict[str, int]] | None = None) -> bytes:
    """A report; without counters (the ACK sent right after an apply) the
    control plane keeps the ones last reported, without a digest it knows
    none for a version it had no digest of."""
    if counters is None and digest is None:  # the ACK, once per version: formatted, not encoded
        return _ACK % (epoch, _json_text(node), staleness_ms, version)
    args: dict[str, Any] = {"node": node, "epoch": epoch, "version": version, "staleness_ms": staleness_ms}
    if digest is not None:
        args["digest"] = digest
    if counters is not None:
        args["counters"] = counters
    if max_staleness_ms is not None:
        args["max_staleness_ms"] = max_staleness_ms
    if health is not None:
        args["health"] = health.as_args()
    if services:
        args["services"] = services
    message = encode_request("node.report", args)
    if len(message) > MAX_REPORT_BYTES and counters is not None:
        # a service summed already keeps the rows beside its sum (those of
        # its backends in drain, at most MAX_DRAINING_REPORTED); another
        # loses them, and its drains wait on the sum (an upper bound)
        args["counters"] = {service: rows if SUMMED in rows else
                            {SUMMED: summed_counters(columns_of(rows.values()))}
                            for service, rows in counters.items()}
        message = encode_request("node.report", args)
    return message


# encode_request("node.report", {...}) of an ACK
_ACK = b'{"args": {"epoch": %d, "node": %s, "staleness_ms": %d, "version": %d}, "verb": "node.report"}'
# ... and the same bytes read back, for a node id that json.dumps leaves as it is
_NUMBER = rb"(0|[1-9][0-9]{0,18})"  # as json.dumps writes an int (no leading zero), at most 19 digits
_EPOCH = rb"(-1|0|[1-9][0-9]{0,18})"  # -1: none yet (a node that has applied nothing)
_ACK_READ = re.compile(rb'\{"args": \{"epoch": ' + _EPOCH + rb', "node": "([A-Za-z0-9_.:-]{1,128})", '
                       rb'"staleness_ms": ' + _NUMBER + rb', "version": ' + _NUMBER
                       + rb'\}, "verb": "node\.report"\}')


def read_ack(message: bytes) -> tuple[str, int, int, int] | None:
    """(node, epoch, version, staleness_ms) of an ACK exactly as ``report_request``
    writes it, else None (then it is a request like any other): the control
    plane takes one per node and version, and this costs a fifth of a JSON
    parse and its checks."""
    match = _ACK_READ.fullmatch(message)
    if match is None:
        return None
    node, epoch, version, staleness = match[2].decode(), int(match[1]), int(match[4]), int(match[3])
    if check_name(node) or max(epoch, version, staleness) > MAX_VERSION:
        return None  # the regular path refuses it, and says why
    return node, epoch, version, staleness


@functools.lru_cache(maxsize=16)
def _json_text(text: str) -> bytes:
    return json.dumps(text).encode()


def summed_counters(columns: Mapping[str, Iterable[int]]) -> dict[str, int]:
    """The counters of several backends as one row, as a report carries it
    for backend "(all)": each column summed."""
    return {key: sum(values) for key, values in columns.items()}


def columns_of(rows: Iterable[Mapping[str, int]]) -> dict[str, list[int]]:
    """Counter rows as columns (for summed_counters)."""
    rows = list(rows)
    return {key: [row.get(key, 0) for row in rows] for key in sorted({k for row in rows for k in row})}


def _version(where: str, value: Any, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_VERSION:
        raise WireError(f"{where}: must be an integer {low}..{MAX_VERSION} (got {str(value)[:40]})")
    return value


# ---------------------------------------------------------------- snapshots, deltas, heartbeats (PUB)

def health_results_request(node: str, results: Mapping[str, bool | None], replace: bool) -> bytes:
    """A node's probe results that changed ({backend: true | false | null},
    null: no longer probed by it), or with ``replace`` the first part of
    its full set. The caller keeps each under MAX_RESULTS_PER_MESSAGE."""
    args: dict[str, Any] = {"node": node, "results": dict(results)}
    if replace:
        args["replace"] = True
    return encode_request("health.results", args)


def encode_heartbeat(epoch: int, version: int, nodes: Sequence[str] = ()) -> bytes:
    """``nodes``: those the control plane hears from, sorted: the nodes
    probers are chosen among (lbcore.probing.probers_for)."""
    return json.dumps({"epoch": epoch, "nodes": list(nodes), "version": version}).encode()


def decode_heartbeat(data: bytes) -> tuple[int, int, tuple[str, ...]]:
    """(epoch, version, nodes) a heartbeat announces."""
    body = _load("heartbeat", data)
    if not isinstance(body, dict) or set(body) - {"nodes"} != {"epoch", "version"}:
        raise WireError('heartbeat: must be {"epoch": E, "nodes": [ID, ...], "version": N}')
    nodes = body.get("nodes", [])
    if not isinstance(nodes, list) or len(nodes) > MAX_HEARTBEAT_NODES or any(
            not isinstance(n, str) or check_name(n) for n in nodes):
        raise WireError(f"heartbeat.nodes: must be a list of at most {MAX_HEARTBEAT_NODES} node ids")
    return (_version("heartbeat.epoch", body["epoch"]),
            _version("heartbeat.version", body["version"], low=-1), tuple(nodes))


def decode_snapshot(data: bytes) -> tuple[int, tuple[Service, ...], int]:
    """(version, services, epoch), validated by the same rules as a config file."""
    body = _load("snapshot", data)
    if not isinstance(body, dict) or set(body) != {"epoch", "version", "services"}:
        raise WireError("snapshot: must be an object with exactly 'epoch', 'version' and 'services'")
    version = _version("snapshot.version", body["version"])
    epoch = _version("snapshot.epoch", body["epoch"])
    if not isinstance(body["services"], list):
        raise WireError("snapshot.services: must be a list")
    # The config schema already states every rule a service must meet.
    document = {"node": {"id": "snapshot"}, "service": [
        {**{k: v for k, v in s.items() if k != "backends"}, "backend": s.get("backends", [])}
        if isinstance(s, dict) else s for s in body["services"]]}
    try:
        config = parse_document(document, "snapshot", snapshot=True)
    except ConfigError as exc:
        raise WireError(f"snapshot: {exc.key}: {exc.reason}") from None
    return version, config.services, epoch


# A delta carries only what changed since its base version:
#
#     {"epoch": E, "version": N, "base": B,
#      "services": [{"name", "listen", "algorithm"[, "health", "outlier", LIFECYCLE KEYS]}, ...],
#                                                               # added or changed
#      "removed_services": [NAME, ...],
#      "backends": [{"service", "id", "address", "weight"[, "up", "max_conns", "state"]}, ...],
#                                                               # added or changed
#      "removed_backends": [{"service", "id"}, ...]}
#
# A node applies it only when it holds version B of epoch E; otherwise it
# fetches the full snapshot (I6). Canonical JSON, like the full snapshot.


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
    epoch: int = 0

    def encode(self) -> bytes:
        return canonical_json({f: getattr(self, f) for f in DELTA_KEYS})


DELTA_KEYS = frozenset(f.name for f in dataclasses.fields(Delta))


def service_row(service: Service) -> dict[str, Any]:
    """A delta's row of an added or changed service: "health" and "outlier"
    only when they differ from the defaults, and the lifecycle keys that
    do (as in a snapshot)."""
    row: dict[str, Any] = {"name": service.name, "listen": service.listen, "algorithm": service.algorithm,
                           **changed_settings(service.lifecycle)}
    for key, value in (("health", service.health), ("outlier", service.outlier)):
        changed = changed_settings(value)
        if changed:
            row[key] = changed
    return row


def backend_row(service: str, b: Backend) -> dict[str, Any]:
    """A delta's row of an added or changed backend: "up" only when false,
    "max_conns" only when set, "state" only when not active."""
    row: dict[str, Any] = {"service": service, "id": b.id, "address": b.address, "weight": b.weight}
    if not b.up:
        row["up"] = False
    if b.max_conns:
        row["max_conns"] = b.max_conns
    if b.state != "active":
        row["state"] = b.state
    return row


def diff_delta(base: int, old: Sequence[Service], version: int, new: Sequence[Service],
               epoch: int = 0) -> Delta:
    """The delta from ``old`` (version ``base``) to ``new``, in canonical order."""
    before = {s.name: s for s in old}
    after = {s.name: s for s in new}
    services, backends, removed_backends = [], [], []
    for name, service in sorted(after.items()):
        previous = before.get(name)
        if previous is None or (previous.listen, previous.algorithm, previous.health, previous.outlier,
                                previous.lifecycle) \
                != (service.listen, service.algorithm, service.health, service.outlier, service.lifecycle):
            services.append(service_row(service))
        old_rows = {b.id: b for b in previous.backends} if previous else {}
        new_rows = {b.id: b for b in service.backends}
        backends += [backend_row(name, b) for i, b in sorted(new_rows.items()) if old_rows.get(i) != b]
        removed_backends += [{"service": name, "id": i} for i in sorted(old_rows) if i not in new_rows]
    return Delta(version, base, services, sorted(set(before) - set(after)), backends, removed_backends, epoch)


def decode_delta(data: bytes) -> Delta:
    body = _load("delta", data)
    if not isinstance(body, dict) or set(body) != DELTA_KEYS:
        raise WireError(f"delta: must be an object with exactly {', '.join(sorted(DELTA_KEYS))}")
    _version("delta.version", body["version"])
    _version("delta.base", body["base"], low=-1)
    _version("delta.epoch", body["epoch"])
    for key in DELTA_KEYS - {"version", "base", "epoch"}:
        if not isinstance(body[key], list):
            raise WireError(f"delta.{key}: must be a list")
    return Delta(**body)
