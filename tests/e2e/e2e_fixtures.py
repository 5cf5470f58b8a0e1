"""The end-to-end fixtures, as a module: the e2e tests' and the fault
suite's conftest files both import them."""
from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from e2e_support import Backends, Node, new_node_id, pid_alive, shm_path


@pytest.fixture
def backends() -> Iterable[Callable[[dict[str, str]], Backends]]:
    """Factory: ``backends({"web-1": "127.0.0.1", "web-2": "127.0.0.2"})``
    starts one process serving each id on a free port of the given host."""
    started: list[Backends] = []

    def start(specs: dict[str, str]) -> Backends:
        b = Backends(specs)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


@pytest.fixture
def workdir() -> Iterable[Path]:
    """A temporary directory removed at teardown (pytest's tmp_path is kept)."""
    path = Path(tempfile.mkdtemp(prefix="fulcrum-e2e-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def lbproxy(workdir: Path) -> Iterable[Callable[..., Node]]:
    """Factory: ``lbproxy(services, workers=2, ...)`` writes the config,
    starts the node and waits for "ready: version 1". Teardown stops it with
    SIGTERM and checks that no process and no shared-memory segment remain."""
    nodes: list[Node] = []

    def start(services: list[dict[str, Any]], start: bool = True, **node_settings: Any) -> Node:
        node_settings.setdefault("workers", 2)
        node = {"id": new_node_id(), **node_settings}
        n = Node(workdir, node, services)
        nodes.append(n)
        if start:
            n.start()
        return n

    yield start
    problems: list[str] = []
    for n in nodes:
        if n.process is None:
            continue
        try:
            n.stop()
        except AssertionError as exc:
            problems.append(str(exc))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(pid_alive(p) for p in n.known_pids):
            time.sleep(0.05)
        left = [p for p in n.known_pids if pid_alive(p)]
        if left:
            n.kill()
            problems.append(f"node {n.node_id}: processes left after stop: {left}")
        if shm_path(n.node_id).exists():
            shm_path(n.node_id).unlink()
            problems.append(f"node {n.node_id}: {shm_path(n.node_id)} left after stop")
    assert not problems, "\n".join(problems)
