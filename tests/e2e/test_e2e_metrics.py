"""``node.metrics``: the node serves Prometheus metrics at /metrics that
agree with ``lbproxy stats --json``; an address in use starts nothing; a
bad value is refused by check, start and reload alike; a scraper that stalls
holds neither a reload nor traffic up."""
from __future__ import annotations

import contextlib
import http.client
import signal
import socket
import subprocess
import time

import pytest
from e2e_support import (
    LBPROXY,
    ROOT,
    Client,
    Orchestrator,
    applied_version,
    child_env,
    connection_refused,
    dead_address,
    free_port,
    new_node_id,
    parse_address,
    render_config,
    service,
    shm_path,
    start_nodes,
    wait_until,
)
from test_e2e_config_errors import _processes_naming

from tests.metrics_support import expected_samples, parse_scrape, without_age


def scrape(address: str) -> str:
    connection = http.client.HTTPConnection(*parse_address(address), timeout=10)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200, response.status
        return response.read().decode()
    finally:
        connection.close()


def one_connection(listen: str, payload: bytes) -> None:
    with Client(listen) as c:
        c.ident()
        assert c.echo(payload) == payload
        c.sock.shutdown(socket.SHUT_WR)
        assert c.read_to_eof() == b"EOF\n"


@pytest.mark.timeout(120)
def test_metrics_agree_with_stats_after_traffic(backends, lbproxy):
    b = backends({"web-1": "127.0.0.1", "web-2": "127.0.0.1", "api-1": "127.0.0.1"})
    web, api, down, metrics = (f"127.0.0.1:{free_port()}" for _ in range(4))
    node = lbproxy([service("web", web, [("web-1", b["web-1"], 1), ("web-2", b["web-2"], 2)]),
                    service("api", api, [("api-1", b["api-1"], 1)], algorithm="least_conn"),
                    service("down", down, [("gone", dead_address(), 1)])],
                   workers=2, metrics=metrics)
    for n in range(8):
        one_connection(web, b"hello %d\n" % n)
    for n in range(3):
        one_connection(api, b"api %d\n" % n)
    with Client(down) as c, contextlib.suppress(ConnectionResetError):
        assert c.read_to_eof() == b""  # its one backend refuses: the node closes the client

    def settled():
        stats = node.stats()
        backends_ = [x for s in stats["services"] for x in s["backends"]]
        return stats if all(x["active"] == 0 for x in backends_) else None
    stats = wait_until(settled, 5, message=lambda: f"counters to settle: {node.stats()}")
    samples, age = without_age(parse_scrape(scrape(metrics)))
    assert samples == expected_samples(stats)
    assert abs(age - stats["snapshot_age_ms"] / 1000) < 5
    # what the traffic made, as counted: a scrape is not a copy of zeros
    def backend(family: str, service_: str, backend_: str) -> float:
        return samples[(family, frozenset({("service", service_), ("backend", backend_)}))]
    assert backend("fulcrum_backend_connections_total", "web", "web-1") \
        + backend("fulcrum_backend_connections_total", "web", "web-2") == 8
    assert backend("fulcrum_backend_connections_total", "api", "api-1") == 3
    assert backend("fulcrum_backend_connect_failures_total", "down", "gone") >= 1
    assert samples[("fulcrum_service_accepted_total", frozenset({("service", "api")}))] == 3
    assert samples[("fulcrum_snapshot_version", frozenset())] == 1
    assert samples[("fulcrum_stale", frozenset())] == 0


def _write(workdir, node_id: str, node_extra: dict, listen: int):
    path = workdir / "node.toml"
    path.write_text(render_config({"id": node_id, "workers": 1, **node_extra},
                                  [service("web", f"127.0.0.1:{listen}", [("web-1", dead_address(), 1)])]))
    return path


def node_run(path, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LBPROXY, *command, "-c", str(path)], capture_output=True, text=True, cwd=ROOT,
                          env=child_env(), timeout=30, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(60)
