"""Helpers of the health tests (test_e2e_health.py): config files with
[service.health] and [service.outlier] tables, a control plane started from
one, the control plane's answers read directly over its control socket (a
CLI start costs 0.3 s: too coarse to time a verdict), scripted backends in
threads of the test process, paced client load, and a node's counters read
from its shared memory (what ``lbproxy stats --json`` prints).

Everything binds loopback only; every loop is bounded in count or time.
"""
from __future__ import annotations

import json
import random
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from e2e_support import Client, Orchestrator, toml_value, wait_until

from lbcore.segment import Segment
from lbcore.stats import node_stats
from lbcore.wire import decode_reply, encode_request

HEALTH_SHOW_KEYS = {"service", "id", "state", "since", "revision", "source", "counter", "probers",
                    "ejected_by", "flaps", "held_until"}
HEALTH_KEYS = {"kind", "interval_ms", "timeout_ms", "rise", "fall", "probers", "jitter_percent", "path",
               "expect", "port"}
OUTLIER_KEYS = {"consecutive_failures", "base_ejection_ms", "max_ejection_ms", "max_ejection_percent"}
REASON_KEYS = ("membership:", "health:", "weight:", "ejected:", "flapping:")


# ---------------------------------------------------------------- config files


def render_services(services: list[dict[str, Any]]) -> str:
    """[[service]] tables: each service a dict (e2e_support.service) whose
    optional "health" and "outlier" dicts become [service.health] and
    [service.outlier], written after the service's backends."""
    lines: list[str] = []
    for svc in services:
        lines += ["", "[[service]]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in svc.items()
                  if k not in ("backends", "health", "outlier")]
        for backend in svc.get("backends", []):
            lines += ["", "[[service.backend]]"]
            lines += [f"{k} = {toml_value(v)}" for k, v in backend.items()]
        for table in ("health", "outlier"):
            if table in svc:
                lines += ["", f"[service.{table}]"]
                lines += [f"{k} = {toml_value(v)}" for k, v in svc[table].items()]
    return "\n".join(lines) + "\n"


def render_node_config(node: dict[str, Any], services: list[dict[str, Any]]) -> str:
    node_table = "".join(f"{k} = {toml_value(v)}\n" for k, v in node.items())
    return "[node]\n" + node_table + render_services(services)


