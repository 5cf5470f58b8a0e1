"""A node whose services come from a control plane (node.control = tcp://…
or "embedded"): applying snapshots, reporting, staleness (I7).

In embedded mode the node starts the control plane as a child process
(``python -m orchestrator.cli -c FILE``, the same file) rather than importing
it, so one command runs exactly the processes of a real deployment; the node
restarts it if it dies, and serves its last snapshot meanwhile.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from lbcore.config import Config, ConfigError, tomllib
from lbcore.link import ControlLink
from lbcore.routing import Routing

REPORT_INTERVAL_S = 0.5
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def endpoints(config: Config) -> tuple[str, str]:
    """(control, subscribe) of a node that has a control plane."""
    node = config.node
    if node.control != "embedded":
        return node.control, node.subscribe
    document = tomllib.loads(Path(config.path).read_text())
    table = document.get("orchestrator")
    if not isinstance(table, dict) or not isinstance(table.get("control"), str) \
            or not isinstance(table.get("publish"), str):
        raise ConfigError(config.path, "orchestrator",
                          'control = "embedded" needs an [orchestrator] table with control and publish')
    return table["control"], table["publish"]


class Remote:
    """The agent's side of the control plane: link, staleness, embedded child."""

    def __init__(self, config: Config, log: Callable[[str], None]) -> None:
        self.config = config
        self.log = log
        control, subscribe = endpoints(config)
        self.child: subprocess.Popen[bytes] | None = None
        self._child_started = 0.0
        if config.node.control == "embedded":
            self._check_child_config()
            self._start_child()
        self.link = ControlLink(control, subscribe, log)
        self._stale = False
        self._next_report = 0.0

    def _check_child_config(self) -> None:
        """A bad [orchestrator] table is refused now, with the control
        plane's own reason, rather than by a child restarted forever."""
        path = str(Path(self.config.path).resolve())
        command = [sys.executable, "-m", "orchestrator.cli", "--check", "-c", path]
        done = subprocess.run(command, capture_output=True, text=True, cwd=PACKAGE_ROOT, timeout=60)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["the control plane refused the file"])[-1]
            raise ConfigError(self.config.path, "orchestrator", reason)

    def _start_child(self) -> None:
        # absolute: the child runs from the package's directory, not ours
        command = [sys.executable, "-m", "orchestrator.cli", "-c", str(Path(self.config.path).resolve()),
                   "--parent-pid", str(os.getpid())]
        self.child = subprocess.Popen(command, stdin=subprocess.DEVNULL, cwd=PACKAGE_ROOT)
        self._child_started = time.monotonic()

    def supervise(self) -> None:
        """Restart an embedded control plane that died (at most once a second)."""
        if self.child is not None and self.child.poll() is not None \
                and time.monotonic() - self._child_started > 1.0:
            self.log(f"embedded control plane exited with status {self.child.returncode}; restarting")
            self._start_child()

    def poll_fd(self) -> int:
        """The descriptor that signals (edge) new messages on the SUB socket."""
        return int(self.link.sub.getsockopt(zmq.FD))

    def next_snapshot(self) -> Routing | None:
        return self.link.receive()

    def applied(self, routing: Routing) -> None:
        """Record what the node now serves and tell the control plane at once
        (the ACK: the version only; digest and counters follow with the next
        periodic report)."""
        self.link.routing = routing
        self.link.report(self.config.node.id, None)

    def tick(self, counters: Callable[[], dict[str, Any]]) -> None:
        """Report what is applied, and say loudly when the control plane has
        been silent past max_staleness_ms (the node keeps serving: fail-static)."""
        staleness = self.link.staleness_ms()
        limit = self.config.node.max_staleness_ms
        if staleness > limit and not self._stale:
            self._stale = True
            self.log(f"STALE: no word from the control plane for {staleness} ms (limit {limit} ms); "
                     f"serving version {self.link.applied} unchanged")
        elif staleness <= limit and self._stale:
            self._stale = False
            self.log(f"control plane heard again; serving version {self.link.applied}")
        if time.monotonic() >= self._next_report:
            self._next_report = time.monotonic() + REPORT_INTERVAL_S
            self.link.report(self.config.node.id, counters())

    def close(self) -> None:
        self.link.close()
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            try:
                self.child.wait(10)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
