"""The admin API of the control plane: ctl verbs over one request/reply
message each (the envelope is lbcore.wire's, the home of every message
format: this module re-exports the codec lbctl needs). ``lbctl`` speaks
it; the ZeroMQ server carries it. For example:

    {"verb": "backend.add", "args": {"service": "web", "id": "w4",
     "address": "127.0.0.1:9004", "weight": 1, "expected_version": 0}}

CODE (of an error reply) is bad_request, not_found, version_conflict (with expected/current) or
error. Verbs and their arguments are the table VERBS below; every write
takes an optional ``expected_version`` (the record's version; 0 on add:
only if absent) and answers the new global config version. A malformed or
unknown request gets a bad_request reply and changes nothing.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

from lbcore.config import DEFAULT_HEALTH, DEFAULT_LIFECYCLE, DEFAULT_OUTLIER
from lbcore.wire import (
    WireError,
    decode_reply,
    decode_request,
    encode_request,
    error_reply,
    ok_reply,
)
from orchestrator.errors import BadRequestError, ControlError, NotFoundError, VersionConflictError
from orchestrator.model import Backend, Change, Drain, Membership, State
from orchestrator.policy import (
    health_of,
    lifecycle_of,
    merged_health,
    merged_lifecycle,
    merged_outlier,
    outlier_of,
)

T = TypeVar("T")

if TYPE_CHECKING:  # lbctl imports this module: not the store (and what it imports)
    from lbcore.config import HealthCheck, Lifecycle, Outlier
    from orchestrator.store import Store

# what a client of the admin API (lbctl) needs to speak it
__all__ = ["VERBS", "ControlPlane", "WireError", "decode_reply", "encode_request", "parse_request"]

# verb -> (required args, optional args)
VERBS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "backend.add": (frozenset({"service", "id", "address"}),
                    frozenset({"weight", "max_conns", "expected_version"})),
    "backend.remove": (frozenset({"service", "id"}), frozenset({"final", "timeout_ms", "expected_version"})),
    "backend.drain": (frozenset({"service", "id"}), frozenset({"timeout_ms", "then", "expected_version"})),
    "backend.set_weight": (frozenset({"service", "id", "weight"}), frozenset({"expected_version"})),
    "backend.set": (frozenset({"service", "id"}), frozenset({"weight", "max_conns", "expected_version"})),
    "backend.list": (frozenset(), frozenset({"service"})),
    "policy.get": (frozenset({"service"}), frozenset()),
    "policy.set": (frozenset({"service"}),
                   frozenset({"algorithm", "listen", "expected_version", "health", "outlier", "lifecycle"})),
    "health.report": (frozenset({"backend", "up", "revision"}), frozenset()),
    "health.show": (frozenset(), frozenset({"service"})),
    "explain": (frozenset({"service", "backend"}), frozenset()),
    "health.results": (frozenset({"node", "results"}), frozenset({"replace"})),
    "version": (frozenset(), frozenset()),
    # answered by the server (extra_verbs): node traffic and the fleet view
    "snapshot.get": (frozenset(), frozenset()),
    "node.report": (frozenset({"node", "epoch", "version", "staleness_ms"}),
                    frozenset({"counters", "digest", "max_staleness_ms", "health", "services"})),
    "verify": (frozenset(), frozenset()),
    "snapshot.node": (frozenset({"node"}), frozenset()),
    "status": (frozenset(), frozenset()),
}


def _reply_error(error: ControlError) -> dict[str, Any]:
    if isinstance(error, VersionConflictError):
        return error_reply(error.code, str(error), expected=error.expected, current=error.current)
    return error_reply(error.code, str(error))


def parse_request(raw: bytes) -> tuple[str, dict[str, Any]]:
    """(verb, args), or BadRequestError saying what is wrong."""
    try:
        verb, args = decode_request(raw)
    except WireError as exc:
        raise BadRequestError(str(exc)) from None
    if not isinstance(verb, str) or verb not in VERBS:
        raise BadRequestError(f"unknown verb {verb!r} (known: {', '.join(sorted(VERBS))})")
    if not isinstance(args, dict):
        raise BadRequestError("args must be an object")
    required, optional = VERBS[verb]
    missing, unknown = required - set(args), set(args) - required - optional
    if missing:
        raise BadRequestError(f"{verb}: missing {', '.join(sorted(missing))}")
    if unknown:
        raise BadRequestError(f"{verb}: unknown argument {', '.join(sorted(unknown))}")
    for key in ("service", "id", "address", "algorithm", "listen", "backend", "node"):
        if key in args and not isinstance(args[key], str):
            raise BadRequestError(f"{verb}: {key} must be a string")
    return verb, args


class ControlPlane:
    """Answers ctl requests against a store. ``on_change`` is called after
    every committed write with what it touched and the version it made (the
    recompute trigger)."""

    def __init__(self, store: Store,
                 on_change: Callable[[Change, int], None] = lambda change, version: None) -> None:
        self.store = store
        self.on_change = on_change
        # told of every operator's health report that applied (the checks' counter follows it)
        self.on_health_report: Callable[[str, bool], None] = lambda backend, up: None
        # verbs answered by whoever runs this plane (the server's snapshot fetch)
        self.extra_verbs: dict[str, Callable[[dict[str, Any]], Any]] = {}
        # a drain's progress as the nodes report it (the server's drain watch): added to backend.list
        self.drain_progress: Callable[[Backend], dict[str, Any]] = lambda record: {}
        # the time of each write that committed, in seconds (the server's metrics)
        self.on_commit: Callable[[float], None] = lambda seconds: None
        # told of each change of a backend's stored verdict, whoever made it (the server's metrics)
        self.on_health_transition: Callable[[str], None] = lambda backend: None

    def answer(self, raw: bytes) -> tuple[str | None, dict[str, Any]]:
        """(the verb, if the request named a known one; the reply, not yet
        encoded: a node's accepted report is not answered). Never raises."""
        verb = None
        try:
            verb, args = parse_request(raw)
            reply = ok_reply(self._dispatch(verb, args))
        except ControlError as exc:
            reply = _reply_error(exc)
        except (RecursionError, OverflowError, ValueError, TypeError) as exc:
            reply = _reply_error(BadRequestError(f"request refused: {exc.__class__.__name__}: {exc}"))
        except Exception as exc:  # the store failed (disk, lock): the daemon answers and goes on
            reply = _reply_error(ControlError(f"{exc.__class__.__name__}: {exc}"))
        return verb, reply

    def _timed(self, write: Callable[[], T]) -> T:
        """``write()``, its time told to ``on_commit`` if it committed."""
        start = time.perf_counter()
        result = write()
        self.on_commit(time.perf_counter() - start)
        return result

    def _write(self, commit: Callable[[], int], change: Change) -> dict[str, Any]:
        version = self._timed(commit)
        self.on_change(change, version)
        return {"version": version}

    def _dispatch(self, verb: str, args: dict[str, Any]) -> Any:
        if verb in self.extra_verbs:
            return self.extra_verbs[verb](args)
        store, expected = self.store, args.get("expected_version")
        service, backend_id = args.get("service", ""), args.get("id", "")
        touched = Change(backend=(service, backend_id))
        if verb == "backend.add":
            return self._write(lambda: store.add_backend(service, backend_id, args["address"],
                                                         args.get("weight", 1), expected,
                                                         args.get("max_conns", 0)), touched)
        if verb == "backend.remove":
            return self._remove(service, backend_id, args)
        if verb == "backend.drain":
            return self._write(lambda: store.drain_backend(service, backend_id, args.get("timeout_ms"),
                                                           args.get("then"), expected), touched)
        if verb == "backend.set_weight":
            return self._write(lambda: store.set_weight(service, backend_id, args["weight"], expected),
                               touched)
        if verb == "backend.set":
            return self._write(lambda: store.set_backend(service, backend_id, args.get("weight"),
                                                         args.get("max_conns"), expected), touched)
        if verb == "policy.set":
            listen, algorithm, health, outlier, lifecycle = self._policy_settings(args)
            return self._write(
                lambda: store.put_policy(service, listen, algorithm, expected, health, outlier, lifecycle),
                Change(service=service))
        if verb == "health.report":
            return self._health_report(args["backend"], args["up"], args["revision"])
        state = store.read()
        if verb == "backend.list":
            return [{**_backend(b), **self.drain_progress(b)} for b in state.backends
                    if args.get("service") in (None, b.service)]
        if verb == "policy.get":
            return self._policy(state, args["service"])
        if verb == "health.show":
            return [asdict(h) for h in state.health]
        return {"version": state.version}

    def _remove(self, service: str, backend_id: str, args: dict[str, Any]) -> dict[str, Any]:
        """Drained first (no new connections; open ones finish), then
        removed; at once with ``final``. A drained backend is removed at once."""
        final, expected = args.get("final", False), args.get("expected_version")
        if not isinstance(final, bool):
            raise BadRequestError("backend.remove: final must be a boolean")
        record = next((b for b in self.store.read_rows(set(), {(service, backend_id)}, set()).backends), None)
        touched = Change(backend=(service, backend_id))
        if final or (record is not None and record.state is Membership.DRAINED):
            return self._write(lambda: self.store.set_membership(service, backend_id, Membership.REMOVED,
                                                                 expected), touched)
        return self._write(lambda: self.store.drain_backend(service, backend_id, args.get("timeout_ms"),
                                                            "remove", expected), touched)

    def _policy_settings(self, args: dict[str, Any]) -> tuple[str, str, HealthCheck | None, Outlier | None,
                                                              Lifecycle | None]:
        """The listen address and algorithm (the service's own when not
        given) and the health, outlier and lifecycle settings with the
        given ones over the service's (None: unchanged), checked as a
        file's are (slow start against the algorithm, even when only the
        algorithm changes)."""
        current = next((p for p in self.store.read().policies if p.service == args["service"]), None)
        if current is None and not {"listen", "algorithm"} <= set(args):
            raise BadRequestError(f"policy.set: new service {args['service']!r} needs a listen address "
                                  "and an algorithm")
        listen = str(args["listen"]) if "listen" in args else current.listen  # type: ignore[union-attr]
        algorithm = args["algorithm"] if "algorithm" in args else current.algorithm  # type: ignore[union-attr]
        health = outlier = None
        if "health" in args:
            health = merged_health(health_of(current.health) if current else DEFAULT_HEALTH, args["health"])
        if "outlier" in args:
            base = outlier_of(current.outlier) if current else DEFAULT_OUTLIER
            outlier = merged_outlier(base, args["outlier"])
        lifecycle = None
        if "lifecycle" in args or "algorithm" in args:
            held = lifecycle_of(current.lifecycle, current.algorithm) if current else DEFAULT_LIFECYCLE
            lifecycle = merged_lifecycle(held, args.get("lifecycle", {}), algorithm)
        return listen, algorithm, health, outlier, lifecycle

    def _health_report(self, backend: str, up: bool, revision: int) -> dict[str, Any]:
        """An operator's observation (I4: only a newer revision applies; an
        older one is refused, saying the stored revision, and changes nothing)."""
        before = self._stored_up(backend)
        applied, version = self._timed(lambda: self.store.record_health(backend, up, revision, "report"))
        if not applied:
            stored = next((h.revision for h in self.store.read().health if h.backend_id == backend), None)
            raise BadRequestError(f"health.report: revision {revision} of {backend} is not newer than the "
                                  f"stored revision {stored}: nothing changed")
        self.on_change(Change(health=backend), version)
        self.on_health_report(backend, up)
        if before != up:
            self.on_health_transition(backend)
        return {"version": version, "applied": applied}

    def record_verdict(self, backend: str, up: bool) -> int:
        """The health checks' change of verdict: one observation with the
        next revision, through the same store path as an operator's (I4)."""
        before = self._stored_up(backend)
        applied, version = self._timed(lambda: self.store.record_health(backend, up, None, "checks"))
        if applied:
            self.on_change(Change(health=backend), version)
            if before != up:
                self.on_health_transition(backend)
        return version

    def _stored_up(self, backend: str) -> bool:
        """The stored verdict; no observation yet reads as up, as derivation reads it."""
        return next((h.up for h in self.store.read_rows(set(), set(), {backend}).health
                     if h.backend_id == backend), True)

    def record_drain(self, service: str, backend_id: str, drain: Drain, state: Membership,
                     expected_version: int) -> int:
        """A drain's progress (closing, its end), written by the drain watch
        through the store's compare-and-swap like an operator's change."""
        version = self._timed(lambda: self.store.set_drain(service, backend_id, drain, state,
                                                           expected_version))
        self.on_change(Change(backend=(service, backend_id)), version)
        return version

    @staticmethod
    def _policy(state: State, service: str) -> dict[str, Any]:
        for policy in state.policies:
            if policy.service == service:
                return {**asdict(policy), "health": asdict(health_of(policy.health)),
                        "outlier": asdict(outlier_of(policy.outlier)),
                        "lifecycle": asdict(lifecycle_of(policy.lifecycle, policy.algorithm))}
        raise NotFoundError(f"no service {service!r}")


def _backend(b: Backend) -> dict[str, Any]:
    record = asdict(b)
    record["state"] = b.state.value
    return record
