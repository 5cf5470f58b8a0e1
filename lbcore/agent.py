"""The node agent: owns the shared segment, publishes snapshots, supervises
the worker processes, and handles one signal per concern.

SIGTERM/SIGINT  graceful stop: workers stop accepting and drain (bounded by
                node.drain_timeout_ms); the segment is unlinked; exit 0.
SIGHUP          reload the config file as a new snapshot version; a bad file
                is refused with its reason and the old snapshot keeps serving.
SIGUSR1         print the node's counters (as ``lbproxy stats``) to stderr.
A worker that dies is replaced; its share of the active counts is released.
"""
from __future__ import annotations

import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from lbcore import layout
from lbcore._layout import ffi, lib
from lbcore.config import Config, ConfigError, Service, load_config, parse_address
from lbcore.image import Image, image_of_config, patched_tables, publish_image
from lbcore.remote import Remote, localize
from lbcore.routing import Routing, rows_changed
from lbcore.segment import Segment
from lbcore.slots import SlotMap
from lbcore.stats import format_stats, node_stats, report_counters

PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
READY_TIMEOUT_S = 15.0
RELOAD_ADOPT_TIMEOUT_S = 5.0
REPORT_BACKENDS = 500  # beyond, a node's report sums its counters per service
REAP_EVERY_S = 0.2  # besides on SIGCHLD
RESPAWN_BACKOFF_S = (0.0, 0.1, 0.5, 1.0, 2.0, 5.0)
STOP_GRACE_S = 2.0


