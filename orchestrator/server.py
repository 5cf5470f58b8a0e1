"""``lborch``: the control plane as a daemon.

Sockets (ZeroMQ, addresses from the [orchestrator] table):

- control (ROUTER): ctl requests from lbctl (REQ/DEALER), answered with the
  admin API of control.py; nodes use the same socket to fetch the current
  snapshot (verb ``snapshot.get``) and to report what they applied (the
  ACK after each apply is read as the exact bytes nodes write: see
  lbcore.wire.read_ack; a node's accepted report is never answered).
- publish (PUB): a delta whenever the routing state changes (what changed
  since the previous version; a full snapshot instead for the first one
  and whenever the full one is smaller); and a heartbeat with the current
  version every heartbeat_ms (formats and frame kinds: lbcore.wire), so
  that a node that missed a message, or joined late, sees the gap and
  fetches the full snapshot.

Recompute is single-writer (derive.Deriver) and coalesced: a write records
what it touched; the first change after a quiet spell is published at once,
and further ones at most once per COALESCE_MS, so a burst of changes gives
few snapshots.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import zmq

from lbcore.config import check_name
from lbcore.wire import (
    KIND_DELTA,
    KIND_HEARTBEAT,
    KIND_SNAPSHOT,
    MAX_RECEIVED,
    SILENT_S,
    SUMMED,
    WireError,
    columns_of,
    decode_report,
    encode_heartbeat,
    encode_reply,
    fetch_result,
    read_ack,
    summed_counters,
)
from orchestrator.checks import HealthChecks
from orchestrator.control import ControlPlane
from orchestrator.derive import Deriver, InconsistentSnapshotError, derive_in_full
from orchestrator.drains import DrainWatch
from orchestrator.errors import BadRequestError, ControlError, NotFoundError
from orchestrator.health_view import NodeEjections, explain, health_rows
from orchestrator.model import Change
from orchestrator.settings import Endpoints
from orchestrator.store import Store

if TYPE_CHECKING:  # imported only by a control plane that serves metrics (cli.py)
    from orchestrator.metrics import OrchestratorMetrics

COALESCE_MS = 2
RETRY_S = 5.0         # after a derivation that failed its check or the store
AUDIT_IDLE_S = 5.0    # the audit runs only this long after the last publish
AUDIT_EVERY_S = 60.0
MAX_NODES = 1024  # reports kept; beyond, the node heard from least recently is forgotten
# Nodes on another epoch than the published one (about to re-base, or not
# ours at all): at most this many remembered, and none of their counters
MAX_OTHER_EPOCH_NODES = 64
# Per-backend counter rows kept over all nodes (what status shows): past it,
# a node's counters are kept summed per service
MAX_COUNTER_ROWS = 50_000
LIVE_S = SILENT_S  # a node that reported within this is one probers are chosen among
KEEP_COMMIT_TIMES = 1024  # versions whose commit time is kept, for the propagation status shows


class Orchestrator:
    def __init__(self, store: Store, endpoints: Endpoints, log: Any = sys.stderr,
                 parent_pid: int = 0, metrics: OrchestratorMetrics | None = None) -> None:
        self.metrics = metrics  # bound already; served by the caller once this is built
        self.parent_pid = parent_pid  # embedded: the node whose death ends this process too
        self.store = store
        self.endpoints = endpoints
        self._log_file = log
        self.deriver = Deriver(store)
        self.plane = ControlPlane(store, on_change=self._changed)
        self.plane.extra_verbs["snapshot.get"] = self._snapshot_get
        self.plane.extra_verbs["node.report"] = self._node_report
        self.plane.extra_verbs["status"] = self._status
        self.plane.extra_verbs["snapshot.node"] = self._snapshot_node
        self.plane.extra_verbs["verify"] = self._verify
        self.checks = HealthChecks(self.plane.record_verdict, self.log)
        self.plane.on_health_report = self.checks.operator_set
        self.plane.extra_verbs["health.results"] = self._health_results
        self.plane.extra_verbs["health.show"] = self._health_show
        self.plane.extra_verbs["explain"] = self._explain
        self.ejections: dict[str, NodeEjections] = {}  # node -> its last word on ejections
        self.nodes: dict[str, dict[str, Any]] = {}  # StatusView: derived, never stored
        self.drains = DrainWatch(store, self.plane.record_drain, lambda: self.nodes,
                                 lambda: self.published_epoch, self.log)
        self.plane.drain_progress = self.drains.progress
        if metrics is not None:
            self.plane.on_commit = metrics.commits.observe
            self.plane.on_health_transition = self._count_transition
        self._counter_rows = 0  # counter rows held in self.nodes (bounded by MAX_COUNTER_ROWS)
        self._dirty = True  # publish once at start
        self._committed: dict[int, int] = {}  # version -> when its write committed (monotonic ns)
        self._last_publish = self._retry_at = 0.0
        self._last_audit = time.monotonic()
        self.published_version = -1
        self.published_epoch = -1
        self._epoch_pending = False  # a new epoch taken, not yet published
        self._store_failed = False  # the last derivation failed on the store itself (not a check)
        self.last_delta_bytes = 0
        self.last_error = ""  # why the last derivation was not published, if it was not
        self._stop = False
        self._context = zmq.Context()
        self.control = self._context.socket(zmq.ROUTER)
        self.publisher = self._context.socket(zmq.PUB)
        for sock in (self.control, self.publisher):
            sock.setsockopt(zmq.LINGER, 0)
        # A request past MAX_REQUEST gets a clear refusal (lbcore.wire); one
        # far past it is dropped by ZeroMQ with its connection, unread.
        self.control.setsockopt(zmq.MAXMSGSIZE, MAX_RECEIVED)
        self.control.bind(endpoints.control)
        self.publisher.bind(endpoints.publish)

    def log(self, message: str) -> None:
        print(f"lborch: {message}", file=self._log_file, flush=True)

    def _changed(self, change: Change, version: int) -> None:
        self.deriver.touch(change)
        self.drains.touch(change)
        self._dirty = True
        if self._store_failed:
            self._retry_at = 0.0  # a write committed: the store works again, no need to wait for the retry
        self._committed[version] = time.monotonic_ns()
        if len(self._committed) > KEEP_COMMIT_TIMES:
            del self._committed[next(iter(self._committed))]

    def _count_transition(self, backend_id: str) -> None:
        """One change of ``backend_id``'s verdict, in every service that has it."""
        assert self.metrics is not None
        for b in self.store.read_rows(set(), set(), {backend_id}).backends:
            self.metrics.transitions.labels(b.service, b.id).inc()

    def _snapshot_get(self, args: dict[str, Any]) -> Any:
        self._publish_if_dirty(force=True)
        if self.published_version < 0:
            raise ControlError(f"no snapshot derived yet ({self.last_error or 'starting'})")
        return fetch_result(self.deriver.routing.encode())

    def _node_report(self, args: dict[str, Any]) -> Any:
        try:
            report = decode_report(args)
        except WireError as exc:
            raise BadRequestError(str(exc)) from None
        self._record_report(report.node, report.epoch, report.version, report.staleness_ms, report.counters,
                            report.digest, report.max_staleness_ms, report.services)
        if report.health is not None:
            now = time.monotonic()
            self.ejections[report.node] = NodeEjections(report.health.ejected, report.health.panics, now)
            if not self.checks.vouch(report.node, report.health.digest, now):
                return {"resend_health": True}  # a result message was lost: the node sends them all
        return {}

    def _health_results(self, args: dict[str, Any]) -> Any:
        node = args["node"]
        if check_name(node):
            raise BadRequestError(f"health.results: node: {check_name(node)}")
        if not isinstance(args.get("replace", False), bool):
            raise BadRequestError("health.results: replace must be a boolean")
        self.checks.receive(node, args["results"], args.get("replace", False), time.monotonic())
        return {}

    def live_nodes(self) -> list[str]:
        """The nodes probers are chosen among: heard from within LIVE_S, on
        the published epoch. Also forgets what nodes no longer reporting said."""
        now = time.monotonic()
        for name in [n for n in self.ejections if n not in self.nodes]:
            del self.ejections[name]
        for name in [n for n in self.checks.by_node if n not in self.nodes]:
            self.checks.forget(name)
        # a node that hears nothing from us (STALE) probes on its own verdict, not for the quorum
        return sorted(n for n, v in self.nodes.items()
                      if now - v["reported"] <= LIVE_S and v["epoch"] == self.published_epoch
                      and (v["max_staleness_ms"] is None or v["staleness_ms"] <= v["max_staleness_ms"]))

    def _health_show(self, args: dict[str, Any]) -> Any:
        return health_rows(self.store.read(), self.checks, self.ejections, self.live_nodes(),
                           args.get("service"))

    def _explain(self, args: dict[str, Any]) -> Any:
        return explain(self.store.read(), self.checks, self.ejections, self.live_nodes(), args["service"],
                       args["backend"])

    def _check_health(self) -> float:
        """The checks' verdicts that are due; when the next one is (monotonic)."""
        now = time.monotonic()
        if self.published_version >= 0:
            self.checks.follow(self.deriver.routing, now)
        if self.checks.next_due() <= now:  # a result may have brought a verdict forward: asked each turn
            self.checks.tick(now, self.live_nodes())
        return self.checks.next_due()

    def _record_report(self, name: str, epoch: int, version: int, staleness: int,
                       counters: dict[str, Any] | None = None, digest: str | None = None,
                       max_staleness_ms: int | None = None,
                       services: dict[str, dict[str, int]] | None = None) -> None:
        now_ns = time.monotonic_ns()
        self._check_not_behind(name, epoch, version, digest)
        previous = self._forget(name) or {}  # re-inserted below: the dict keeps report order
        # the version the counters were read at: a drain is confirmed by counters of its version or later
        counters_version = version if counters is not None else \
            previous.get("counters_version", -1) if epoch == previous.get("epoch") else -1
        if counters is None:  # an ACK carries none
            counters = previous.get("counters", {})
        if services is None:
            services = previous.get("services", {})
        if self.published_epoch >= 0 and epoch != self.published_epoch:
            counters = {}  # not of this store's routing: kept for no one to read
            others = [n for n, v in self.nodes.items() if v["epoch"] != self.published_epoch]
            if len(others) >= MAX_OTHER_EPOCH_NODES:
                self._forget(others[0])  # the one heard from least recently
        if len(self.nodes) >= MAX_NODES:
            self._forget(next(iter(self.nodes)))  # least recently heard (dict keeps report order)
        rows = sum(map(len, counters.values()))
        if rows > len(counters) and self._counter_rows + rows > MAX_COUNTER_ROWS:
            counters = {service: {SUMMED: summed_counters(columns_of(backends.values()))}
                        for service, backends in counters.items()}
            rows = len(counters)
        if self._counter_rows + rows > MAX_COUNTER_ROWS:
            counters, rows = {}, 0  # past the budget even summed: none kept for this node
            counters_version = -1   # and none to confirm a drain with
        self._counter_rows += rows
        # from the commit of the version to this node's first word of it
        propagation = previous.get("propagation_ms")
        if (epoch, version) != (previous.get("epoch"), previous.get("version")):
            committed = self._committed.get(version) if epoch == self.deriver.routing.epoch else None
            propagation = round((now_ns - committed) / 1e6, 3) if committed is not None else None
            if propagation is not None and self.metrics is not None:
                self.metrics.propagation.observe(propagation / 1000)
        # the ACK right after an apply carries no digest (hashing the snapshot
        # would delay the node); the next periodic report brings it
        if digest is None:
            same = (epoch, version) == (previous.get("epoch"), previous.get("version"))
            digest = previous.get("digest", "") if same else ""
        if max_staleness_ms is None:  # an ACK carries none: the node's bound is as it said last
            max_staleness_ms = previous.get("max_staleness_ms")
        self.nodes[name] = {"epoch": epoch, "version": version, "staleness_ms": staleness,
                            "max_staleness_ms": max_staleness_ms,
                            "counters": counters, "counters_version": counters_version, "services": services,
                            "rows": rows, "digest": digest, "reported": now_ns / 1e9,
                            "propagation_ms": propagation}

    def _forget(self, name: str) -> dict[str, Any] | None:
        node = self.nodes.pop(name, None)
        if node is not None:
            self._counter_rows -= node["rows"]
        return node

    def _check_not_behind(self, name: str, epoch: int, version: int, digest: str | None) -> None:
        """A node that applied a newer version of this very epoch than the
        store holds means the store went back (restored from an older
        copy): versions would never compare again, so the store takes a new
        epoch, and its next snapshot, in full, re-bases every node."""
        if self._epoch_pending or self.published_version < 0 or epoch != self.published_epoch:
            return  # one new epoch at a time: until it is published, reports of the old one say nothing new
        if version > self.published_version:
            why = f"applied version {version} of epoch {epoch}, the store is at {self.published_version}"
        elif version == self.published_version and digest and digest != self.deriver.routing.digest():
            why = f"applied version {version} of epoch {epoch} with other bytes than the store's"
        else:
            return
        try:
            new = self.store.new_epoch()
        except Exception as exc:  # the store's own error: the next report asks again
            self.log(f"STORE BEHIND ITS NODES ({why}), and no new epoch yet: {exc.__class__.__name__}: {exc}")
            return
        self.log(f"STORE BEHIND ITS NODES: node {name} {why} (restored from an older copy?); "
                 f"new epoch {new}: nodes re-base on its next snapshot")
        self._epoch_pending = True
        self.deriver.derive_in_full_next()
        self._dirty = True

    def _verify(self, args: dict[str, Any]) -> Any:
        """The fleet against the store, now: I2 (the published routing is a
        full derivation of the store; every node applied the same bytes),
        every node on the published epoch and version, and I7 (each node's
        staleness, and the time since its last report, within its bound).
        Each violation is a line; none: consistent."""
        violations = []
        state = self.store.read()
        routing = self.deriver.routing
        published = (self.published_epoch, self.published_version)
        if (state.epoch, state.version) != published:
            violations.append(f"control plane: the store is at epoch {state.epoch} version {state.version}, "
                              f"epoch {published[0]} version {published[1]} is published")
        elif derive_in_full(state).encode() != routing.encode():
            violations.append(f"I2: the published routing of version {state.version} differs from a full "
                              "derivation from the store")
        digest = routing.digest() if self.published_version >= 0 else ""
        now = time.monotonic()
        for name, node in sorted(self.nodes.items()):
            where = f"node {name}"
            if node["epoch"] != self.published_epoch:
                violations.append(f"{where}: on epoch {node['epoch']}, the store's is {self.published_epoch}")
            elif node["version"] != self.published_version:
                violations.append(f"{where}: applied version {node['version']}, {self.published_version} "
                                  "is published")
            elif not node["digest"]:
                violations.append(f"{where}: has not reported the digest of version {node['version']} yet")
            elif node["digest"] != digest:
                violations.append(f"I2: {where} applied version {node['version']} with other bytes than the "
                                  f"control plane's (digest {node['digest'][:12]}, expected {digest[:12]})")
            bound, silent = node["max_staleness_ms"], int((now - node["reported"]) * 1000)
            if bound is not None and node["staleness_ms"] > bound:
                violations.append(f"I7: {where} is stale: {node['staleness_ms']} ms without word from the "
                                  f"control plane, bound {bound} ms")
            if bound is not None and silent > bound:
                violations.append(f"I7: {where} has not reported for {silent} ms, bound {bound} ms")
        return {"consistent": not violations, "epoch": self.published_epoch,
                "version": self.published_version, "nodes": len(self.nodes), "violations": violations}

    def _snapshot_node(self, args: dict[str, Any]) -> Any:
        """What a node reported applying, audited against the control
        plane's own snapshot of that version (I2: same inputs, same bytes).
        ``consistent``: true, false, or null while the node has not reported
        the digest of the version it applied (its ACK carries none; its next
        periodic report, within 0.5 s, does)."""
        node = self.nodes.get(args["node"])
        if node is None:
            raise NotFoundError(f"no report from node {args['node']!r}")
        routing = self.deriver.routing
        current = node["version"] == self.published_version == routing.version \
            and node["epoch"] == self.published_epoch == routing.epoch
        return {"node": args["node"], "applied_version": node["version"], "digest": node["digest"],
                "current": current,
                # None: the node has not reported the digest of this version yet
                "consistent": None if current and not node["digest"] else
                current and node["digest"] == routing.digest(),
                "snapshot": routing.encode().decode() if current else None}

    def _status(self, args: dict[str, Any]) -> Any:
        now = time.monotonic()
        published = self.published_version >= 0
        return {
            "epoch": self.published_epoch,
            "version": self.published_version,
            # when the write that made it committed, on this host's monotonic
            # clock (time.monotonic_ns): comparable with stamps taken on the
            # same host only, as bench/propagation.py does; null if unknown
            "version_committed_ns": self._committed.get(self.published_version),
            "last_error": self.last_error,
            "snapshot_bytes": self.deriver.routing.encoded_size(),
            "last_delta_bytes": self.last_delta_bytes,
            # lag: versions behind, within the published epoch; a node on
            # another epoch (null lag) has not yet re-based on this store
            "nodes": [{"node": name, "applied_version": n["version"], "epoch": n["epoch"],
                       "lag": self.published_version - n["version"]
                       if published and n["epoch"] == self.published_epoch else None,
                       "staleness_ms": n["staleness_ms"],
                       "propagation_ms": n["propagation_ms"],
                       "last_report_ms": int((now - n["reported"]) * 1000),
                       "counters": n["counters"],
                       # per service: its queue (waiting now, queued, queue_timeouts, rejected)
                       "services": n["services"],
                       # what its last periodic report said: backends it ejects (ms left then), panics
                       "ejected": self.ejections[name].ejected if name in self.ejections else {},
                       "panics": self.ejections[name].panics if name in self.ejections else {}}
                      for name, n in sorted(self.nodes.items())],
        }

    def _publish_if_dirty(self, force: bool = False) -> None:
        """The single writer of published state: derive, check, publish."""
        if not self._dirty:
            return
        now = time.monotonic()
        if now < self._retry_at or (not force and (now - self._last_publish) * 1000 < COALESCE_MS):
            return
        self._dirty = False
        self._last_publish = now
        try:
            derived = self.deriver.next()
        except Exception as exc:  # a failed check, or the store's own error
            # never publish what fails its check; nodes keep the last good
            # one; what was touched is kept and derived in full on the retry
            self._store_failed = not isinstance(exc, InconsistentSnapshotError)
            error = f"{exc.__class__.__name__}: {exc}"
            if error != self.last_error:
                self.log(f"not published ({error}); retrying every {RETRY_S:g} s")
            self.last_error = error
            self._dirty, self._retry_at = True, now + RETRY_S
            return
        self.last_error = ""
        routing = self.deriver.routing
        published = (self.published_epoch, self.published_version)
        if derived is None and published == (routing.epoch, routing.version):
            return
        delta = derived[1].encode() if derived is not None else b""
        if self.published_version < 0 or self.published_epoch != routing.epoch or not delta \
                or len(delta) >= routing.encoded_size():
            self.publisher.send_multipart([KIND_SNAPSHOT, routing.encode()])
        else:
            self.publisher.send_multipart([KIND_DELTA, delta])
            self.last_delta_bytes = len(delta)
        self.published_version, self.published_epoch = routing.version, routing.epoch
        self._epoch_pending = False

    def _audit_if_idle(self) -> None:
        """I2 at rest, now and then when nothing is changing: the published
        routing against a full derivation from the store."""
        now = time.monotonic()
        if self._dirty or now - self._last_publish < AUDIT_IDLE_S or now - self._last_audit < AUDIT_EVERY_S:
            return
        self._last_audit = now
        try:
            self.deriver.audit()
        except InconsistentSnapshotError as exc:
            self.log(f"AUDIT FAILED: {exc}")
            self._dirty = True  # the correction goes out as the next version
        except Exception as exc:  # the store's own error: the audit is tried again later
            self.log(f"audit not done ({exc.__class__.__name__}: {exc})")

    def _heartbeat(self) -> None:
        if self.published_version < 0:
            return  # nothing to announce: nodes keep counting their staleness
        self.publisher.send_multipart([KIND_HEARTBEAT, encode_heartbeat(self.published_epoch,
                                                                        self.published_version,
                                                                        self.live_nodes())])

    def _answer(self, frames: list[bytes]) -> None:
        # REQ puts an empty delimiter between the identity and the body
        envelope, body = frames[:-1], frames[-1]
        if len(envelope) == 1 and (ack := read_ack(body)) is not None:
            self._record_report(*ack)  # a node's ACK (DEALER): never answered
            if self.metrics is not None:
                self.metrics.count_request("node.ack", "ok")
            return
        verb, reply = self.plane.answer(body)
        if self.metrics is not None:
            self.metrics.count_request(verb, "ok" if reply["ok"] else reply["error"]["code"])
        if reply["ok"] and reply["result"] == {} and verb in ("node.report", "health.results") \
                and len(envelope) == 1:
            return  # a node's report (DEALER, no delimiter) is fire and forget: answered only if refused
        self.control.send_multipart([*envelope, encode_reply(reply)])

    def stop(self, *_args: object) -> None:
        self._stop = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        heartbeat_s = self.endpoints.heartbeat_ms / 1000
        next_heartbeat = time.monotonic()
        self._publish_if_dirty(force=True)  # the whole state, derived and checked
        self.log(f"ready: control {self.endpoints.control}, publish {self.endpoints.publish}, "
                 f"version {self.deriver.routing.version}")
        try:
            while not self._stop:
                next_verdict = self._check_health()
                if self.published_version >= 0:
                    next_verdict = min(next_verdict, self.drains.step())
                timeout_ms = max(0, int((min(next_heartbeat, next_verdict) - time.monotonic()) * 1000))
                if self._dirty:
                    wait_s = self._retry_at - time.monotonic()
                    timeout_ms = min(timeout_ms, int(wait_s * 1000) + 1 if wait_s > 0 else COALESCE_MS)
                if dict(poller.poll(timeout_ms)).get(self.control):
                    for _ in range(256):  # answer what is queued, then publish once
                        try:  # as the nodes drain theirs: one call into libzmq per message
                            frames = self.control.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._answer(frames)
                self._publish_if_dirty()
                self._audit_if_idle()
                if time.monotonic() >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = time.monotonic() + heartbeat_s
                    if self.parent_pid and os.getppid() != self.parent_pid:
                        self.log(f"parent {self.parent_pid} is gone; stopping")
                        self._stop = True
        finally:
            self.close()
        self.log("stopped")
        return 0

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.control.close(0)
        self.publisher.close(0)
        self._context.term()
