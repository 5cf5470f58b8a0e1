"""The node agent: owns the shared segment, supervises the worker processes,
handles one signal per concern, and has the planner (lbcore.planner) plan
and publish each image: from the file (static, SIGHUP) or from the control
plane (lbcore.link; in embedded mode the node starts it: lbcore.embedded).

SIGTERM/SIGINT  graceful stop: workers stop accepting and drain (bounded by
                node.drain_timeout_ms); the segment is unlinked; exit 0.
SIGHUP          reload the config file as a new version; a bad file is
                refused with its reason and the old image keeps serving.
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import zmq

from lbcore import PACKAGE_ROOT, layout
from lbcore._layout import ffi, lib
from lbcore.config import Config, ConfigError, load_config, parse_address
from lbcore.ejection import release_eject_locks
from lbcore.embedded import EmbeddedControlPlane
from lbcore.link import ControlLink
from lbcore.node_checks import NodeChecks
from lbcore.planner import Planner, localize
from lbcore.routing import Routing
from lbcore.segment import Segment
from lbcore.stats import format_stats, node_stats, report_counters, service_counters
from lbcore.wire import MAX_REPORT_BACKENDS, NodeHealth
from lbcore.worker import descriptors_needed

if TYPE_CHECKING:
    from lbcore.metrics import MetricsServer

READY_TIMEOUT_S = 15.0
RELOAD_ADOPT_TIMEOUT_S = 5.0
REAP_EVERY_S = 0.2  # besides on SIGCHLD
RAMPS_EVERY_S = 1.0  # slow start: the stamps of ramps that are over are cleared this often
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


@dataclass
class WorkerProcess:
    index: int
    process: subprocess.Popen[bytes]
    started: float
    restarts: int = 0


class NodeAgent:
    def __init__(self, config: Config, log: TextIO = sys.stderr) -> None:
        self._config = config  # until the segment exists; then the planner's (the published one)
        self._log_file = log
        self.listeners = Listeners()
        self.segment: Segment | None = None
        self.planner: Planner | None = None  # what is published, and what to publish next
        self.workers: dict[int, WorkerProcess] = {}
        self._respawn_at: dict[int, tuple[float, int]] = {}  # index -> (when, restarts)
        self._signals: set[int] = set()
        self._stopping = False
        self._next_reap = 0.0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.link: ControlLink | None = None  # services from a control plane
        self.embedded: EmbeddedControlPlane | None = None  # ... started by this node
        self.checks: NodeChecks | None = None  # probes and local verdicts (lbcore.node_checks)
        self.metrics: MetricsServer | None = None  # node.metrics: bound at start, served once ready
        self._next_health_note = 0.0
        self._next_ramps = 0.0

    @property
    def config(self) -> Config:
        return self.planner.config if self.planner is not None else self._config

    @property
    def version(self) -> int:
        return self.planner.version if self.planner is not None else 0

    def log(self, message: str) -> None:
        print(f"lbproxy[{self.config.node.id}]: {message}", file=self._log_file, flush=True)

    # ------------------------------------------------------------ workers

    def _spawn(self, index: int, restarts: int = 0) -> None:
        assert self.segment is not None
        node = self.config.node
        command = [sys.executable, "-m", "lbcore.worker_main", self.segment.path, str(index),
                   str(node.max_connections), str(node.drain_timeout_ms), str(os.getpid())]
        process = subprocess.Popen(command, close_fds=True, stdin=subprocess.DEVNULL, cwd=PACKAGE_ROOT)
        self.workers[index] = WorkerProcess(index, process, time.monotonic(), restarts)

    def _release_worker(self, index: int) -> None:
        """A worker is gone: its connections are gone with it, so take its
        share out of the node-wide active counts and out of the services'
        waiting counts (it can no longer race us). A waiting count left
        behind would queue every new connection of its service for ever."""
        assert self.segment is not None
        row = self.segment.worker_active[index]
        for slot in row.nonzero()[0]:
            lib.flc_add_i64(ffi.addressof(self.segment.counter_ptr(int(slot)), "active"),
                            -int(row[slot]))
        row[:] = 0
        waiting = worker_waiting(self.segment, index)
        states = ffi.cast("flc_service_state *", self.segment.base_pointer + layout.OFF_SERVICE_STATE)
        for slot in waiting.nonzero()[0]:
            lib.flc_add_i64(ffi.addressof(states[int(slot)], "waiting"), -int(waiting[slot]))
        waiting[:] = 0
        self.segment.workers[index] = 0
        release_eject_locks(self.segment, index)

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
        """Have every worker notice the current image now, not at its next
        accept or tick (so retired slots can be reused sooner)."""
        assert self.segment is not None
        for index, worker in self.workers.items():
            # A worker publishes its pid once SIGUSR1 reaches it as an event
            # (before that the signal would kill it); a younger one notices
            # the image as it starts anyway.
            registered = int(self.segment.workers[index]["pid"]) == worker.process.pid
            if registered and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGUSR1)

    def _wait_adopted(self, timeout: float) -> bool:
        """Wait until every worker listens on the current image's
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
        if self._config.node.control != "static":
            # services come from the control plane: start with none
            self._config = localize(self._config, ())
        if self._config.node.metrics:
            # imported only here: a node without metrics loads none of it
            from lbcore.metrics import MetricsServer
            self.metrics = MetricsServer.bind(self._config)  # first: an address in use starts nothing
        try:
            self.listeners.reserve(self._config)
            if self._config.node.control != "static":
                self._connect_control_plane()
            self.segment = Segment.create(self._config.node.id)
            self.planner = Planner(self._config, self.segment, self.workers.keys)
            self.planner.publish(self.planner.plan(self._config))
            node = self._config.node
            self.checks = NodeChecks(node.id, node.address, self.segment, self._wake_w)
            self._scale_workers()
            if not self._wait_adopted(READY_TIMEOUT_S):
                raise RuntimeError("workers did not come up (see their messages above)")
            if self.metrics is not None:
                self.metrics.serve(self.segment, self._stale)
        except BaseException:
            self.shutdown(drain=False)
            raise
        node = self.config.node
        listens = ", ".join(f"{s.name} on {s.listen}" for s in self.config.services) or "no services"
        self.log(f"ready: version {self.version}, {node.workers} workers, {listens}")

    def _stale(self) -> bool:
        """The control link's STALE state (False in static mode); read by
        the metrics thread, so one attribute read at a time."""
        link = self.link
        return link is not None and link.stale

    def _connect_control_plane(self) -> None:
        node = self._config.node
        control, subscribe = node.control, node.subscribe
        if node.control == "embedded":
            self.embedded = EmbeddedControlPlane(self._config.path, self.log)
            control, subscribe = self.embedded.control, self.embedded.publish
        try:
            self.link = ControlLink(node.id, node.max_staleness_ms, control, subscribe, self.log)
        except zmq.ZMQError as exc:  # what the endpoints' syntax check let through
            raise ConfigError(self._config.path, "node.control",
                              f"cannot connect to {control} / {subscribe}: {exc}") from None

    def apply_remote(self, routing: Routing) -> None:
        """Apply a snapshot from the control plane (newer than the applied
        one: see ControlLink), or refuse it and keep serving the old one."""
        assert self.link is not None and self.planner is not None
        listens_before = {s.listen for s in self.config.services}
        try:
            plan = self.planner.plan_routing(routing, self.link.routing)
            self.listeners.reserve(plan.config)
        except ConfigError as exc:
            self.log(f"snapshot version {routing.version} refused, "
                     f"still serving version {self.version}: {exc}")
            self.link.refuse(routing)
            return
        self.planner.publish(plan)
        if {s.listen for s in plan.config.services} != listens_before:
            self._wait_adopted(RELOAD_ADOPT_TIMEOUT_S)  # new listeners: listen before saying so
        # Otherwise workers are not woken: each takes the new version at its
        # next accept (one atomic load) or its 100 ms tick, whichever is first.
        self.link.applied(routing)
        self.log(f"applied: version {routing.version}")

    def _remote_counters(self) -> dict[str, Any] | None:
        """The counters, once every worker has taken up the image published
        (else None): counts of a version before could still grow, and the
        control plane takes them for this version's (a drain confirmed)."""
        assert self.segment is not None and self.planner is not None
        if not self.planner.workers_current():
            return None
        # the image it published: no copy back from shared memory
        return report_counters(self.segment, MAX_REPORT_BACKENDS, self.planner.image)

    def _queue_counters(self) -> dict[str, dict[str, int]]:
        assert self.segment is not None and self.planner is not None
        return service_counters(self.segment, self.planner.image)

    def reload(self) -> None:
        """Publish the file as the next version, or refuse it whole."""
        if self.config.node.control != "static":
            self.log("SIGHUP ignored: services come from the control plane (use lbctl)")
            return
        try:
            config = load_config(self.config.path)
            if config.node.id != self.config.node.id:
                raise ConfigError(config.path, "node.id", "cannot change on reload (restart the node)")
            if config.node.metrics != self.config.node.metrics:
                raise ConfigError(config.path, "node.metrics", "changes need a restart")
            check_descriptors(config)
            assert self.planner is not None
            plan = self.planner.plan(config)
            self.listeners.reserve(config)
        except ConfigError as exc:
            self.log(f"reload refused, still serving version {self.version}: {exc}")
            return
        before = self.config.node
        self.planner.publish(plan)
        if self.checks is not None:
            self.checks.prober.source_ip = config.node.address  # probes leave from where connections do
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
        if self.checks is not None:
            self.checks.close()
            self.checks = None
        self.listeners.close()
        if self.metrics is not None:  # before the segment goes: its scrapes read it
            self.metrics.close()
            self.metrics = None
        if self.link is not None:
            self.link.close()
            self.link = None
        if self.embedded is not None:
            self.embedded.close()
            self.embedded = None
        if self.segment is not None:
            self.segment.unlink()
            self.segment.close()
            self.segment = None
            self.planner = None

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
        if self.link is not None:
            poller.register(self.link.poll_fd(), select.POLLIN)
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
            if self.link is not None:
                update = self.link.receive()
                if update is not None:
                    self.apply_remote(update)
                if self.embedded is not None:
                    self.embedded.supervise()
            self._health_step()
            if self.planner is not None and time.monotonic() >= self._next_ramps:
                self._next_ramps = time.monotonic() + RAMPS_EVERY_S
                self.planner.end_ramps()
            if self.link is not None:
                self.link.tick(self._remote_counters, self._node_health, self._queue_counters)

    def _health_step(self) -> None:
        """Probe what this node is to probe, say what changed, and apply the
        node's own verdicts where they are the ones (static mode, STALE)."""
        checks, planner = self.checks, self.planner
        if checks is None or planner is None:
            return
        link = self.link
        if link is None:
            checks.assign_static(self.config.services, planner.backend_slots)
            checks.prober.take_changes()  # no one to tell
            checks.apply_local(True)
            if time.monotonic() >= self._next_health_note:  # no report to carry it: panics logged here
                self._next_health_note = time.monotonic() + 1.0
                checks.node_health(planner.image, self.log)
            return
        routing = link.routing
        # STALE: every checked backend, as in static mode: the node's own
        # verdicts are then the ones that apply (I7), on all of them
        checks.assign(lambda: ((s.name, s.health, s.backends.values()) for s in routing.services.values()),
                      planner.backend_slots, routing, None if link.stale else link.nodes)
        if link.resend_health:
            link.resend_health = False
            checks.prober.take_changes()
            link.send_results(dict(checks.prober.results()), replace=True)
        else:
            changes = checks.prober.take_changes()
            if changes:
                link.send_results(changes)
        checks.apply_local(link.stale)

    def _node_health(self) -> NodeHealth | None:
        if self.checks is None or self.planner is None:
            return None
        return self.checks.node_health(self.planner.image, self.log)


