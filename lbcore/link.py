"""A node's link to the control plane: SUB for snapshots and heartbeats,
DEALER for fetching the current snapshot and reporting what was applied,
and how stale the node is (I7).

Invariant I6 is enforced in ``ControlLink.receive``: a snapshot is handed to
the agent only if its version is newer than the applied one within the same
epoch (the store it comes from), and a heartbeat announcing a newer version
than any received (a gap: PUB/SUB may drop, a node may join late), or
another epoch, triggers a fetch of the full snapshot. A full snapshot of
another epoch is applied whatever its version: the control plane's store is
another one (new, restored, or found behind its nodes), and the node
re-bases on it, saying so loudly.

I7 in ``ControlLink.tick``: the node counts the time since it last heard
from the control plane, reports it with what it applied every
REPORT_INTERVAL_S, and past max_staleness_ms says STALE (once) and keeps
serving what it has (fail-static).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import zmq

from lbcore.routing import Routing
from lbcore.wire import (
    FETCH_REQUEST,
    KIND_DELTA,
    KIND_HEARTBEAT,
    KIND_SNAPSHOT,
    MAX_RESULTS_PER_MESSAGE,
    REPORT_INTERVAL_S,
    NodeHealth,
    WireError,
    decode_delta,
    decode_heartbeat,
    decode_reply,
    decode_snapshot,
    health_results_request,
    report_request,
    snapshot_of_fetch_result,
)

FETCH_TIMEOUT_S = 2.0
REFUSED_RETRY_S = 30.0


class ControlLink:
    def __init__(self, node_id: str, max_staleness_ms: int, control: str, subscribe: str,
                 log: Callable[[str], None]) -> None:
        self.node_id, self.max_staleness_ms = node_id, max_staleness_ms
        self.control_endpoint = control
        self.log = log
        self._stale = False
        self._next_report = 0.0
        self.routing = Routing(-1, {}, epoch=-1)  # what the node applied: the base of the next delta
        self.refused = (-1, -1)  # (epoch, version) the node could not apply: not fetched again
        self._refused_until = 0.0  # ... until a newer one comes, or this time (it may apply later)
        self.last_heard = time.monotonic()  # start: staleness counts from now
        self.nodes: tuple[str, ...] = ()  # the nodes the control plane hears from (its last heartbeat)
        self.resend_health = False  # the control plane's digest of our probe results differs: send them all
        self._context = zmq.Context()
        self.sub = self._context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(subscribe)
        # one socket per kind of request: a fetch then reads only answers to
        # fetches, never the reply to a report still queued
        self.dealer = self._new_dealer()   # reports (fire and forget)
        self.fetcher = self._new_dealer()  # snapshot fetches

    @property
    def version(self) -> int:
        """The version the node applied."""
        return self.routing.version

    def poll_fd(self) -> int:
        """The descriptor that signals (edge) new messages on the SUB socket."""
        return int(self.sub.getsockopt(zmq.FD))

    def _new_dealer(self) -> zmq.Socket[bytes]:
        dealer: zmq.Socket[bytes] = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.control_endpoint)
        return dealer

    def staleness_ms(self) -> int:
        return int((time.monotonic() - self.last_heard) * 1000)

    def fetch(self) -> Routing | None:
        """The control plane's current snapshot, or None if it does not
        answer in time or answers with an error (the node keeps what it has)."""
        self.fetcher.send(FETCH_REQUEST)
        deadline = time.monotonic() + FETCH_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0 and self.fetcher.poll(int(left * 1000)):
            try:
                reply = decode_reply(self.fetcher.recv_multipart()[-1])
            except WireError:
                continue  # not an answer of the control plane's
            if not reply["ok"]:
                error = reply["error"]
                self.log(f"snapshot fetch refused by the control plane: "
                         f"{error['code']}: {error['message'][:200]}")
                return None
            try:
                snapshot = snapshot_of_fetch_result(reply["result"])
            except WireError:
                continue  # not an answer to a fetch
            self.last_heard = time.monotonic()
            try:
                return Routing.of(*decode_snapshot(snapshot))
            except WireError as exc:
                self.log(f"snapshot fetched from {self.control_endpoint} refused: {exc}")
                return None
        # no answer: a late one must not pair with the next request
        self.fetcher.close(0)
        self.fetcher = self._new_dealer()
        return None

    def receive(self) -> Routing | None:
        """Drain the SUB socket; the newest applicable snapshot, if any."""
        newest = self.routing
        gap = False
        announced = -1
        refused = self.refused if time.monotonic() < self._refused_until else (-1, -1)
        while True:
            try:  # a receive that may fail costs one call into libzmq, a check then a receive two
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.last_heard = time.monotonic()
            if len(frames) != 2:
                self.log(f"message of {len(frames)} frames ignored")
                continue
            kind, body = frames
            try:
                if kind == KIND_HEARTBEAT:
                    epoch, version, nodes = decode_heartbeat(body)
                    if nodes != self.nodes:
                        self.nodes = nodes  # the probers' choice changes with them (lbcore.probing)
                    if epoch != newest.epoch and not (epoch == refused[0] and version <= refused[1]):
                        gap = True  # another store: its full snapshot, fetched (unless refused already)
                    elif epoch == newest.epoch:
                        announced = max(announced, version)
                elif kind == KIND_DELTA:
                    delta = decode_delta(body)
                    if delta.epoch != newest.epoch:
                        # a delta of another epoch: the full snapshot instead (unless refused already)
                        gap = gap or not (delta.epoch == refused[0] and delta.version <= refused[1])
                        continue
                    if delta.version <= newest.version:
                        continue  # old news
                    if delta.base != newest.version:
                        gap = True  # its base is not what we hold: fetch in full (I6)
                        continue
                    newest = newest.with_rows(delta) or newest.apply(delta)
                elif kind == KIND_SNAPSHOT:
                    routing = Routing.of(*decode_snapshot(body))
                    if _newer(routing, newest):
                        newest = routing
                else:
                    self.log(f"message of kind {kind[:32]!r} ignored")
            except WireError as exc:
                self.log(f"{kind[:32].decode(errors='replace')} refused: {str(exc)[:300]}")
                gap = gap or kind == KIND_DELTA  # what it would have changed must come from a full fetch
            except (ValueError, LookupError, TypeError, ArithmeticError, RecursionError) as exc:
                # the decoders say WireError for all they know of; this is the
                # node staying up on whatever else a message may hold
                self.log(f"malformed {kind[:32].decode(errors='replace')} ignored: {exc!r:.300}")
                gap = gap or kind == KIND_DELTA
        if gap or announced > max(newest.version, refused[1] if refused[0] == newest.epoch else -1):
            fetched = self.fetch()  # something was missed: the full snapshot, now
            if fetched is not None and _newer(fetched, newest):
                newest = fetched
        if newest is self.routing or (newest.epoch == refused[0] and newest.version <= refused[1]):
            return None  # nothing new, or what the node could not apply (tried again later)
        if newest.epoch != self.routing.epoch and self.routing.epoch >= 0:
            self.log(f"EPOCH CHANGED: the control plane's store is another one (epoch {newest.epoch}, "
                     f"was {self.routing.epoch}); re-basing on its version {newest.version} "
                     f"(held {self.routing.version})")
        return newest

    def refuse(self, routing: Routing) -> None:
        """The node could not apply ``routing`` (say, a listen address held
        by another program): not asked for again until a newer version is
        announced or REFUSED_RETRY_S have passed."""
        self.refused = (routing.epoch, routing.version)
        self._refused_until = time.monotonic() + REFUSED_RETRY_S

    def applied(self, routing: Routing) -> None:
        """Record what the node now serves and tell the control plane at once
        (the ACK: the version only; digest and counters follow with the next
        periodic report)."""
        self.routing = routing
        self.report(None)

    @property
    def stale(self) -> bool:
        """Past max_staleness_ms without word from the control plane."""
        return self._stale

    def send_results(self, results: dict[str, bool | None], replace: bool = False) -> None:
        """Probe results that changed (or, ``replace``, the full set), in
        parts of at most MAX_RESULTS_PER_MESSAGE, fire and forget."""
        items = list(results.items())
        for start in range(0, max(1, len(items)), MAX_RESULTS_PER_MESSAGE):
            part = dict(items[start:start + MAX_RESULTS_PER_MESSAGE])
            try:
                message = health_results_request(self.node_id, part, replace and start == 0)
                self.dealer.send(message, zmq.NOBLOCK)
            except zmq.Again:
                self.resend_health = True  # not sent: the whole set goes again
                return

    def tick(self, counters: Callable[[], dict[str, Any] | None],
             health: Callable[[], NodeHealth | None] = lambda: None,
             queues: Callable[[], dict[str, dict[str, int]] | None] = lambda: None) -> None:
        """Report what is applied, and say loudly when the control plane has
        been silent past max_staleness_ms (the node keeps serving: fail-static)."""
        staleness, limit = self.staleness_ms(), self.max_staleness_ms
        if staleness > limit and not self._stale:
            self._stale = True
            self.log(f"STALE: no word from the control plane for {staleness} ms (limit {limit} ms); "
                     f"serving version {self.version} unchanged")
        elif staleness <= limit and self._stale:
            self._stale = False
            self.log(f"control plane heard again; serving version {self.version}")
        if time.monotonic() >= self._next_report:
            self._next_report = time.monotonic() + REPORT_INTERVAL_S
            self.report(counters(), health(), queues(), periodic=True)

    def report(self, counters: dict[str, Any] | None, health: NodeHealth | None = None,
               queues: dict[str, dict[str, int]] | None = None, periodic: bool = False) -> None:
        """Tell the control plane what is applied (fire and forget). The
        ACK carries no digest: hashing the whole snapshot would delay it;
        the periodic report does, and the counters when they are of the
        version applied (None: a worker has not taken it up yet, and its
        count could still grow from the version before: the control plane
        keeps the last ones, which confirm no drain of this version)."""
        digest = None
        if periodic:
            digest = self.routing.digest() if self.routing.version >= 0 else ""
        message = report_request(self.node_id, self.routing.epoch, self.routing.version, self.staleness_ms(),
                                 counters, digest, self.max_staleness_ms if periodic else None,
                                 health, queues)
        try:
            self.dealer.send(message, zmq.NOBLOCK)  # one frame: one wake of the I/O thread
        except zmq.Again:
            pass
        # only refusals and requests to resend are answered: read with the periodic report, not the ACK
        while periodic:
            try:
                raw = self.dealer.recv_multipart(zmq.NOBLOCK)[-1]
            except zmq.Again:
                break
            try:
                reply = decode_reply(raw)
            except WireError as exc:
                self.log(f"report answered with something else: {exc}")
                continue
            if not reply["ok"]:
                error = reply["error"]
                self.log(f"refused by the control plane: {error['code']}: {error['message'][:300]}")
            elif isinstance(reply["result"], dict) and reply["result"].get("resend_health") is True:
                self.resend_health = True

    def close(self) -> None:
        for sock in (self.sub, self.dealer, self.fetcher):
            sock.close(0)
        self._context.term()


def _newer(routing: Routing, held: Routing) -> bool:
    """I6: newer within an epoch; a snapshot of another epoch is taken whole."""
    return routing.epoch != held.epoch or routing.version > held.version
