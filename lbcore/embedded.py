"""The embedded control plane: with ``node.control = "embedded"`` the node
starts ``lborch`` on the same file as a child process (``python -m
orchestrator.cli -c FILE``) rather than importing it, so one command runs
exactly the processes of a real deployment. The node restarts it if it
dies, and serves its last snapshot meanwhile.

The child's own check of the file (``lborch --check --endpoints``) runs
first: a bad [orchestrator] table is refused at once with the control
plane's reason, and the endpoints the node connects to are the ones the
control plane read (the table has one reader: orchestrator.settings).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lbcore import PACKAGE_ROOT
from lbcore.config import ConfigError
from lbcore.wire import WireError, decode_endpoints

RESTART_AT_MOST_EVERY_S = 1.0
CHECK_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class EmbeddedControlPlane:
    """The child ``lborch`` of a node, and the endpoints it serves."""

    def __init__(self, config_path: str, log: Callable[[str], None]) -> None:
        self.path = str(Path(config_path).resolve())  # the child runs from the package's directory
        self.file = config_path
        self.log = log
        self.control, self.publish = self._check()
        self.child: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._start()

    def _check(self) -> tuple[str, str]:
        """(control, publish) as the control plane reads them from the
        file; ConfigError with its reason when it refuses the file."""
        command = [sys.executable, "-m", "orchestrator.cli", "--check", "--endpoints", "-c", self.path]
        done = subprocess.run(command, capture_output=True, text=True, cwd=PACKAGE_ROOT,
                              timeout=CHECK_TIMEOUT_S)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["the control plane refused the file"])[-1]
            raise ConfigError(self.file, "orchestrator", reason)
        try:
            return decode_endpoints((done.stdout.strip().splitlines() or [""])[-1])
        except WireError as exc:
            reason = f"the control plane's check gave no endpoints: {exc}"
            raise ConfigError(self.file, "orchestrator", reason) from None

    def _start(self) -> None:
        command = [sys.executable, "-m", "orchestrator.cli", "-c", self.path,
                   "--parent-pid", str(os.getpid())]
        self.child = subprocess.Popen(command, stdin=subprocess.DEVNULL, cwd=PACKAGE_ROOT)
        self._started = time.monotonic()

    def supervise(self) -> None:
        """Restart the child if it died (at most once a second)."""
        if self.child is not None and self.child.poll() is not None \
                and time.monotonic() - self._started > RESTART_AT_MOST_EVERY_S:
            self.log(f"embedded control plane exited with status {self.child.returncode}; restarting")
            self._start()

    def close(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            try:
                self.child.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait()
