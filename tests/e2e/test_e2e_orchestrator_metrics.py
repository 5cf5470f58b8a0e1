"""``orchestrator.metrics``: lborch serves Prometheus metrics at /metrics
that agree with ``lbctl status``, ``backend list`` and ``health show`` at the
same moment; an address in use starts nothing; a bad value is refused by
check and start alike."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    ROOT,
    Client,
    Orchestrator,
    applied_version,
    child_env,
    free_port,
    service,
    start_nodes,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families
from test_e2e_metrics import scrape

# family (as the parser names it: a counter without "_total") -> (type, label names)
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fulcrum_config_version": ("gauge", ()),
    "fulcrum_published_version": ("gauge", ()),
    "fulcrum_node_applied_version": ("gauge", ("node",)),
    "fulcrum_node_lag_versions": ("gauge", ("node",)),
    "fulcrum_node_staleness_seconds": ("gauge", ("node",)),
    "fulcrum_propagation_seconds": ("histogram", ()),
    "fulcrum_ctl_requests": ("counter", ("result", "verb")),
    "fulcrum_store_commit_seconds": ("histogram", ()),
    "fulcrum_backend_up": ("gauge", ("backend", "service")),
    "fulcrum_health_transitions": ("counter", ("backend", "service")),
    "fulcrum_snapshot_bytes": ("gauge", ("kind",)),
}
Key = tuple[str, frozenset[tuple[str, str]]]


def parse(text: str) -> dict[Key, float]:
    """Sample name and labels -> value; AssertionError unless every family
    is there once with its type and labels (a histogram's ``le`` aside)."""
    samples: dict[Key, float] = {}
    seen = set()
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):  # a counter's or histogram's start time: its own family
            continue
        assert family.name in FAMILIES, f"unexpected family {family.name}"
        assert family.name not in seen, f"{family.name} twice"
        seen.add(family.name)
        kind, labels = FAMILIES[family.name]
        assert family.type == kind, (family.name, family.type)
        for sample in family.samples:
            names = set(sample.labels) - ({"le"} if sample.name.endswith("_bucket") else set())
            assert tuple(sorted(names)) == labels, sample
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    assert seen == set(FAMILIES), f"missing: {set(FAMILIES) - seen}"
    return samples


def key(name: str, **labels: str) -> Key:
    return name, frozenset(labels.items())


def with_metrics(orch: Orchestrator, value: str) -> None:
    """The [orchestrator] table is the file's last: a line appended is its."""
    with orch.config.open("a") as f:
        f.write(f'metrics = "{value}"\n')


def lbctl_json(orch: Orchestrator, *args: str) -> Any:
    done = orch.lbctl(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def lborch(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "-c", str(config), *args],
                          capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=30)


