"""Node limits from the config: idle timeout, connect timeout (failover to
another backend), max_connections per worker."""
from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter

import pytest
from e2e_support import Client, free_port, service, wait_until


def _closed_by_peer(c: Client, timeout: float) -> bool:
    """True if the proxy closes ``c`` (EOF or reset) within ``timeout``."""
    c.sock.settimeout(timeout)
    try:
        return c.sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.timeout(120)
def test_idle_connection_is_closed_busy_one_is_not(backends, lbproxy):
    b = backends({"web-1": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [("web-1", b["web-1"], 1)])], workers=1,
                   idle_timeout_ms=700)
    with Client(listen) as idle, Client(listen) as busy:
        assert idle.ident() == "web-1" and busy.ident() == "web-1"
        t0 = time.monotonic()
        # The busy connection talks every 150 ms for 2 s: never idle that long.
        n = 0
        while time.monotonic() - t0 < 2.0:
            assert busy.echo(b"tick %d\n" % n) == b"tick %d\n" % n
            n += 1
            time.sleep(0.15)
        # The idle one was closed meanwhile (700 ms plus a 100 ms tick).
        assert _closed_by_peer(idle, 1.0), "the idle connection is still open after 2 s"
        assert busy.echo(b"still open\n") == b"still open\n"
    wait_until(lambda: node.backend_stats()["web-1"]["active"] == 0, 5)


@pytest.mark.timeout(120)
def test_connect_timeout_fails_over_to_another_backend(backends, lbproxy):
    b = backends({"live": "127.0.0.1"})
    # A backend that never completes a handshake: a listener with a full
    # accept queue drops further SYNs.
    stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(0)
        for _ in range(4):
            f = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            f.setblocking(False)
            try:
                f.connect(stuck.getsockname())
            except BlockingIOError:
                pass
            fillers.append(f)
        time.sleep(0.2)
        stuck_address = "{}:{}".format(*stuck.getsockname())
        listen = f"127.0.0.1:{free_port()}"
        node = lbproxy([service("web", listen, [("stuck", stuck_address, 1), ("live", b["live"], 1)])],
                       workers=1, connect_timeout_ms=300, retries=1)
        seen: Counter[str] = Counter()
        slow = 0
        for n in range(4):
            t0 = time.monotonic()
            with Client(listen, timeout=10) as c:
                seen[c.ident()] += 1
                assert c.echo(b"x %d\n" % n) == b"x %d\n" % n
            if time.monotonic() - t0 > 0.25:
                slow += 1
        assert dict(seen) == {"live": 4}, dict(seen)
        assert slow >= 1, "no connect waited for the timeout: the stuck backend was not stuck"
        stats = node.backend_stats()
        assert stats["stuck"]["failed"] >= 1 and stats["stuck"]["total"] == 0, stats["stuck"]
        assert stats["live"]["total"] == 4
    finally:
        for f in fillers:
            f.close()
        stuck.close()


