"""The node's Prometheus metrics (lbcore.metrics): a scrape reads what
``lbproxy stats`` reads, for every family; the server binds as a listener
does, answers /metrics only, and stops without waiting on a stalled scraper."""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from lbcore.config import ConfigError, parse_config
from lbcore.ejection import monotonic_ms
from lbcore.metrics import MetricsServer, NodeCollector
from lbcore.stats import node_stats
from tests.conftest import config_text
from tests.metrics_support import expected_samples, parse_scrape, without_age


def scrape(collector: NodeCollector) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


def services(count: int, backends: int, first_port: int = 7000) -> list[dict]:
    return [{"name": f"s{i}", "listen": f"127.0.0.1:{first_port + i}",
             "backends": [(f"b{j}", f"127.0.{j // 250}.{j % 250 + 2}:80", 1) for j in range(backends)]}
            for i in range(count)]


def fill_counters(published) -> None:
    """Distinct counts everywhere a family reads, one backend ejected."""
    segment, image = published.segment, published.image
    for i, slot in enumerate(image.backends["slot"].tolist()):
        row = segment.counters[slot]
        row["active"], row["total"], row["failed"] = i, 10 * i + 1, i % 3
        row["bytes_to_backend"], row["bytes_to_client"] = 1000 * i + 7, (1 << 40) + i
    segment.counters["ejected_until_ms"][int(image.backends["slot"][1])] = monotonic_ms() + 60_000
    for slot in range(len(image.services)):
        state = segment.service_states[slot]
        state["accepted"], state["waiting"], state["queued"] = 100 + slot, slot, 20 + slot
        state["queue_timeouts"], state["rejected"] = 3 + slot, 5 + slot
    for index, accepted, pauses in ((0, 7, 2), (3, 11, 1)):
        worker = segment.workers[index]
        worker["pid"], worker["accepted"], worker["accept_pauses"] = os.getpid(), accepted, pauses


@pytest.mark.parametrize("stale", [False, True])
def test_a_scrape_holds_what_stats_holds(published, stale):
    published.publish_text(services(3, 4))
    fill_counters(published)
    samples, age = without_age(parse_scrape(scrape(NodeCollector(published.segment, lambda: stale))))
    stats = node_stats(published.segment)
    assert samples == expected_samples(stats, stale)
    assert sum(v for (name, _), v in samples.items() if name == "fulcrum_backend_ejected") == 1
    assert samples[("fulcrum_accept_pauses_total", frozenset())] == 3
    assert 0 <= age < 60


def test_a_scrape_after_services_and_backends_left(published):
    """The image's rows once a service went and another shrank: each
    backend still under its own service (rows are not in slot order)."""
    published.publish_text(services(4, 5))
    smaller = services(4, 5)
    del smaller[1]
    smaller[0]["backends"] = smaller[0]["backends"][2:]
    smaller[2]["backends"].append(("late", "127.0.9.9:80", 2))
    published.publish(parse_config(config_text(smaller)))
    fill_counters(published)
    samples, _ = without_age(parse_scrape(scrape(NodeCollector(published.segment, lambda: False))))
    assert samples == expected_samples(node_stats(published.segment))
    assert ("fulcrum_backend_eligible", frozenset({("service", "s3"), ("backend", "late")})) in samples


def test_ten_thousand_backends(published):
    published.publish_text(services(10, 1000))
    fill_counters(published)
    samples, _ = without_age(parse_scrape(scrape(NodeCollector(published.segment, lambda: False))))
    assert samples == expected_samples(node_stats(published.segment))


def test_a_closed_collector_reads_nothing(published):
    published.publish_text(services(1, 2))
    collector = NodeCollector(published.segment, lambda: False)
    collector.close()
    assert list(collector.collect()) == []


def _config(metrics: str):
    return parse_config(config_text(services(1, 1), f'metrics = "{metrics}"'), "n.toml")


def test_an_address_in_use_is_refused_as_a_listener_is():
    with socket.socket() as ours:
        ours.bind(("127.0.0.1", 0))
        ours.listen(1)
        port = ours.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            MetricsServer.bind(_config(f"127.0.0.1:{port}"))
    assert str(info.value) == \
        f"n.toml: node.metrics: 127.0.0.1:{port} cannot be bound: Address already in use"


def _get(address: tuple[str, int], path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_served_at_metrics_only_and_closed_past_a_stalled_scraper(published):
    published.publish_text(services(1, 2))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = MetricsServer.bind(_config(f"127.0.0.1:{port}"))
    address = server.address
    stalled = socket.create_connection(address)  # says nothing, reads nothing
    try:
        server.serve(published.segment, lambda: False)
        status, text = _get(address, "/metrics")
        assert status == 200
        parse_scrape(text)
        assert _get(address, "/")[0] == 404
        assert _get(address, "/metrics?x=1")[0] == 200
        server.close()
        assert not [t for t in threading.enumerate() if t.name == "metrics"]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=2).close()
    finally:
        stalled.close()
        server.close()


def test_a_node_without_metrics_loads_none_of_it():
    code = "import sys, lbcore.agent, lbcore.cli; print('prometheus_client' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.stdout.strip() == "False", result.stderr