def serve(config: Config, log: TextIO = sys.stderr,
          on_ready: Callable[[NodeAgent], None] | None = None) -> int:
    """Run a node until it is stopped; whatever happens, nothing it started
    is left behind (workers, listeners, the shared-memory segment)."""
    check_descriptors(config)
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


def worker_waiting(segment: Segment, index: int) -> np.ndarray:
    """Worker ``index``'s share of each service's waiting count, as an
    int32 view over the segment (one per service slot)."""
    if not 0 <= index < layout.MAX_WORKERS:
        raise ValueError(f"worker index {index} out of range")
    start = segment.base_pointer + layout.OFF_WORKER_WAITING + index * layout.MAX_SERVICES * 4
    return np.frombuffer(ffi.buffer(start, layout.MAX_SERVICES * 4), dtype="<i4")


def check_descriptors(config: Config) -> None:
    """ConfigError when a worker could need more descriptors than a process
    here may open: its connections past that would wait unanswered in the
    accept queue. Start, ``check`` and reload all ask this."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    need = descriptors_needed(config.node.max_connections)
    if hard != resource.RLIM_INFINITY and need > hard:
        most = max(0, (hard - descriptors_needed(0)) // 2)
        raise ConfigError(config.path, "node.max_connections",
                          f"{config.node.max_connections} connections per worker need {need} descriptors, "
                          f"more than the {hard} a process may open here (ulimit -Hn): at most {most}")


def raise_descriptor_limit() -> None:
    """Workers inherit the limit: each connection costs them two descriptors
    and a pipe pair in flight, so take the hard limit, not the usual 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