class Listeners:
    """Listen addresses held by the agent: bound with SO_REUSEPORT but never
    listening, so a port in use is found before anything starts, and stays
    ours while workers come and go."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, int], socket.socket] = {}

    def reserve(self, config: Config) -> None:
        """Hold every listen address of ``config``, release the others.
        ConfigError (nothing changed) when one is in use by someone else."""
        wanted = {parse_address(s.listen): i for i, s in enumerate(config.services)}
        fresh: dict[tuple[str, int], socket.socket] = {}
        try:
            for address, i in wanted.items():
                if address not in self._held:
                    fresh[address] = self._bind(config.path, i, address)
        except ConfigError:
            for sock in fresh.values():
                sock.close()
            raise
        for address in list(self._held):
            if address not in wanted:
                self._held.pop(address).close()
        self._held.update(fresh)

    @staticmethod
    def _bind(file: str, index: int, address: tuple[str, int]) -> socket.socket:
        # SO_REUSEPORT would let us share a port with any other process of
        # this user that set it too (another node): first make sure that
        # nobody holds the address, with a bind that shares it with no one.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise ConfigError(file, f"service[{index}].listen",
                                  f"{address[0]}:{address[1]} cannot be bound: {exc.strerror}") from None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise ConfigError(file, f"service[{index}].listen",
                              f"{address[0]}:{address[1]} cannot be bound: {exc.strerror}") from None
        return sock

    def close(self) -> None:
        for sock in self._held.values():
            sock.close()
        self._held.clear()


@dataclass(frozen=True)
class Plan:
    config: Config
    image: Image
    service_slots: SlotMap[str]
    backend_slots: SlotMap[tuple[str, str]]
    fresh_services: list[int]
    fresh_backends: list[int]


@dataclass
class WorkerProcess:
    index: int
    process: subprocess.Popen[bytes]
    started: float
    restarts: int = 0


class NodeAgent:
    def __init__(self, config: Config, log: TextIO = sys.stderr) -> None:
        self.config = config
        self._log_file = log
        self.listeners = Listeners()
        self.segment: Segment | None = None
        self.version = 0
        self.image: Image | None = None  # the one published
        self.service_slots: SlotMap[str] = SlotMap(layout.MAX_SERVICES)
        self.backend_slots: SlotMap[tuple[str, str]] = SlotMap(layout.MAX_BACKENDS)
        self.workers: dict[int, WorkerProcess] = {}
        self._respawn_at: dict[int, tuple[float, int]] = {}  # index -> (when, restarts)
        self._signals: set[int] = set()
        self._service_retired_since: dict[int, float] = {}
        self._stopping = False
        self._next_reap = 0.0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.remote: Remote | None = None  # services from a control plane

    def log(self, message: str) -> None:
        print(f"lbproxy[{self.config.node.id}]: {message}", file=self._log_file, flush=True)

    # ------------------------------------------------------------ snapshots

    def _workers_current(self) -> bool:
        """Every worker has noticed the current generation: none still picks
        from an older buffer."""
        assert self.segment is not None
        current = self.segment.generation()
        return all(int(self.segment.workers[i]["generation"]) >= current for i in self.workers)

    def _backend_slot_releasable(self, slot: int) -> bool:
        """A retired backend slot may be reused once nothing refers to it: no
        open connection, and every worker past the snapshot that dropped it."""
        assert self.segment is not None
        return int(self.segment.counters[slot]["active"]) == 0 and self._workers_current()

    def _service_slot_releasable(self, slot: int) -> bool:
        """A removed service's slot may serve another service once every
        worker is past the snapshot that removed it and no connection of the
        old service can still be between connect retries."""
        since = self._service_retired_since.setdefault(slot, time.monotonic())
        node = self.config.node
        setup_window = node.connect_timeout_ms * (node.retries + 1) / 1000 + 1.0
        if self._workers_current() and time.monotonic() - since >= setup_window:
            del self._service_retired_since[slot]
            return True
        return False

    def _plan(self, config: Config, version: int | None = None,
              changed: Mapping[str, frozenset[str]] | None = None) -> Plan:
        """Everything a publish of ``config`` needs, changing nothing yet:
        ConfigError when it cannot be built (the node keeps what it has).
        ``changed``: per service, the only backend rows that differ from
        the published snapshot, ids and their order unchanged (from a delta)."""
        service_slots, backend_slots = self.service_slots, self.backend_slots
        fresh_services: list[int] = []
        fresh_backends: list[int] = []
        same_names = [s.name for s in self.config.services] == [s.name for s in config.services]
        try:
            if not same_names or self.image is None:
                service_slots = service_slots.copy()
                fresh_services = service_slots.assign((s.name for s in config.services),
                                                      self._service_slot_releasable)
            same_keys = changed is not None and same_names and len(changed) == len(config.services)
            if self.image is None or not (same_keys or _same_backends(self.config.services, config.services)):
                backend_slots = backend_slots.copy()
                fresh_backends = backend_slots.assign(
                    ((s.name, b.id) for s in config.services for b in s.backends),
                    self._backend_slot_releasable)
        except ValueError as exc:
            raise ConfigError(config.path, "service", str(exc)) from None
        version = self.version + 1 if version is None else version
        previous = self.image.parts if self.image is not None else None
        image = image_of_config(config, version, service_slots, backend_slots, previous, changed)
        return Plan(config, image, service_slots, backend_slots, fresh_services, fresh_backends)

    def _plan_rows(self, routing: Routing, rewritten: Mapping[str, frozenset[str]]) -> Plan:
        """The plan of ``routing`` when it rewrote only the rows ``rewritten``
        names since the published snapshot (Routing.rewritten_rows): those
        rows patched into the published tables. The config is kept as it is:
        services, ids and order are unchanged; the values of its patched
        rows are then older than the snapshot's, and nothing reads them (the
        next config built whole is compared with the tables by identity:
        see patched_tables)."""
        assert self.image is not None
        parts = dict(self.image.parts)
        for name, ids in rewritten.items():
            if ids:
                parts[name] = patched_tables(parts[name], {i: routing.backend(name, i) for i in ids})
        image = image_of_config(self.config, routing.version, self.service_slots, self.backend_slots,
                                     parts)
        return Plan(self.config, image, self.service_slots, self.backend_slots, [], [])

    def _apply(self, plan: Plan) -> None:
        """Publish a plan. A slot given to a new service or backend starts
        from zero: nothing refers to it any more (see the slot maps)."""
        assert self.segment is not None
        for slot in plan.fresh_backends:
            self.segment.counters[slot] = 0
        for slot in plan.fresh_services:
            self.segment.service_states[slot] = 0
        publish_image(self.segment, plan.image)
        self.service_slots, self.backend_slots = plan.service_slots, plan.backend_slots
        self.image = plan.image
        self.version = plan.image.version
        self.config = plan.config

    # ------------------------------------------------------------ workers

    def _spawn(self, index: int, restarts: int = 0) -> None:
        assert self.segment is not None
        node = self.config.node
        command = [sys.executable, "-m", "lbcore.worker_main", self.segment.path, str(index),
                   str(node.max_connections), str(node.drain_timeout_ms), str(os.getpid())]
        # Run from the directory that holds this very lbcore package, so that
        # `-m` finds it and not a source tree that happens to be the cwd.
        process = subprocess.Popen(command, close_fds=True, stdin=subprocess.DEVNULL, cwd=PACKAGE_ROOT)
        self.workers[index] = WorkerProcess(index, process, time.monotonic(), restarts)

    def _release_worker(self, index: int) -> None:
        """A worker is gone: its connections are gone with it, so take its
        share out of the node-wide active counts (it can no longer race us)."""
        assert self.segment is not None
        row = self.segment.worker_active[index]
        for slot in row.nonzero()[0]:
            lib.flc_add_i64(ffi.addressof(self.segment.counter_ptr(int(slot)), "active"),
                            -int(row[slot]))
        row[:] = 0
        self.segment.workers[index] = 0

    def _reap(self) -> None:
        for index, worker in list(self.workers.items()):
            status = worker.process.poll()
            if status is None:
                continue
            del self.workers[index]
            self._release_worker(index)
            if self._stopping or index >= self.config.node.workers:
                continue
            self.log(f"worker {index} (pid {worker.process.pid}) exited with status {status}; restarting")
            quick = time.monotonic() - worker.started < 1.0
            restarts = worker.restarts + 1 if quick else 0
            delay = RESPAWN_BACKOFF_S[min(restarts, len(RESPAWN_BACKOFF_S) - 1)]
            self._respawn_at[index] = (time.monotonic() + delay, restarts)

    def _respawn_due(self) -> None:
        for index, (when, restarts) in list(self._respawn_at.items()):
            if time.monotonic() >= when and not self._stopping:
                del self._respawn_at[index]
                self._spawn(index, restarts)

    def _scale_workers(self) -> None:
        wanted = self.config.node.workers
        for index in range(wanted):
            if index not in self.workers and index not in self._respawn_at:
                self._spawn(index)
        for index, worker in self.workers.items():
            if index >= wanted and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)

    def _nudge_workers(self) -> None:
        """Have every worker notice the current snapshot now, not at its next
        accept or tick (so retired slots can be reused sooner)."""
        assert self.segment is not None
        for index, worker in self.workers.items():
            # A worker publishes its pid once SIGUSR1 reaches it as an event
            # (before that the signal would kill it); a younger one notices
            # the snapshot as it starts anyway.
            registered = int(self.segment.workers[index]["pid"]) == worker.process.pid
            if registered and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGUSR1)

    def _wait_adopted(self, timeout: float) -> bool:
        """Wait until every worker listens on the current snapshot's
        addresses; False on timeout or when a worker died meanwhile."""
        assert self.segment is not None
        deadline = time.monotonic() + timeout
        generation = self.segment.generation()
        self._nudge_workers()
        while time.monotonic() < deadline:
            states = [self.segment.workers[i] for i in self.workers]
            if len(states) >= self.config.node.workers and all(
                    int(s["listening"]) == 1 and int(s["generation"]) == generation for s in states):
                return True
            if any(w.process.poll() is not None for w in self.workers.values()):
                return False
            time.sleep(0.005)
        return False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Reserve listeners, create the segment, publish, start workers.
        Raises ConfigError / SegmentError / RuntimeError; leaves nothing behind."""
        if self.config.node.control != "static":
            # services come from the control plane: start with none
            self.config = localize(self.config, ())
        self.listeners.reserve(self.config)
        try:
            if self.config.node.control != "static":
                self.remote = Remote(self.config, self.log)
            self.segment = Segment.create(self.config.node.id)
            self._apply(self._plan(self.config))
            self._scale_workers()
            if not self._wait_adopted(READY_TIMEOUT_S):
                raise RuntimeError("workers did not come up (see their messages above)")
        except BaseException:
            self.shutdown(drain=False)
            raise
        node = self.config.node
        listens = ", ".join(f"{s.name} on {s.listen}" for s in self.config.services) or "no services"
        self.log(f"ready: version {self.version}, {node.workers} workers, {listens}")

    def apply_remote(self, routing: Routing) -> None:
        """Apply a snapshot from the control plane (newer than the applied
        one: see ControlLink), or refuse it and keep serving the old one."""
        assert self.remote is not None
        held = self.remote.link.routing
        rewritten = routing.rewritten_rows(held) if self.version == held.version else None
        config = self.config if rewritten is not None else localize(self.config, routing.as_services())
        listens_before = {s.listen for s in self.config.services}
        try:
            if rewritten is not None:  # rows only: patched in, and the routing stays thin
                plan = self._plan_rows(routing, rewritten)
            else:
                plan = self._plan(config, routing.version, rows_changed(held, routing))
            self.listeners.reserve(config)
        except ConfigError as exc:
            self.log(f"snapshot version {routing.version} refused, "
                     f"still serving version {self.version}: {exc}")
            self.remote.link.refuse(routing.version)
            return
        self._apply(plan)
        if {s.listen for s in config.services} != listens_before:
            self._wait_adopted(RELOAD_ADOPT_TIMEOUT_S)  # new listeners: listen before saying so
        # Otherwise workers are not woken: each takes the new version at its
        # next accept (one atomic load) or its 100 ms tick, whichever is first.
        self.remote.applied(routing)
        self.log(f"applied: version {routing.version}")

    def _remote_counters(self) -> dict[str, Any]:
        assert self.segment is not None
        return report_counters(self.segment, REPORT_BACKENDS, self.image)  # what it published: no copy back

    def reload(self) -> None:
        """Publish the file as the next version, or refuse it whole."""
        if self.config.node.control != "static":
            self.log("SIGHUP ignored: services come from the control plane (use lbctl)")
            return
        try:
            config = load_config(self.config.path)
            if config.node.id != self.config.node.id:
                raise ConfigError(config.path, "node.id", "cannot change on reload (restart the node)")
            plan = self._plan(config)
            self.listeners.reserve(config)
        except ConfigError as exc:
            self.log(f"reload refused, still serving version {self.version}: {exc}")
            return
        before = self.config.node
        self._apply(plan)
        if (before.max_connections, before.drain_timeout_ms) != (
                config.node.max_connections, config.node.drain_timeout_ms):
            self.log("node.max_connections and node.drain_timeout_ms apply to workers started "
                     "from now on; running workers keep theirs until restarted")
        self._scale_workers()
        if self._wait_adopted(RELOAD_ADOPT_TIMEOUT_S):
            self.log(f"reloaded: version {self.version}")
        else:
            self.log(f"reloaded: version {self.version} (some workers have not taken it up yet)")

    def shutdown(self, drain: bool) -> None:
        self._stopping = True
        if self.segment is not None:
            self.segment.control["draining"] = 1
        for worker in self.workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        grace = self.config.node.drain_timeout_ms / 1000 + STOP_GRACE_S if drain else STOP_GRACE_S
        deadline = time.monotonic() + grace
        for worker in self.workers.values():
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        self.workers.clear()
        self.listeners.close()
        if self.remote is not None:
            self.remote.close()
            self.remote = None
        if self.segment is not None:
            self.segment.unlink()
            self.segment.close()
            self.segment = None

    def install_signal_handlers(self) -> None:
        """Signals only set flags (handled by the loop in run()); installed
        before start() so that a SIGTERM during start-up is a clean stop."""

        def remember(signum: int, _frame: object) -> None:
            self._signals.add(signum)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(signum, remember)
        signal.set_wakeup_fd(self._wake_w)

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT. Call after start()."""
        # A plain poll on the descriptors: the SUB socket's ZMQ_FD signals
        # an edge, and every wake drains the socket until ZMQ_EVENTS says it
        # is empty (ControlLink.receive), so no message waits for a timeout.
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if self.remote is not None:
            poller.register(self.remote.poll_fd(), select.POLLIN)
        while True:
            if any(fd == self._wake_r for fd, _ in poller.poll(200)):
                try:
                    os.read(self._wake_r, 512)
                except BlockingIOError:
                    pass
            received, self._signals = self._signals, set()
            if received & {signal.SIGTERM, signal.SIGINT}:
                self.log("stopping: draining open connections")
                self.shutdown(drain=True)
                self.log("stopped")
                return 0
            if signal.SIGHUP in received:
                self.reload()
            if signal.SIGUSR1 in received:
                assert self.segment is not None
                print(format_stats(node_stats(self.segment)), file=self._log_file, flush=True)
            if signal.SIGCHLD in received or time.monotonic() >= self._next_reap:
                self._reap()  # a process check per worker: not on every message
                self._next_reap = time.monotonic() + REAP_EVERY_S
            self._respawn_due()
            if self.remote is not None:
                update = self.remote.next_snapshot()
                if update is not None:
                    self.apply_remote(update)
                self.remote.supervise()
                self.remote.tick(self._remote_counters)


def _same_backends(old: tuple[Service, ...], new: tuple[Service, ...]) -> bool:
    """The same (service, backend) keys in the same order: the slots stand
    as they are (a weight or address change, the common update)."""
    return [s.name for s in old] == [s.name for s in new] and all(
        a.backends is b.backends or [x.id for x in a.backends] == [y.id for y in b.backends]
        for a, b in zip(old, new, strict=True))


def serve(config: Config, log: TextIO = sys.stderr,
          on_ready: Callable[[NodeAgent], None] | None = None) -> int:
    """Run a node until it is stopped; whatever happens, nothing it started
    is left behind (workers, listeners, the shared-memory segment)."""
    raise_descriptor_limit()
    agent = NodeAgent(config, log)
    agent.install_signal_handlers()
    try:
        agent.start()
        if on_ready is not None:
            on_ready(agent)
        return agent.run()
    finally:
        agent.shutdown(drain=False)


def raise_descriptor_limit() -> None:
    """Workers inherit the limit: each connection costs them two descriptors
    and a pipe pair in flight, so take the hard limit, not the usual 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
