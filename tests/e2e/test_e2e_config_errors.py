"""A bad config file: exit status 2, ``FILE: key: reason`` on stderr, no
listener opened, no shared-memory segment left, no process left."""
from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    LBPROXY,
    ROOT,
    Client,
    child_env,
    connection_refused,
    dead_address,
    free_port,
    new_node_id,
    render_config,
    service,
    shm_path,
)

Case = Callable[[str, list[int]], tuple[list[dict[str, Any]], str, str]]


def _backends(n: int = 2) -> list[tuple[str, str, int]]:
    return [(f"web-{i}", dead_address(), 1) for i in range(1, n + 1)]


def unknown_key(_host: str, ports: list[int]):
    return [service("web", f"127.0.0.1:{ports[0]}", _backends(), foo=1)], \
        "service[0].foo", "unknown key"


def bad_listen_port(_host: str, ports: list[int]):
    return [service("web", "127.0.0.1:99999", _backends())], \
        "service[0].listen", "not 1..65535"


def bad_listen_host(_host: str, ports: list[int]):
    return [service("web", f"localhost:{ports[0]}", _backends())], \
        "service[0].listen", "not an IPv4 address"


def bad_backend_address(_host: str, ports: list[int]):
    backends = _backends(3)
    backends[2] = ("web-3", "127.0.0.1", 1)
    return [service("web", f"127.0.0.1:{ports[0]}", backends)], \
        "service[0].backend[2].address", "is not HOST:PORT"


def duplicate_service_name(_host: str, ports: list[int]):
    return [service("web", f"127.0.0.1:{ports[0]}", _backends()),
            service("web", f"127.0.0.1:{ports[1]}", _backends())], \
        "service[1].name", "duplicate service name 'web'"


def duplicate_backend_id(_host: str, ports: list[int]):
    backends = _backends(3)
    backends[2] = ("web-1", dead_address(), 1)
    return [service("web", f"127.0.0.1:{ports[0]}", backends)], \
        "service[0].backend[2].id", "duplicate backend id 'web-1'"


def negative_weight(_host: str, ports: list[int]):
    backends = _backends(2)
    backends[1] = ("web-2", dead_address(), -1)
    return [service("web", f"127.0.0.1:{ports[0]}", backends)], \
        "service[0].backend[1].weight", "must be 0..256 (got -1)"


def unknown_algorithm(_host: str, ports: list[int]):
    return [service("web", f"127.0.0.1:{ports[0]}", _backends(), algorithm="random")], \
        "service[0].algorithm", "unknown algorithm 'random'"


CASES = [unknown_key, bad_listen_port, bad_listen_host, bad_backend_address,
         duplicate_service_name, duplicate_backend_id, negative_weight, unknown_algorithm]


def _run(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LBPROXY, "-c", str(path)], capture_output=True, text=True, cwd=ROOT,
                          env=child_env(), timeout=30, stdin=subprocess.DEVNULL)


def _error_line(stderr: str, path: Path, key: str) -> str:
    prefix = f"{path}: {key}: "
    lines = [x for x in stderr.splitlines() if x.startswith(prefix)]
    assert lines, f"no line starting {prefix!r} in stderr:\n{stderr}"
    return lines[0]


def _processes_naming(node_id: str) -> list[int]:
    """Processes whose command line names the node's segment (workers)."""
    found = []
    needle = f"fulcrum-{node_id}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_config_exits_2_naming_the_key(workdir, case):
    ports = [free_port(), free_port()]
    services, key, reason = case("127.0.0.1", ports)
    node_id = new_node_id()
    path = workdir / "bad.toml"
    path.write_text(render_config({"id": node_id, "workers": 2}, services))
    result = _run(path)
    assert result.returncode == 2, f"status {result.returncode}\n{result.stderr}"
    line = _error_line(result.stderr, path, key)
    assert reason in line, line
    assert "Traceback" not in result.stderr, result.stderr
    for port in ports:
        assert connection_refused(("127.0.0.1", port)), f"something listens on {port}"
    assert not shm_path(node_id).exists()
    assert not _processes_naming(node_id)