def quiet_port(host: str = "127.0.0.1") -> int:
    """A free port below the kernel's ephemeral range: a backend that stops
    listening and listens again on it later does not find it taken by
    some connection's local end meanwhile."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = min(low, 32768)
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


# ---------------------------------------------------------------- the control plane


class HealthOrchestrator(Orchestrator):
    """lborch seeded from services that may carry health and outlier tables."""

    def __init__(self, workdir: Path, services: list[dict[str, Any]], heartbeat_ms: int = 500) -> None:
        super().__init__(workdir, [])
        self.heartbeat_ms = heartbeat_ms
        self.config.write_text(
            render_node_config({"id": "orch"}, services)
            + f'\n[orchestrator]\nstore = "sqlite:///{workdir / "state.db"}"\n'
              f'control = "tcp://127.0.0.1:{self.control}"\npublish = "tcp://127.0.0.1:{self.publish}"\n'
              f"heartbeat_ms = {heartbeat_ms}\n")

    def kill(self) -> None:
        """kill -9, reaped."""
        assert self.process is not None and self.process.poll() is None
        self.process.kill()
        self.process.wait(10)

    # -- the control socket, asked directly (what lbctl sends)

    def ask(self, verb: str, args: dict[str, Any] | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """The reply ({"ok", "result" | "error"}) to one request."""
        return ask(self.endpoint, verb, args or {}, timeout)

    def result(self, verb: str, args: dict[str, Any] | None = None) -> Any:
        reply = self.ask(verb, args)
        assert reply["ok"], f"{verb} refused: {reply}"
        return reply["result"]

    def health(self) -> list[dict[str, Any]]:
        """What ``lbctl health show --json`` prints: one object per backend."""
        return self.result("health.show")

    def version(self) -> int:
        return int(self.result("version")["version"])

    def snapshot(self) -> dict[str, Any]:
        """The published routing snapshot (``lbctl snapshot show``), decoded."""
        return json.loads(self.result("snapshot.get")["snapshot"])

    # -- lbctl

    def lbctl_json(self, *args: str) -> Any:
        done = self.lbctl(*args, "--json")
        assert done.returncode == 0, f"lbctl {' '.join(args)} exited {done.returncode}: {done.stderr}"
        return json.loads(done.stdout)

    def explain(self, service: str, backend: str) -> dict[str, Any]:
        """``lbctl explain SERVICE BACKEND --json``."""
        return self.lbctl_json("explain", service, backend)


def ask(endpoint: str, verb: str, args: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(encode_request(verb, args))
        assert sock.poll(int(timeout * 1000)), f"no answer to {verb} from {endpoint} within {timeout} s"
        return decode_reply(sock.recv())
    finally:
        sock.close(0)


# ---------------------------------------------------------------- health show entries


def entry(entries: list[dict[str, Any]], backend: str, service: str | None = None) -> dict[str, Any] | None:
    """The ``health show`` object of one backend, or None."""
    for e in entries:
        if isinstance(e, dict) and e.get("id") == backend and service in (None, e.get("service")):
            return e
    return None


def state_of(orch: HealthOrchestrator, backend: str) -> str | None:
    e = entry(orch.health(), backend)
    return None if e is None else e.get("state")


def prober_results(e: dict[str, Any] | None) -> dict[str, str | None]:
    """node -> its last result ("up", "down" or None), from a health show object."""
    if e is None or not isinstance(e.get("probers"), list):
        return {}
    return {p.get("node"): p.get("result") for p in e["probers"] if isinstance(p, dict)}


def wait_state(orch: HealthOrchestrator, backend: str, state: str, timeout: float,
               all_probers: str | None = None) -> dict[str, Any]:
    """Wait until ``health show`` says ``backend`` is ``state`` (and, with
    ``all_probers``, that it has probers and every one's result is that);
    the object is returned."""
    def reached() -> dict[str, Any] | None:
        e = entry(orch.health(), backend)
        if e is None or e.get("state") != state:
            return None
        results = prober_results(e)
        if all_probers is not None and (not results or set(results.values()) != {all_probers}):
            return None
        return e

    return wait_until(reached, timeout, interval=0.05,
                      message=lambda: f"{backend} {state} in health show: {json.dumps(orch.health())}")


def reasons(explained: dict[str, Any], key: str) -> list[str]:
    return [r for r in explained.get("reasons", []) if isinstance(r, str) and r.startswith(key)]


# ---------------------------------------------------------------- a node's counters


def node_counters(node: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """(service, backend) -> its row of ``lbproxy stats --json`` (active,
    total, failed, eligible, ...), read from the node's segment directly."""
    segment = Segment.attach(node.node_id)
    try:
        stats = node_stats(segment)
    finally:
        segment.close()
    return {(s["name"], b["id"]): b for s in stats["services"] for b in s["backends"]}


def failed(node: Any, service: str, backend: str) -> int:
    return int(node_counters(node)[(service, backend)]["failed"])


# ---------------------------------------------------------------- scripted backends


class Server:
    """A listener on HOST:PORT in a thread of the test process. Each
    accepted connection is counted by its peer's address and handed to
    ``respond(sock, peer_ip)`` in a thread of its own (its socket times
    out after 3 s). ``set_listening(False)`` closes the listener (the port
    refuses connections), ``set_listening(True)`` listens on it again."""

    def __init__(self, name: str, respond: Callable[[Server, socket.socket, str], None],
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.name, self.respond, self.host = name, respond, host
        self.accepted: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []  # (peer, first line) of the HTTP requests read
        self.refused_peers: set[str] = set()      # answered 503 by http_by_peer
        self._lock = threading.Lock()
        self._want = True
        self._applied = threading.Event()
        self._stop = threading.Event()
        self._listener: socket.socket | None = self._bind(port or quiet_port(host))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _bind(self, port: int) -> socket.socket:
        deadline = time.monotonic() + 3
        while True:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.host, port))
                s.listen(1024)
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
                continue
            s.setblocking(False)
            return s

    def set_listening(self, on: bool, timeout: float = 5.0) -> None:
        with self._lock:
            self._want = on
            self._applied.clear()
        assert self._applied.wait(timeout), f"{self.name}: listening={on} not applied in {timeout} s"

    def refuse(self, peers: set[str]) -> None:
        """http_by_peer answers 503 to these peer addresses from now on."""
        with self._lock:
            self.refused_peers = set(peers)

    def counted(self) -> Counter[str]:
        with self._lock:
            return Counter(self.accepted)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if self._want and self._listener is None:
                    self._listener = self._bind(self.port)
                elif not self._want and self._listener is not None:
                    self._listener.close()
                    self._listener = None
                listener = self._listener
                self._applied.set()
            if listener is None:
                self._stop.wait(0.005)
                continue
            ready, _, _ = select.select([listener], [], [], 0.01)
            if not ready:
                continue
            for _ in range(64):
                try:
                    sock, (peer, _port) = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                with self._lock:
                    self.accepted[peer] += 1
                sock.settimeout(3)
                threading.Thread(target=self._serve, args=(sock, peer), daemon=True).start()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        try:
            self.respond(self, sock, peer)
        except OSError:
            pass
        finally:
            sock.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None


