"""A node's link to the control plane: SUB for snapshots and heartbeats,
DEALER for fetching the current snapshot and reporting what was applied.

Invariant I6 is enforced in ``ControlLink.receive``: a snapshot is handed to
the agent only if its version is newer than the applied one, and a heartbeat
announcing a newer version than any received (a gap: PUB/SUB may drop, a
node may join late) triggers a fetch of the full snapshot.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import zmq

from lbcore.config import Service
from lbcore.wire import (
    FETCH_REQUEST,
    WireError,
    apply_delta,
    decode_snapshot,
    encode_snapshot,
    report_request,
    snapshot_digest,
)

FETCH_TIMEOUT_S = 2.0


class ControlLink:
    def __init__(self, control: str, subscribe: str, log: Callable[[str], None]) -> None:
        self.control_endpoint = control
        self.log = log
        self.applied = -1
        self.services: tuple[Service, ...] = ()  # what ``applied`` holds: the base of a delta
        self.last_heard = time.monotonic()  # start: staleness counts from now
        self._context = zmq.Context()
        self.sub = self._context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(subscribe)
        self.dealer = self._new_dealer()

    def _new_dealer(self) -> zmq.Socket[bytes]:
        dealer: zmq.Socket[bytes] = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.control_endpoint)
        return dealer

    def staleness_ms(self) -> int:
        return int((time.monotonic() - self.last_heard) * 1000)

    def fetch(self) -> tuple[int, tuple[Service, ...]] | None:
        """The control plane's current snapshot, or None if it does not
        answer in time (then the node keeps what it has)."""
        self.dealer.send_multipart([b"", FETCH_REQUEST])
        deadline = time.monotonic() + FETCH_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0 and self.dealer.poll(int(left * 1000)):
            reply = json.loads(self.dealer.recv_multipart()[-1])
            result = reply.get("result")
            if not isinstance(result, dict) or "snapshot" not in result:
                continue  # the answer to an earlier report
            self.last_heard = time.monotonic()
            try:
                return decode_snapshot(str(result["snapshot"]).encode())
            except WireError as exc:
                self.log(f"snapshot fetched from {self.control_endpoint} refused: {exc}")
                return None
        # no answer: a late one must not pair with the next request
        self.dealer.close(0)
        self.dealer = self._new_dealer()
        return None

    def receive(self) -> tuple[int, tuple[Service, ...]] | None:
        """Drain the SUB socket; the newest applicable snapshot, if any."""
        newest: tuple[int, tuple[Service, ...]] | None = None
        gap = False
        announced = -1
        while self.sub.poll(0):
            frames = self.sub.recv_multipart()
            self.last_heard = time.monotonic()
            if len(frames) != 2:
                self.log(f"message of {len(frames)} frames ignored")
                continue
            kind, body = frames
            if kind == b"heartbeat":
                try:
                    announced = max(announced, int(json.loads(body)["version"]))
                except (ValueError, KeyError, TypeError):
                    self.log("malformed heartbeat ignored")
                    continue
            elif kind == b"delta":
                held = newest if newest else (self.applied, self.services)
                try:
                    version, base, services = apply_delta(body, held[1])
                except WireError as exc:
                    self.log(f"delta refused: {exc}")
                    gap = True  # what it would have changed must come from a full fetch
                    continue
                if version <= held[0]:
                    continue  # old news
                if base != held[0]:
                    gap = True  # its base is not what we hold: fetch in full (I6)
                    continue
                newest = (version, services)
            elif kind == b"snapshot":
                try:
                    version, services = decode_snapshot(body)
                except WireError as exc:
                    self.log(f"snapshot refused: {exc}")
                    continue
                if version > max(self.applied, newest[0] if newest else -1):
                    newest = (version, services)
        have = newest[0] if newest else self.applied
        if gap or announced > have:
            fetched = self.fetch()  # something was missed: the full snapshot, now
            if fetched is not None and fetched[0] > have:
                newest = fetched
        if newest is not None and newest[0] <= self.applied:
            return None
        return newest

    def report(self, node: str, counters: dict[str, Any]) -> None:
        """Tell the control plane what is applied (fire and forget)."""
        digest = snapshot_digest(encode_snapshot(self.applied, self.services)) if self.applied >= 0 else ""
        message = report_request(node, self.applied, self.staleness_ms(), counters, digest)
        try:
            self.dealer.send_multipart([b"", message], zmq.NOBLOCK)
        except zmq.Again:
            pass
        while self.dealer.poll(0):
            self.dealer.recv_multipart()  # replies to reports: nothing to do

    def close(self) -> None:
        self.sub.close(0)
        self.dealer.close(0)
        self._context.term()
