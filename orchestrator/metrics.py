"""The control plane's Prometheus metrics, served by lborch at
``orchestrator.metrics``.

State (versions, each node's applied version, lag and staleness, the
health verdicts, the snapshot's size) is read at each scrape by
``OrchestratorCollector``; events (a version's propagation, ctl requests,
store commits, health transitions) are counted as they happen in plain
prometheus_client histograms and counters. All of them live in this
instance's registry, never the global one.

A scrape runs in a thread of its own (lbcore.metrics.MetricsServer), not
in the server loop: it copies the loop's dicts (one C-level copy each,
under the GIL) and reads the store through a connection of its own, so a
scrape never runs inside the loop's transaction and a scraper that stalls
holds only its thread. A control plane without metrics never imports this
module, nor prometheus_client.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from lbcore.metrics import MetricsServer
from orchestrator.model import Membership
from orchestrator.store import SqliteStore

if TYPE_CHECKING:
    from orchestrator.server import Orchestrator

UNKNOWN_VERB = "unknown"  # a request that named no known verb: one label, whatever it sent
# from a commit to a node's first word of it: a local fleet answers in
# milliseconds, a loaded or distant one in seconds
PROPAGATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# one transaction synced to the disk (synchronous=FULL): a fraction of a millisecond to a slow disk's seconds
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class OrchestratorCollector(Collector):
    """Reads the control plane's state at each scrape. ``store_path``: the
    store's file, opened again here for this thread's reads."""

    def __init__(self, orchestrator: Orchestrator, store_path: Path) -> None:
        self._orchestrator = orchestrator
        self._store_path = store_path
        self._store: SqliteStore | None = None
        self._lock = threading.Lock()  # one scrape at a time on the store's connection

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if self._store is None:
                self._store = SqliteStore(self._store_path)
            state = self._store.read()  # a store unreadable now fails the scrape (500), not the loop
        orch = self._orchestrator
        published, epoch = orch.published_version, orch.published_epoch
        nodes = dict(orch.nodes)  # the loop replaces a node's dict, never changes one in place
        yield _gauge("fulcrum_config_version", "the store's config version", state.version)
        yield _gauge("fulcrum_published_version", "the version last published to the nodes (-1: none yet)",
                     published)
        applied = GaugeMetricFamily("fulcrum_node_applied_version", "the version the node last reported",
                                    labels=["node"])
        lag = GaugeMetricFamily("fulcrum_node_lag_versions",
                                "versions the node is behind the published one (its epoch's nodes)",
                                labels=["node"])
        staleness = GaugeMetricFamily("fulcrum_node_staleness_seconds",
                                      "time since the node last heard the control plane, as it reported",
                                      labels=["node"])
        for name, node in sorted(nodes.items()):
            applied.add_metric([name], node["version"])
            if published >= 0 and node["epoch"] == epoch:
                lag.add_metric([name], published - node["version"])
            staleness.add_metric([name], node["staleness_ms"] / 1000)
        yield from (applied, lag, staleness)
        up = GaugeMetricFamily("fulcrum_backend_up", "the health verdict stored: 1 up, 0 down",
                               labels=["service", "backend"])
        health = {h.backend_id: h.up for h in state.health}
        for b in state.backends:
            if b.state is not Membership.REMOVED and b.id in health:
                up.add_metric([b.service, b.id], int(health[b.id]))
        yield up
        size = GaugeMetricFamily("fulcrum_snapshot_bytes", "encoded size of the routing: the full snapshot, "
                                 "the last delta published", labels=["kind"])
        size.add_metric(["full"], orch.deriver.routing.encoded_size())
        size.add_metric(["delta"], orch.last_delta_bytes)
        yield size


def _gauge(name: str, documentation: str, value: float) -> Metric:
    return GaugeMetricFamily(name, documentation, value=value)


class OrchestratorMetrics:
    """The metrics address, bound at construction (before anything else
    starts); the event counters; served once ``serve`` is called, until
    ``close``."""

    def __init__(self, server: MetricsServer) -> None:
        self._server = server
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector: OrchestratorCollector | None = None
        self.propagation = Histogram("fulcrum_propagation_seconds",
                                     "from a version's commit to a node's first report of it",
                                     registry=self.registry, buckets=PROPAGATION_BUCKETS)
        self.requests = Counter("fulcrum_ctl_requests", "requests on the control socket, by verb and result "
                                "(ok or the error code); node reports and ACKs are verbs too",
                                ["verb", "result"], registry=self.registry)
        self.commits = Histogram("fulcrum_store_commit_seconds", "a store write's time, to its commit",
                                 registry=self.registry, buckets=COMMIT_BUCKETS)
        self.transitions = Counter("fulcrum_health_transitions", "changes of the stored health verdict",
                                   ["service", "backend"], registry=self.registry)

    @classmethod
    def bind(cls, file: str, address: str) -> OrchestratorMetrics:
        """ConfigError (nothing left open) when ``address`` cannot be bound."""
        return cls(MetricsServer.bind_address(file, "orchestrator.metrics", address))

    @property
    def address(self) -> tuple[str, int]:
        return self._server.address

    def count_request(self, verb: str | None, result: str) -> None:
        self.requests.labels(verb or UNKNOWN_VERB, result).inc()

    def serve(self, orchestrator: Orchestrator, store_path: Path) -> None:
        """Answer scrapes from a thread. Precondition: ``orchestrator``
        outlives ``close``."""
        self._collector = OrchestratorCollector(orchestrator, store_path)
        self.registry.register(self._collector)
        self._server.serve_registry(self.registry)

    def close(self) -> None:
        self._server.close()
        if self._collector is not None:
            self._collector.close()