def ident_then_close(server: Server, sock: socket.socket, peer: str) -> None:
    """A client is served when it reads this backend's name: ``NAME\\n``."""
    sock.sendall(f"{server.name}\n".encode())
    sock.shutdown(socket.SHUT_WR)


def close_at_once(server: Server, sock: socket.socket, peer: str) -> None:
    """Accept and close: what a tcp check needs."""


def _read_request(server: Server, sock: socket.socket, peer: str) -> bool:
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        data += chunk
    with server._lock:
        server.requests.append((peer, data.split(b"\r\n", 1)[0].decode(errors="replace")))
    return True


def http_status(status: int) -> Callable[[Server, socket.socket, str], None]:
    """Read one request, answer ``status`` with an empty body, close."""
    def respond(server: Server, sock: socket.socket, peer: str) -> None:
        if _read_request(server, sock, peer):
            _answer(sock, status)
    return respond


def http_by_peer(server: Server, sock: socket.socket, peer: str) -> None:
    """200, or 503 to the peers in ``server.refused_peers``."""
    if _read_request(server, sock, peer):
        with server._lock:
            refused = peer in server.refused_peers
        _answer(sock, 503 if refused else 200)


def _answer(sock: socket.socket, status: int) -> None:
    text = {200: "OK", 500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Status")
    sock.sendall(f"HTTP/1.0 {status} {text}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
    sock.shutdown(socket.SHUT_WR)


# ---------------------------------------------------------------- client load


@dataclass(frozen=True)
class Attempt:
    start: float       # time.monotonic() when the client connected
    target: str
    served_by: str | None  # the backend's name, read first
    error: str | None


class Load:
    """New client connections paced at ``rate`` a second over ``targets``
    (``threads`` threads, one connection at a time each: at most
    ``threads`` in flight). Each connection reads the backend's name line
    and, with ``echo``, checks one echoed line: served, or failed."""

    def __init__(self, targets: list[str], rate: float, threads: int = 4, echo: bool = True,
                 limit_s: float = 120.0) -> None:
        self.targets, self.echo, self.limit_s = targets, echo, limit_s
        self.period = threads / rate
        self.attempts: list[Attempt] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(targets[i % len(targets)],), daemon=True)
                         for i in range(threads)]
        self.started = self.stopped = 0.0

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        if not self.stopped:
            self.stopped = time.monotonic()

    def _run(self, target: str) -> None:
        deadline = time.monotonic() + self.limit_s
        due = time.monotonic() + random.random() * self.period
        n = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            delay = due - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            due = max(due + self.period, time.monotonic() - self.period)
            n += 1
            start = time.monotonic()
            try:
                with Client(target, timeout=5) as c:
                    name = c.ident()
                    if self.echo:
                        line = b"ping %d\n" % n
                        if c.echo(line) != line:
                            raise AssertionError("echo altered")
                self.attempts.append(Attempt(start, target, name, None))
            except (OSError, EOFError, AssertionError) as exc:
                self.attempts.append(Attempt(start, target, None, repr(exc)))

    def since(self, t: float) -> list[Attempt]:
        return [a for a in list(self.attempts) if a.start >= t]

    def failures(self, after: float | None = None, before: float | None = None) -> list[Attempt]:
        return [a for a in list(self.attempts) if a.error is not None
                and (after is None or a.start >= after) and (before is None or a.start < before)]

    def rate(self) -> float:
        end = self.stopped or time.monotonic()
        return len(self.attempts) / max(1e-3, end - self.started)


def one_client(target: str, echo: bool = False, timeout: float = 5.0) -> str | None:
    """One connection: the backend's name, or None when it was not served."""
    try:
        with Client(target, timeout=timeout) as c:
            name = c.ident()
            if echo and c.echo(b"x\n") != b"x\n":
                return None
            return name
    except (OSError, EOFError, AssertionError):
        return None