@pytest.mark.timeout(60)
def test_listen_port_in_use_exits_2_and_opens_nothing(workdir):
    ours = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        ours.bind(("127.0.0.1", 0))
        ours.listen(8)
        busy = ours.getsockname()[1]
        free = free_port()
        node_id = new_node_id()
        path = workdir / "busy.toml"
        path.write_text(render_config({"id": node_id, "workers": 2}, [
            service("first", f"127.0.0.1:{free}", _backends()),
            service("second", f"127.0.0.1:{busy}", _backends()),
        ]))
        result = _run(path)
        assert result.returncode == 2, f"status {result.returncode}\n{result.stderr}"
        line = _error_line(result.stderr, path, "service[1].listen")
        assert "cannot be bound" in line and f"127.0.0.1:{busy}" in line, line
        assert "Traceback" not in result.stderr, result.stderr
        # The other service's port was not left listening ...
        assert connection_refused(("127.0.0.1", free)), f"something listens on {free}"
        # ... and the busy port is still ours alone.
        with socket.create_connection(("127.0.0.1", busy), timeout=5) as probe:
            ours.settimeout(5)
            accepted, peer = ours.accept()
            accepted.close()
            assert peer == probe.getsockname()
        assert not shm_path(node_id).exists()
        assert not _processes_naming(node_id)
    finally:
        ours.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("node_extra, key, reason", [
    ({"workers": 0}, "node.workers", "must be 1..64 (got 0)"),
    ({"colour": "blue"}, "node.colour", "unknown key"),
    ({"control": "consul"}, "node.control", "'consul': one of"),
    ({"retries": 8}, "node.retries", "must be 0..7 (got 8)"),
    # once ZMQError: Invalid argument, as a traceback
    ({"control": "tcp://127.0.0.1:7700,tcp://127.0.0.1:7702", "subscribe": "tcp://127.0.0.1:7701"},
     "node.control", "is not one endpoint tcp://HOST:PORT"),
    ({"control": "tcp://127.0.0.1:7700", "subscribe": "tcp://127.0.0.1:7701,tcp://127.0.0.1:7703"},
     "node.subscribe", "is not one endpoint tcp://HOST:PORT"),
], ids=["workers0", "unknown-node-key", "control", "retries8", "control-list", "subscribe-list"])
def test_bad_node_settings_exit_2(workdir, node_extra, key, reason):
    port = free_port()
    node_id = new_node_id()
    path = workdir / "node.toml"
    path.write_text(render_config({"id": node_id, **node_extra},
                                  [service("web", f"127.0.0.1:{port}", _backends())]))
    result = _run(path)
    assert result.returncode == 2, f"status {result.returncode}\n{result.stderr}"
    assert reason in _error_line(result.stderr, path, key)
    assert "Traceback" not in result.stderr, result.stderr
    assert connection_refused(("127.0.0.1", port))
    assert not shm_path(node_id).exists()


@pytest.mark.timeout(60)
def test_listen_port_of_another_running_node_is_in_use(backends, lbproxy):
    """Two nodes must not share a listen address: the second finds the port
    in use (as with any other listener) instead of silently taking half of
    the first node's connections."""
    b = backends({"web-1": "127.0.0.1", "web-2": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    first = lbproxy([service("web", listen, [("web-1", b["web-1"], 1)])], workers=1)
    second = lbproxy([service("web", listen, [("web-2", b["web-2"], 1)])], workers=1, start=False)
    status = second.launch().wait_ready_or_exit()
    if status is None:
        seen = set()
        for _ in range(40):
            with Client(listen) as c:
                seen.add(c.ident())
        pytest.fail(f"a second node started on {listen}, already served by node {first.node_id}; "
                    f"clients of {listen} now reach backends {sorted(seen)}\n{second.log()}")
    assert status == 2, second.log()
    line = _error_line(second.log(), second.config_path, "service[0].listen")
    assert "cannot be bound" in line, line
    assert not shm_path(second.node_id).exists()
    # The first node is unaffected.
    for _ in range(5):
        with Client(listen) as c:
            assert c.ident() == "web-1"


@pytest.mark.timeout(60)
def test_config_whose_tables_do_not_fit_is_a_config_error(workdir):
    """64 Maglev services pass validation (64 is the service limit), but
    their lookup tables (65537 entries each) exceed the table pool: the node
    must refuse the file like any bad config (status 2, FILE: key: reason),
    not crash with a traceback."""
    node_id = new_node_id()
    path = workdir / "big.toml"
    port = free_port("127.0.2.1")
    services = [service(f"s{i}", f"127.0.2.{i + 1}:{port}", [("a", dead_address(), 1)],
                        algorithm="maglev") for i in range(64)]
    path.write_text(render_config({"id": node_id, "workers": 1}, services))
    result = _run(path)
    assert "Traceback" not in result.stderr, f"status {result.returncode}\n{result.stderr}"
    assert result.returncode == 2, f"status {result.returncode}\n{result.stderr}"
    assert "cannot be bound" not in result.stderr, f"test setup: a listen address was in use\n{result.stderr}"
    assert any(x.startswith(f"{path}: ") for x in result.stderr.splitlines()), result.stderr
    assert not shm_path(node_id).exists()
    assert not _processes_naming(node_id)