@pytest.mark.timeout(120)
def test_max_connections_per_worker_refuses_the_excess(backends, lbproxy):
    b = backends({"web-1": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [("web-1", b["web-1"], 1)])], workers=1,
                   max_connections=3)
    held = [Client(listen) for _ in range(3)]
    try:
        for c in held:
            assert c.ident() == "web-1"
        with Client(listen) as extra:
            assert _closed_by_peer(extra, 5), "a 4th connection was served with max_connections = 3"
        # The held ones are unaffected; a freed place is usable again.
        for n, c in enumerate(held):
            assert c.echo(b"held %d\n" % n) == b"held %d\n" % n
        held.pop().close()
        wait_until(lambda: node.stats()["workers"][0]["active"] == 2, 5)
        with Client(listen) as again:
            assert again.ident() == "web-1"
            assert again.echo(b"again\n") == b"again\n"
    finally:
        for c in held:
            c.close()


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(120)
def test_out_of_descriptors_pauses_accepts_without_spinning(backends, lbproxy):
    """EMFILE: the worker stops polling its listener for a while instead of
    spinning on it, serves what it holds, and takes the queue up again once
    descriptors are free. (A node whose settings need more descriptors than
    its limit does not start: here the running worker's limit is lowered,
    as when descriptors run out under it.)"""
    import resource

    b = backends({"web-1": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [("web-1", b["web-1"], 1)])], workers=1)
    (worker,) = node.worker_pids().values()
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (40, 40))  # a connection costs the worker 2
    clients = []
    try:
        for _ in range(40):  # more than fit: the rest wait in the accept queue
            clients.append(Client(listen, timeout=10))
        wait_until(lambda: node.stats()["workers"][0]["accept_pauses"] > 0, 10)
        served = [c for c in clients[:5]]
        for n, c in enumerate(served):
            assert c.ident() == "web-1"
            assert c.echo(b"held %d\n" % n) == b"held %d\n" % n
        before = _cpu_seconds(worker)
        time.sleep(1.0)
        spent = _cpu_seconds(worker) - before
        assert spent < 0.3, f"worker used {spent:.2f}s of CPU in 1s while out of descriptors"
        assert node.process is not None and node.process.poll() is None
        assert node.worker_pids() == {0: worker}, "the worker died or was replaced"
    finally:
        for c in clients:
            c.close()
    # descriptors free again: new connections are served by the same worker
    wait_until(lambda: node.stats()["workers"][0]["active"] == 0, 10)
    with Client(listen) as again:
        assert again.ident() == "web-1"
        assert again.echo(b"again\n") == b"again\n"
    assert node.worker_pids() == {0: worker}


