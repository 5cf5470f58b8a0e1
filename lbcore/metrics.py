"""The node's Prometheus metrics, served by the agent at ``node.metrics``.

Nothing is counted for them: a scrape reads the shared segment as
``lbproxy stats`` does (the image read back under its seqlock, the counters
a column at a time with numpy), so the data path pays nothing and a node
that serves no metrics never imports this module.

The agent binds the address before anything starts (``MetricsServer.bind``:
an address in use is refused as a listener's is) and serves once its
workers are up. Each request has its own thread and a timeout, so a scraper
that stalls holds only its own thread, never the agent's loop.
"""
from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

import numpy as np
from prometheus_client.exposition import MetricsHandler
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from lbcore.config import Config, ConfigError, parse_address
from lbcore.ejection import monotonic_ms
from lbcore.image import Image, read_image
from lbcore.segment import Segment

METRICS_PATH = "/metrics"
REQUEST_TIMEOUT_S = 5.0  # a scraper silent (or not reading) this long loses its connection
BACKLOG = 64
COUNTER, GAUGE = "counter", "gauge"


def _backend_rows(segment: Segment, image: Image) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every backend of the image's active services, in one pass: the
    service name of each row, the rows, and their counters."""
    active = image.services[image.services["active"] != 0]
    firsts, counts = active["backend_first"].astype(np.int64), active["backend_count"].astype(np.int64)
    # the row indices of each service's run of backends, concatenated
    index = np.repeat(firsts - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
    rows = image.backends[index]
    names = np.repeat(np.array([n.decode() for n in active["name"].tolist()], dtype=object), counts)
    return names.tolist(), rows, segment.counters[rows["slot"]]


def _family(kind: str, name: str, documentation: str, labels: Sequence[dict[str, str]],
            values: Sequence[float]) -> Metric:
    """A family of one sample per entry of ``labels``. A counter's
    ``name`` ends in _total, as its samples' do. The label dicts may be
    shared between families: the exposition only reads them."""
    family = Metric(name.removesuffix("_total") if kind == COUNTER else name, documentation, kind)
    for series, value in zip(labels, values, strict=True):
        family.add_sample(name, series, value)
    return family


def _single(kind: str, name: str, documentation: str, value: float) -> Metric:
    """A family of one sample, without labels."""
    return _family(kind, name, documentation, [{}], [value])


class NodeCollector(Collector):
    """Reads a node's segment at each scrape. ``stale``: the control
    link's STALE state (False in static mode)."""

    def __init__(self, segment: Segment, stale: Callable[[], bool]) -> None:
        self._segment: Segment | None = segment
        self._stale = stale
        self._lock = threading.Lock()  # held by a scrape reading the segment, and by close()

    def close(self) -> None:
        """No scrape reads the segment once this returns: it may be unmapped."""
        with self._lock:
            self._segment = None

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if self._segment is None:
                return []
            return self._families(self._segment)

    def _families(self, segment: Segment) -> list[Metric]:
        image = read_image(segment)
        return [*self._backend_families(segment, image), *self._service_families(segment, image),
                *self._node_families(segment, image)]

    @staticmethod
    def _backend_families(segment: Segment, image: Image) -> list[Metric]:
        services, rows, counters = _backend_rows(segment, image)
        ids = [i.decode() for i in rows["id"].tolist()]
        # one dict per backend, for every family: 10,000 backends make 100,000 samples
        labels = [{"service": s, "backend": b} for s, b in zip(services, ids, strict=True)]
        by_direction = [{**label, "direction": "to_backend"} for label in labels] + \
            [{**label, "direction": "to_client"} for label in labels]
        eligible = (rows["eligible"] != 0).astype(np.uint8)
        ejected = (counters["ejected_until_ms"].astype(np.int64) > monotonic_ms()).astype(np.uint8)

        def per_backend(kind: str, name: str, documentation: str, column: np.ndarray) -> Metric:
            return _family(kind, name, documentation, labels, column.tolist())

        return [
            per_backend(GAUGE, "fulcrum_backend_connections_active",
                        "open connections to the backend", counters["active"]),
            per_backend(COUNTER, "fulcrum_backend_connections_total",
                        "connections made to the backend", counters["total"]),
            per_backend(COUNTER, "fulcrum_backend_connect_failures_total",
                        "connects to the backend that failed", counters["failed"]),
            _family(COUNTER, "fulcrum_backend_bytes_total", "bytes relayed, by direction", by_direction,
                    counters["bytes_to_backend"].tolist() + counters["bytes_to_client"].tolist()),
            per_backend(GAUGE, "fulcrum_backend_eligible",
                        "1 if the image served lets it take new connections", eligible),
            per_backend(GAUGE, "fulcrum_backend_ejected",
                        "1 while this node's passive ejection holds it out", ejected),
        ]

    @staticmethod
    def _service_families(segment: Segment, image: Image) -> list[Metric]:
        slots = np.flatnonzero(image.services["active"] != 0)
        labels = [{"service": n.decode()} for n in image.services["name"][slots].tolist()]
        states = segment.service_states[slots]

        def per_service(kind: str, name: str, documentation: str, field: str) -> Metric:
            return _family(kind, name, documentation, labels, states[field].tolist())

        return [
            per_service(COUNTER, "fulcrum_service_accepted_total",
                        "connections accepted for the service", "accepted"),
            per_service(GAUGE, "fulcrum_service_queue_waiting",
                        "connections waiting now for a backend under its max_conns", "waiting"),
            per_service(COUNTER, "fulcrum_service_queued_total",
                        "connections that waited in the queue", "queued"),
            per_service(COUNTER, "fulcrum_service_queue_timeouts_total",
                        "connections closed after queue_timeout_ms in the queue", "queue_timeouts"),
            per_service(COUNTER, "fulcrum_service_rejected_total",
                        "connections closed at once: every backend full and the queue too", "rejected"),
        ]

    def _node_families(self, segment: Segment, image: Image) -> list[Metric]:
        # a worker replaced starts its counts again: a counter reset to Prometheus
        running = segment.workers["pid"] != 0
        workers = segment.workers[running]
        labels = [{"worker": str(i)} for i in np.flatnonzero(running).tolist()]
        age_s = max(0, time.monotonic_ns() - image.published_ns) / 1e9
        return [
            _family(COUNTER, "fulcrum_worker_accepted_total", "connections the worker accepted",
                    labels, workers["accepted"].tolist()),
            _single(COUNTER, "fulcrum_accept_pauses_total",
                    "times a worker stopped accepting at node.max_connections",
                    int(workers["accept_pauses"].sum())),
            _single(GAUGE, "fulcrum_snapshot_version", "the snapshot version served", image.version),
            _single(GAUGE, "fulcrum_snapshot_age_seconds", "time since the image was published", age_s),
            _single(GAUGE, "fulcrum_stale",
                    "1 while the control plane is unheard past node.max_staleness_ms", int(self._stale())),
        ]


