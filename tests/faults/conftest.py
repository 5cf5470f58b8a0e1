"""The fault suite runs on the end-to-end tests' fixtures: real backends,
real lbproxy nodes and lborch, loopback only, every process ended by PID."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))

import signal  # noqa: E402

import pytest  # noqa: E402
from e2e_fixtures import backends, lbproxy, workdir  # noqa: E402,F401 (fixtures)
from e2e_support import Orchestrator, free_port, service  # noqa: E402


@pytest.fixture
def fleet(backends, lbproxy, workdir):  # noqa: F811 (the fixtures imported above)
    """Three backends (one process each), lborch, two nodes on 127.0.0.2
    and 127.0.0.3 listening on one port (subscribed to ``subscribe_port``
    when given: a relay's). Returns a Fleet."""
    made: list[Orchestrator] = []

    def start(subscribe_port: int | None = None, before_nodes=None, store: Path | None = None,
              **node_settings) -> Fleet:
        procs = {f"w{i}": backends({f"w{i}": "127.0.0.1"}) for i in (1, 2, 3)}
        port = free_port("127.0.0.2")
        orch = Orchestrator(workdir, [service("web", f"127.0.0.1:{port}",
                                              [(i, p[i], 1) for i, p in procs.items()])])
        if store is not None:
            orch.config.write_text(orch.config.read_text().replace(str(workdir / "state.db"), str(store)))
        orch.start()
        made.append(orch)
        if before_nodes is not None:
            before_nodes(orch)
        node_settings.setdefault("workers", 1)
        nodes = []
        for i in (2, 3):
            node = lbproxy([], start=False, control=f"tcp://127.0.0.1:{orch.control}",
                           subscribe=f"tcp://127.0.0.1:{subscribe_port or orch.publish}",
                           address=f"127.0.0.{i}", max_staleness_ms=1000, **node_settings)
            node.launch()
            nodes.append(node)
        for node in nodes:
            assert node.wait_ready_or_exit() is None, node.log()
            node.wait_log("applied: version")
        return Fleet(orch, nodes, [f"127.0.0.2:{port}", f"127.0.0.3:{port}"], procs)

    yield start
    for orch in made:
        if orch.process is not None and orch.process.poll() is None:
            orch.process.send_signal(signal.SIGCONT)
        orch.stop()


class Fleet:
    def __init__(self, orch: Orchestrator, nodes: list, targets: list[str], processes: dict) -> None:
        self.orch, self.nodes, self.targets, self.backends = orch, nodes, targets, processes


