"""What every fault case runs beside its fault: steady client load (new
connections and long transfers) through the nodes, a writer of acknowledged
changes to the control plane, and the time until ``lbctl verify`` finds
the fleet consistent again. Loopback only; every loop is bounded by a stop
event and the test's own timeout."""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field

import zmq
from e2e_support import Client

from lbcore.wire import decode_reply, encode_request

CONNECT_EVERY_S = 0.01   # about 100 new client connections a second
TRANSFER_CHUNK = 64 * 1024


@dataclass
class Figures:
    """What the load saw: counted, never timed."""

    connections: int = 0
    failed_connections: list[str] = field(default_factory=list)
    transfer_rounds: int = 0
    cut_transfers: list[str] = field(default_factory=list)
    writes: int = 0
    unanswered_writes: int = 0


class Load:
    """New connections at about 100/s (each: the backend's id and one echo)
    and ``transfers`` long transfers (64 KiB echoed again and again),
    spread over ``targets`` (the nodes' listen addresses)."""

    def __init__(self, targets: list[str], transfers: int = 2) -> None:
        self.targets = targets
        self.figures = Figures()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._connections, daemon=True)]
        self._threads += [threading.Thread(target=self._transfer, args=(i,), daemon=True)
                          for i in range(transfers)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> Figures:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        return self.figures

    def _connections(self) -> None:
        n = 0
        while not self._stop.wait(CONNECT_EVERY_S):
            target = self.targets[n % len(self.targets)]
            n += 1
            try:
                with Client(target, timeout=5) as c:
                    c.ident()
                    if c.echo(b"ping %d\n" % n) != b"ping %d\n" % n:
                        raise AssertionError("echo altered")
                self.figures.connections += 1
            except (OSError, EOFError, AssertionError) as exc:
                self.figures.failed_connections.append(f"{target}: {exc!r}")

    def _transfer(self, index: int) -> None:
        payload = os.urandom(TRANSFER_CHUNK)
        target = self.targets[index % len(self.targets)]
        while not self._stop.is_set():
            try:
                with Client(target, timeout=5) as c:
                    c.ident()
                    while not self._stop.is_set():
                        if c.echo(payload) != payload:
                            raise AssertionError("transfer altered")
                        self.figures.transfer_rounds += 1
            except (OSError, EOFError, AssertionError) as exc:
                self.figures.cut_transfers.append(f"{target}: {exc!r}")
                self._stop.wait(0.05)


class Writer:
    """Acknowledged writes, one after the other: the weight of one backend
    set to 1, 2, ..., 9, 1, ... (each a compare-and-swap on what it read).
    ``acknowledged`` is the last weight the control plane said it committed."""

    def __init__(self, endpoint: str, service: str, backend: str, figures: Figures) -> None:
        self.endpoint, self.service, self.backend = endpoint, service, backend
        self.figures = figures
        self.acknowledged: int | None = None
        self.possible: set[int] = set()  # the last acknowledged weight, and unanswered ones after it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _write(self) -> None:
        context = zmq.Context.instance()
        weight = 0
        while not self._stop.wait(0.02):
            weight = weight % 9 + 1
            sock = context.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.connect(self.endpoint)
                sock.send(encode_request("backend.set_weight", {"service": self.service, "id": self.backend,
                                                                "weight": weight}))
                if not sock.poll(1000):  # no answer: not acknowledged, whatever became of it
                    self.figures.unanswered_writes += 1
                    self.possible.add(weight)
                    continue
                reply = decode_reply(sock.recv())
                if reply["ok"]:
                    self.acknowledged = weight
                    self.possible = {weight}
                    self.figures.writes += 1
            finally:
                sock.close(0)


def weight_in_store(orch, service: str, backend: str) -> int:
    listed = json.loads(orch.lbctl("backend", "list", service, "--json").stdout)
    return next(b["weight"] for b in listed if b["id"] == backend)


def verify(endpoint: str) -> dict:
    """What ``lbctl verify`` asks, asked directly (a CLI start is 0.3 s)."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(encode_request("verify", {}))
        if not sock.poll(5000):
            return {"consistent": False, "violations": ["no answer"]}
        return decode_reply(sock.recv())["result"]
    finally:
        sock.close(0)


def seconds_to_converge(endpoint: str, nodes: int, limit_s: float = 15.0) -> float:
    """From now until verify hears all ``nodes`` and finds each on the
    store's version with its bytes, and fresh."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        result = verify(endpoint)
        if result["consistent"] and result["nodes"] == nodes:
            return time.monotonic() - start
        if os.environ.get("FAULTS_DEBUG"):
            print(f"{time.monotonic() - start:.2f} {result['violations']}")
        time.sleep(0.01)
    raise AssertionError(f"not consistent after {limit_s} s: {verify(endpoint)['violations']}")


def report(case: str, figures: Figures, converge_s: float | None, lost_writes: int) -> str:
    line = (f"FAULT {case}: {figures.connections} new connections, {len(figures.failed_connections)} failed; "
            f"{figures.transfer_rounds} transfer rounds, {len(figures.cut_transfers)} cut; "
            f"{figures.writes} acknowledged writes, {lost_writes} lost, "
            f"{figures.unanswered_writes} unanswered; "
            f"converged {'n/a' if converge_s is None else f'{converge_s:.2f} s'} after recovery")
    print("\n" + line)
    return line