class _Handler(MetricsHandler):
    timeout = REQUEST_TIMEOUT_S  # the socket's, for reads and writes alike

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        if urlparse(self.path).path != METRICS_PATH:
            self.send_error(404)
            return
        super().do_GET()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a request thread never holds the process (nor its stop) up

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a scraper that went away or timed out: its business, not the log's
        super().handle_error(request, client_address)  # anything else: a traceback in the log


class MetricsServer:
    """The metrics address, bound at construction; served from a thread
    once ``serve`` is called, until ``close``."""

    def __init__(self, sock: socket.socket) -> None:
        self._socket = sock
        self._server: _Server | None = None
        self._collector: NodeCollector | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def bind(cls, config: Config) -> MetricsServer:
        """Bind and listen on ``config.node.metrics``; ConfigError (nothing
        left open) when it cannot be bound."""
        return cls.bind_address(config.path, "node.metrics", config.node.metrics)

    @classmethod
    def bind_address(cls, file: str, key: str, value: str) -> MetricsServer:
        """Bind and listen on ``value`` (HOST:PORT, already checked), the
        setting ``key`` of ``file``; ConfigError (nothing left open) when it
        cannot be bound."""
        address = parse_address(value)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past a last run's TIME_WAIT
        try:
            sock.bind(address)
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            reason = f"{address[0]}:{address[1]} cannot be bound: {exc.strerror}"
            raise ConfigError(file, key, reason) from None
        return cls(sock)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._socket.getsockname()
        return host, port

    def serve(self, segment: Segment, stale: Callable[[], bool]) -> None:
        """Answer scrapes from a thread. Precondition: ``segment`` stays
        mapped until ``close`` returns."""
        self._collector = NodeCollector(segment, stale)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self._collector)
        self.serve_registry(registry)

    def serve_registry(self, registry: CollectorRegistry) -> None:
        """Answer scrapes of ``registry`` from a thread, until ``close``."""
        server = _Server(self.address, _Handler.factory(registry), bind_and_activate=False)
        server.socket.close()
        server.socket = self._socket
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close the address; from then on no scrape
        reads the segment (one in progress is waited for)."""
        if self._collector is not None:
            self._collector.close()
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._server = self._thread = None
        self._socket.close()