def test_a_metrics_address_in_use_exits_2_and_starts_nothing(workdir):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as ours:
        ours.bind(("127.0.0.1", 0))
        ours.listen(8)
        busy = ours.getsockname()[1]
        node_id, listen = new_node_id(), free_port()
        path = _write(workdir, node_id, {"metrics": f"127.0.0.1:{busy}"}, listen)
        result = node_run(path)
        assert result.returncode == 2, f"status {result.returncode}\n{result.stderr}"
        assert result.stderr.splitlines() == \
            [f"{path}: node.metrics: 127.0.0.1:{busy} cannot be bound: Address already in use"], result.stderr
    assert connection_refused(("127.0.0.1", listen))
    assert not shm_path(node_id).exists()
    assert not _processes_naming(node_id)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value, reason", [
    ("localhost:9100", "'localhost' is not an IPv4 address"),
    ("127.0.0.1", "'127.0.0.1' is not HOST:PORT"),
    ("127.0.0.1:0", "port '0' is not 1..65535"),
    (9100, "must be str, got int"),
])
def test_check_and_start_refuse_a_bad_metrics_value(workdir, value, reason):
    node_id, listen = new_node_id(), free_port()
    path = _write(workdir, node_id, {"metrics": value}, listen)
    for command in (("check",), ()):
        result = node_run(path, *command)
        assert result.returncode == 2, f"{command}: status {result.returncode}\n{result.stderr}"
        assert result.stderr.splitlines() == [f"{path}: node.metrics: {reason}"], result.stderr
    assert not shm_path(node_id).exists()
    good = _write(workdir, node_id, {"metrics": f"127.0.0.1:{free_port()}"}, listen)
    assert node_run(good, "check").returncode == 0


def stalled_scrapers(address: str, count: int) -> list[socket.socket]:
    """Half say nothing; half ask and then read nothing, with a receive
    buffer far smaller than the answer."""
    held = []
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(parse_address(address))
        if i % 2:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        held.append(s)
    return held


@pytest.mark.timeout(120)
def test_stalled_scrapers_hold_up_neither_reload_nor_traffic(backends, lbproxy):
    b = backends({"web-1": "127.0.0.1", "web-2": "127.0.0.1"})
    listen, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    # weight-0 rows that take no traffic make the answer a few MB: a scraper
    # that does not read it blocks its writer
    idle = [{"id": f"idle-{i}", "address": f"127.0.3.{i % 250 + 1}:{9 + i // 250}", "weight": 0}
            for i in range(2000)]
    services = [service("web", listen, [("web-1", b["web-1"], 1), *idle])]
    node = lbproxy(services, workers=1, metrics=metrics)
    held = stalled_scrapers(metrics, 8)
    try:
        time.sleep(0.5)  # the ones that asked are now stuck writing
        services[0]["backends"].append({"id": "web-2", "address": b["web-2"], "weight": 1})
        node.write_config(node.node, services)
        started = time.monotonic()
        node.send(signal.SIGHUP)
        node.wait_log("reloaded: version 2", timeout=5)
        assert time.monotonic() - started < 3, node.log()
        seen = set()
        for _ in range(10):
            with Client(listen) as c:
                seen.add(c.ident())
        assert seen == {"web-1", "web-2"}
        samples = parse_scrape(scrape(metrics))  # another scraper is answered meanwhile
        assert samples[("fulcrum_snapshot_version", frozenset())] == 2

        # a changed address is the one thing a reload refuses here
        node.write_config({**node.node, "metrics": f"127.0.0.1:{free_port()}"}, services)
        node.send(signal.SIGHUP)
        node.wait_log("reload refused, still serving version 2: ")
        assert f"{node.config_path}: node.metrics: changes need a restart" in node.log()
        assert parse_scrape(scrape(metrics))[("fulcrum_snapshot_version", frozenset())] == 2

        started = time.monotonic()
        assert node.stop() == 0
        assert time.monotonic() - started < 10, node.log()
        assert connection_refused(parse_address(metrics))
    finally:
        for s in held:
            s.close()


@pytest.mark.timeout(120)
def test_stale_follows_the_control_link(backends, lbproxy, workdir):
    b = backends({"w1": "127.0.0.1"})
    orch = Orchestrator(workdir, [service("web", f"127.0.0.1:{free_port()}", [("w1", b["w1"], 1)])])
    metrics = f"127.0.0.1:{free_port()}"
    stale = ("fulcrum_stale", frozenset())
    orch.start()
    try:
        [node] = start_nodes(lbproxy, orch, 1, metrics=metrics)
        samples = parse_scrape(scrape(metrics))
        assert samples[stale] == 0
        assert samples[("fulcrum_snapshot_version", frozenset())] == applied_version(node)
        orch.stop(signal.SIGKILL)
        node.wait_log("STALE")
        assert parse_scrape(scrape(metrics))[stale] == 1
        orch.start()
        node.wait_log("control plane heard again")
        assert parse_scrape(scrape(metrics))[stale] == 0
    finally:
        orch.stop()