@pytest.mark.timeout(120)
def test_metrics_agree_with_status_backends_and_health(backends, lbproxy, workdir):
    b = backends({"w1": "127.0.0.1", "w2": "127.0.0.1", "w3": "127.0.0.1"})
    port, metrics = free_port(), f"127.0.0.1:{free_port()}"
    orch = Orchestrator(workdir, [service("web", f"127.0.0.1:{port}", [("w1", b["w1"], 1)])])
    with_metrics(orch, metrics)
    orch.start()
    try:
        [node] = start_nodes(lbproxy, orch, 1)
        with Client(f"127.0.0.2:{port}") as c:
            assert c.ident() == "w1"
        before = parse(scrape(metrics))
        adds = key("fulcrum_ctl_requests_total", verb="backend.add", result="ok")
        for backend in ("w2", "w3"):
            done = orch.lbctl("backend", "add", "web", backend, b[backend])
            assert done.returncode == 0, done.stderr
        refused = orch.lbctl("backend", "add", "web", "w2", b["w2"], "--expected-version", "0")
        assert refused.returncode != 0
        done = orch.lbctl("health", "report", "w3", "down", "--revision", "5")
        assert done.returncode == 0, done.stderr

        def converged() -> dict[str, Any] | None:
            status = lbctl_json(orch, "status")
            return status if applied_version(node) == status["version"] and status["nodes"] and \
                status["nodes"][0]["applied_version"] == status["version"] else None
        status = wait_until(converged, 10, message=lambda: orch.lbctl("status", "--json").stdout)
        samples = parse(scrape(metrics))
        listed, health = lbctl_json(orch, "backend", "list"), lbctl_json(orch, "health", "show")
        again = lbctl_json(orch, "status")
    finally:
        orch.stop()
    assert (again["version"], again["nodes"][0]["applied_version"]) == (status["version"], status["version"])

    assert samples[key("fulcrum_config_version")] == status["version"]
    assert samples[key("fulcrum_published_version")] == status["version"]
    [row] = status["nodes"]
    assert samples[key("fulcrum_node_applied_version", node=node.node_id)] == row["applied_version"]
    assert samples[key("fulcrum_node_lag_versions", node=node.node_id)] == row["lag"] == 0
    assert abs(samples[key("fulcrum_node_staleness_seconds", node=node.node_id)]
               - row["staleness_ms"] / 1000) < 1
    assert samples[key("fulcrum_snapshot_bytes", kind="full")] == status["snapshot_bytes"]
    assert samples[key("fulcrum_snapshot_bytes", kind="delta")] == status["last_delta_bytes"]

    # the requests this test made, exactly: two adds, one refused
    assert samples[adds] - before.get(adds, 0) == 2
    conflict = key("fulcrum_ctl_requests_total", verb="backend.add", result="version_conflict")
    assert samples[conflict] - before.get(conflict, 0) == 1
    assert samples[key("fulcrum_ctl_requests_total", verb="health.report", result="ok")] == 1
    assert samples[key("fulcrum_ctl_requests_total", verb="node.ack", result="ok")] >= 1

    # the verdicts stored, joined to the backends listed
    assert {b_["id"] for b_ in listed} == {"w1", "w2", "w3"}
    stored = {(h["service"], h["id"]): int(h["state"] == "up") for h in health if h["revision"] is not None}
    assert stored == {("web", "w3"): 0}
    up = {(dict(labels)["service"], dict(labels)["backend"]): v for (name, labels), v in samples.items()
          if name == "fulcrum_backend_up"}
    assert up == stored
    assert samples[key("fulcrum_health_transitions_total", service="web", backend="w3")] == 1

    # the events: three writes committed (and the seed), each version a node ACKed
    assert samples[key("fulcrum_store_commit_seconds_count")] >= 3
    assert samples[key("fulcrum_propagation_seconds_count")] >= 3
    assert samples[key("fulcrum_propagation_seconds_bucket", le="+Inf")] == \
        samples[key("fulcrum_propagation_seconds_count")]


def test_an_address_in_use_starts_nothing(workdir):
    orch = Orchestrator(workdir, [])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with_metrics(orch, address)
        done = lborch(orch.config)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"{orch.config}: orchestrator.metrics: {address} cannot be bound: Address already in use"]
    assert not (workdir / "state.db").exists()  # nothing started: not even the store
    with socket.socket() as control:  # nor the control socket
        control.bind(("127.0.0.1", orch.control))


@pytest.mark.parametrize("value, reason", [
    ("localhost:9100", "'localhost' is not an IPv4 address"),
    ("127.0.0.1", "'127.0.0.1' is not HOST:PORT"),
    ("127.0.0.1:0", "port '0' is not 1..65535"),
])
def test_check_and_start_refuse_a_bad_value(workdir, value, reason):
    orch = Orchestrator(workdir, [])
    with_metrics(orch, value)
    line = f"{orch.config}: orchestrator.metrics: {reason}"
    for args in (("--check",), ()):
        done = lborch(orch.config, *args)
        assert (done.returncode, done.stderr.splitlines()) == (2, [line]), args


@pytest.mark.timeout(60)
def test_a_stalled_scraper_holds_up_neither_requests_nor_the_stop(workdir):
    metrics = f"127.0.0.1:{free_port()}"
    orch = Orchestrator(workdir, [])
    with_metrics(orch, metrics)
    orch.start()
    try:
        with socket.create_connection(("127.0.0.1", int(metrics.split(":")[1]))) as stalled:
            stalled.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
            assert orch.lbctl("status", "--json").returncode == 0
            assert "fulcrum_config_version" in scrape(metrics)
            assert orch.process is not None
            orch.process.terminate()
            assert orch.process.wait(5) == 0
    finally:
        orch.stop()


def test_without_metrics_prometheus_client_is_not_imported():
    code = ("import sys, orchestrator.cli, orchestrator.server; "
            "assert 'prometheus_client' not in sys.modules and 'orchestrator.metrics' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=child_env(), timeout=30)
    assert done.returncode == 0, done.stderr