@pytest.mark.timeout(120)
def test_max_connections_past_the_descriptor_limit_is_refused_alike_by_check_start_and_reload(
        backends, lbproxy):
    """12,000 connections per worker with 20,000 descriptors (two per
    connection, plus pipes) once started: the excess hung unanswered in the
    accept queue. check, start and reload now refuse it with the limit."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard != resource.RLIM_INFINITY
    too_many = min(100_000, hard // 2 + 1)  # a setting in range, past what the limit allows
    b = backends({"web-1": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    services = [service("web", listen, [("web-1", b["web-1"], 1)])]
    node = lbproxy(services, workers=1)
    node.write_config({**node.node, "max_connections": too_many}, services)
    prefix = f"{node.config_path}: node.max_connections: {too_many} connections per worker need "

    check = node.run_cli("check", "-c", str(node.config_path))
    assert check.returncode == 2 and check.stderr.startswith(prefix), check.stderr
    assert "a process may open here (ulimit -Hn): at most " in check.stderr
    most = int(check.stderr.strip().rsplit(" ", 1)[-1])
    assert 4096 <= most < too_many

    node.send(signal.SIGHUP)
    line = next(x for x in node.wait_log("reload refused").splitlines() if "reload refused" in x)
    assert f"still serving version 1: {prefix}" in line, line
    assert node.process.poll() is None
    with Client(listen) as c:
        assert c.ident() == "web-1"

    copy = node.workdir / "start.toml"
    copy.write_text(node.config_path.read_text().replace(node.node_id, f"{node.node_id}-b"))
    start = node.run_cli("-c", str(copy), timeout=60)
    assert start.returncode == 2 and start.stderr.startswith(f"{copy}: node.max_connections: "), start.stderr

    node.write_config({**node.node, "max_connections": most}, services)  # the most it allows is taken
    assert node.run_cli("check", "-c", str(node.config_path)).returncode == 0


def _waiting_for_a_line(c: Client, timeout: float) -> bool:
    """True when ``c`` got nothing, not even an end, within ``timeout``."""
    c.sock.settimeout(timeout)
    try:
        c.sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    except OSError:
        return False
    return False


def _queue(node) -> dict[str, int]:
    svc = node.stats()["services"][0]
    return {k: svc[k] for k in ("waiting", "queued", "queue_timeouts", "rejected")}


@pytest.mark.timeout(120)
def test_max_conns_and_the_queue_on_a_running_node(lbproxy):
    """Two workers, a backend with max_conns 5 and a queue of 3: of 8
    clients 5 reach the backend and 3 wait, served one by one as the held
    ones close; a 9th is closed at once; the backend never has more than 5."""
    from tests.lbcore.test_lifecycle_worker import HoldingBackend

    backend = HoldingBackend()
    clients: list[Client] = []
    try:
        listen = f"127.0.0.1:{free_port()}"
        node = lbproxy([service("web", listen, [{"id": "only", "address": f"127.0.0.1:{backend.port}",
                                                 "weight": 1, "max_conns": 5}],
                                max_queue=3, queue_timeout_ms=30_000)], workers=2)
        clients = [Client(listen) for _ in range(5)]
        assert [c.readline() for c in clients] == [b"hi\n"] * 5
        clients += [Client(listen) for _ in range(3)]
        assert all(_waiting_for_a_line(c, 0.3) for c in clients[5:])
        wait_until(lambda: _queue(node)["waiting"] == 3, 10)
        with Client(listen) as refused:
            assert _closed_by_peer(refused, 5), "a connection past max_queue was not closed at once"
        assert _queue(node) == {"waiting": 3, "queued": 3, "queue_timeouts": 0, "rejected": 1}
        assert backend.open == 5 and backend.most == 5
        waiting = clients[5:]
        for n in range(3):
            clients[n].close()  # one slot frees: one waiting connection takes it
            wait_until(lambda n=n: sum(not _waiting_for_a_line(c, 0.01) for c in waiting) == n + 1, 10)
            assert _queue(node)["waiting"] == 2 - n
        assert [c.readline() for c in waiting] == [b"hi\n"] * 3
        for c in waiting:
            assert c.echo(b"served\n") == b"served\n"
        assert backend.most == 5 and backend.accepted == 8
        stats = node.stats()["services"][0]
        assert {k: stats[k] for k in ("waiting", "queued", "queue_timeouts", "rejected")} == \
            {"waiting": 0, "queued": 3, "queue_timeouts": 0, "rejected": 1}
        assert stats["backends"][0]["max_conns"] == 5 and stats["backends"][0]["active"] == 5
        assert stats["backends"][0]["state"] == "active"
    finally:
        for c in clients:
            c.close()
        backend.close()


@pytest.mark.timeout(120)
def test_queued_connections_time_out_and_a_dead_worker_leaves_no_waiting_count(lbproxy):
    from tests.lbcore.test_lifecycle_worker import HoldingBackend

    backend = HoldingBackend()
    held: list[Client] = []
    try:
        listen = f"127.0.0.1:{free_port()}"
        node = lbproxy([service("web", listen, [{"id": "only", "address": f"127.0.0.1:{backend.port}",
                                                 "weight": 1, "max_conns": 1}],
                                max_queue=4, queue_timeout_ms=500)], workers=2)
        held = [Client(listen)]
        assert held[0].readline() == b"hi\n"
        started = time.monotonic()
        with Client(listen) as a, Client(listen) as b:
            assert _closed_by_peer(a, 3) and _closed_by_peer(b, 3)
        took = time.monotonic() - started
        assert 0.4 <= took <= 1.5, took
        assert _queue(node) == {"waiting": 0, "queued": 2, "queue_timeouts": 2, "rejected": 0}

        # connections waiting when their workers are killed: the agent takes
        # their count out, or every new connection would queue behind them
        node.write_config({**node.node}, [service("web", listen, [
            {"id": "only", "address": f"127.0.0.1:{backend.port}", "weight": 1, "max_conns": 1}],
            max_queue=4, queue_timeout_ms=60_000)])
        node.send(signal.SIGHUP)
        node.wait_log("reloaded: version 2")
        waiting = [Client(listen) for _ in range(3)]
        wait_until(lambda: _queue(node)["waiting"] == 3, 10)
        for pid in node.worker_pids().values():
            os.kill(pid, signal.SIGKILL)
        for c in waiting + held:
            assert _closed_by_peer(c, 10)
            c.close()
        held = []
        wait_until(lambda: len(node.stats()["workers"]) == 2 and _queue(node)["waiting"] == 0, 20)
        wait_until(lambda: node.backend_stats()["only"]["active"] == 0, 10)
        queued = _queue(node)["queued"]
        with Client(listen) as fresh:  # served at once, not queued behind a count left over
            assert fresh.readline() == b"hi\n"
        assert _queue(node)["queued"] == queued
    finally:
        for c in held:
            c.close()
        backend.close()
