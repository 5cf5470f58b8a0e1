"""The node's life: a killed worker is replaced, SIGTERM drains, SIGHUP
reloads (and refuses a bad file)."""
from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter

import pytest
from e2e_support import (
    Client,
    connection_refused,
    free_port,
    owning_process,
    pid_alive,
    service,
    shm_path,
    wait_until,
)


def _exchange(c: Client, text: bytes) -> None:
    assert c.echo(text) == text


@pytest.mark.timeout(120)
def test_killed_worker_is_replaced_and_other_workers_connections_survive(backends, lbproxy):
    b = backends({"web-1": "127.0.0.1", "web-2": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [("web-1", b["web-1"], 1), ("web-2", b["web-2"], 1)])],
                   workers=2)
    pids = node.worker_pids()
    assert sorted(pids) == [0, 1] and all(pid_alive(p) for p in pids.values()), pids
    index_of = {pid: i for i, pid in pids.items()}

    # Open connections until each worker holds some (the kernel spreads them
    # over the workers' SO_REUSEPORT listeners by address hash).
    held: dict[int, list[Client]] = {0: [], 1: []}
    everyone: list[Client] = []
    try:
        for _ in range(60):
            c = Client(listen)
            everyone.append(c)
            c.ident()
            owner = owning_process(c, pids.values())
            assert owner is not None, "no worker holds the connection"
            held[index_of[owner]].append(c)
            if len(held[0]) >= 3 and len(held[1]) >= 3:
                break
        assert held[0] and held[1], f"connections per worker: {[len(v) for v in held.values()]}"

        victim, survivor = 1, 0
        os.kill(pids[victim], signal.SIGKILL)
        wait_until(lambda: not pid_alive(pids[victim]), 5, message="the killed worker to go")

        # The other worker's connections keep working.
        for n, c in enumerate(held[survivor]):
            _exchange(c, b"still here %d\n" % n)
        # The killed worker's clients are not left hanging: they see the close.
        for c in held[victim]:
            c.sock.settimeout(5)
            try:
                assert c.sock.recv(100) == b""
            except ConnectionResetError:
                pass

        # New connections are served at once (by the surviving worker) ...
        for n in range(10):
            with Client(listen) as c:
                assert c.ident() in ("web-1", "web-2")
                _exchange(c, b"after kill %d\n" % n)

        # ... and the agent starts a replacement.
        def replaced():
            now = node.worker_pids()
            new = now.get(victim)
            return new if new and new != pids[victim] and pid_alive(new) else None
        new_pid = wait_until(replaced, 10, interval=0.2, message=lambda: (
            f"a new worker {victim}: {node.stats()['workers']}\n{node.log()}"))
        assert f"worker {victim} (pid {pids[victim]}) exited" in node.log()
        assert node.worker_pids()[survivor] == pids[survivor]

        # The dead worker's connections no longer count as active: the node's
        # active count is what is really open (the survivor's connections).
        def active_matches():
            active = sum(s["active"] for s in node.backend_stats().values())
            return active == len(held[survivor])
        wait_until(active_matches, 5, interval=0.2,
                   message=lambda: f"active == {len(held[survivor])}: {node.backend_stats()}")

        # Both workers serve again; the replacement accepts its share.
        wait_until(lambda: all(w["generation"] > 0 for w in node.stats()["workers"]), 5)
        for n in range(30):
            with Client(listen) as c:
                assert c.ident() in ("web-1", "web-2")
                _exchange(c, b"after respawn %d\n" % n)
        workers = {w["index"]: w for w in node.stats()["workers"]}
        assert workers[victim]["pid"] == new_pid
        assert workers[victim]["accepted"] > 0, f"the replacement accepted nothing: {workers}"
        for n, c in enumerate(held[survivor]):
            _exchange(c, b"still here again %d\n" % n)
    finally:
        for c in everyone:
            c.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_drains_open_connection_refuses_new_and_cleans_up(backends, lbproxy, signum):
    b = backends({"web-1": "127.0.0.1"})
    host, port = "127.0.0.1", free_port()
    listen = f"{host}:{port}"
    node = lbproxy([service("web", listen, [("web-1", b["web-1"], 1)])], workers=2,
                   drain_timeout_ms=10000)
    worker_pids = list(node.worker_pids().values())
    assert len(worker_pids) == 2
    with Client(listen) as c:
        assert c.ident() == "web-1"
        _exchange(c, b"before\n")
        t0 = time.monotonic()
        node.send(signum)
        node.wait_log("stopping")
        # New connections are refused while the old one is still open.
        wait_until(lambda: connection_refused((host, port), timeout=1), 3, interval=0.1,
                   message="new connections to be refused during the drain")
        assert node.process.poll() is None, "the agent exited before the open connection finished"
        # The open connection still finishes its exchange.
        for n in range(5):
            _exchange(c, b"during drain %d\n" % n)
            time.sleep(0.05)
        assert connection_refused((host, port), timeout=1)
        c.sock.shutdown(socket.SHUT_WR)
        assert c.read_to_eof() == b"EOF\n"
    # With nothing left open, the node stops well before drain_timeout_ms.
    try:
        status = node.process.wait(8)
    except Exception:
        raise AssertionError(f"agent still running 8 s after its last connection:\n{node.log()}") from None
    assert status == 0, node.log()
    assert time.monotonic() - t0 < 9.5
    assert "stopped" in node.log()
    wait_until(lambda: not any(pid_alive(p) for p in worker_pids), 5,
               message=f"workers {worker_pids} to be gone")
    assert not shm_path(node.node_id).exists()
    assert connection_refused((host, port))


@pytest.mark.timeout(120)
def test_drain_is_bounded_by_drain_timeout(backends, lbproxy):
    b = backends({"web-1": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [("web-1", b["web-1"], 1)])], workers=1,
                   drain_timeout_ms=1000)
    worker_pids = list(node.worker_pids().values())
    with Client(listen) as c:
        assert c.ident() == "web-1"
        t0 = time.monotonic()
        node.send(signal.SIGTERM)
        # The connection stays open and idle: the drain ends at the timeout.
        status = node.process.wait(15)
        elapsed = time.monotonic() - t0
        assert status == 0, node.log()
        assert 0.8 <= elapsed < 5.0, f"stopped after {elapsed:.1f} s with drain_timeout_ms = 1000"
        c.sock.settimeout(5)
        try:
            rest = c.read_to_eof()
        except ConnectionResetError:
            rest = b""
        assert rest == b"", f"unexpected bytes after the drain: {rest!r}"
    assert not any(pid_alive(p) for p in worker_pids)
    assert not shm_path(node.node_id).exists()


@pytest.mark.timeout(120)
def test_sighup_reload_applies_new_backends_and_refuses_bad_file(backends, lbproxy):
    b = backends({"web-a": "127.0.0.1", "web-b": "127.0.0.1", "web-c": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    v1 = [service("web", listen, [("web-a", b["web-a"], 1), ("web-b", b["web-b"], 1)])]
    node = lbproxy(v1, workers=2)

    # Connections opened under version 1, one on each backend.
    held: dict[str, Client] = {}
    spare: list[Client] = []
    try:
        for _ in range(6):
            c = Client(listen)
            ident = c.ident()
            if ident in held:
                spare.append(c)
            else:
                held[ident] = c
        assert set(held) == {"web-a", "web-b"}, list(held)
        for c in spare:
            c.close()

        # Version 2: web-b removed, web-c added, weights 1:3.
        v2 = [service("web", listen, [("web-a", b["web-a"], 1), ("web-c", b["web-c"], 3)])]
        node.write_config(node.node, v2)
        node.send(signal.SIGHUP)
        node.wait_log("reloaded: version 2")

        for ident, c in held.items():
            _exchange(c, f"after reload via {ident}\n".encode())

        seen: Counter[str] = Counter()
        for _ in range(40):
            with Client(listen) as c:
                seen[c.ident()] += 1
        assert dict(seen) == {"web-a": 10, "web-c": 30}, f"version 2 shares: {dict(seen)}"
        stats = node.stats()
        assert stats["version"] == 2
        assert {x["id"]: x["weight"] for x in stats["services"][0]["backends"]} == {"web-a": 1, "web-c": 3}

        # A bad file is refused; version 2 keeps serving. (``lbproxy stats -c``
        # reads the node id from its file, so from here on it is given a
        # valid copy naming the same node.)
        stats_config = node.workdir / "stats-copy.toml"
        stats_config.write_text(node.config_path.read_text())
        bad = [service("web", listen, [("web-a", b["web-a"], 1), ("web-c", b["web-c"], -1)])]
        node.write_config(node.node, bad)
        node.send(signal.SIGHUP)
        log = node.wait_log("reload refused")
        line = next(x for x in log.splitlines() if "reload refused" in x)
        assert "still serving version 2" in line, line
        assert f"{node.config_path}: service[0].backend[1].weight: must be 0..256 (got -1)" in line, line
        assert node.process.poll() is None
        assert node.stats(config=stats_config)["version"] == 2
        seen.clear()
        for _ in range(8):
            with Client(listen) as c:
                seen[c.ident()] += 1
        assert dict(seen) == {"web-a": 2, "web-c": 6}, f"after a refused reload: {dict(seen)}"
        for ident, c in held.items():
            _exchange(c, f"after refused reload via {ident}\n".encode())
        assert "reloaded: version 3" not in node.log()
    finally:
        for c in [*held.values(), *spare]:
            c.close()


@pytest.mark.timeout(120)
def test_reload_new_backend_starts_with_zeroed_counters(backends, lbproxy):
    """A backend added by a reload has counted nothing yet, even when it
    takes the place of a backend removed by the same reload."""
    b = backends({"web-a": "127.0.0.1", "web-b": "127.0.0.1", "web-c": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [("web-a", b["web-a"], 1), ("web-b", b["web-b"], 1)])])
    seen: Counter[str] = Counter()
    for n in range(10):
        with Client(listen) as c:
            seen[c.ident()] += 1
            _exchange(c, b"v1 %d\n" % n)
    assert dict(seen) == {"web-a": 5, "web-b": 5}
    wait_until(lambda: all(s["total"] == 5 and s["active"] == 0 for s in node.backend_stats().values()),
               5, message=lambda: f"v1 totals: {node.backend_stats()}")

    node.write_config(node.node, [service("web", listen, [("web-a", b["web-a"], 1),
                                                          ("web-c", b["web-c"], 1)])])
    node.send(signal.SIGHUP)
    node.wait_log("reloaded: version 2")
    fresh = node.backend_stats()["web-c"]
    counted = {k: fresh[k] for k in ("active", "total", "failed", "bytes_to_backend", "bytes_to_client")}
    assert counted == dict.fromkeys(counted, 0), \
        f"web-c, new in version 2 and never connected to, already has counts: {fresh}"

    seen.clear()
    for n in range(10):
        with Client(listen) as c:
            seen[c.ident()] += 1
            _exchange(c, b"v2 %d\n" % n)
    assert dict(seen) == {"web-a": 5, "web-c": 5}
    wait_until(lambda: {i: s["total"] for i, s in node.backend_stats().items()} == {"web-a": 10, "web-c": 5},
               5, message=lambda: f"v2 totals: {node.backend_stats()}")


@pytest.mark.timeout(120)
def test_reload_of_a_file_whose_tables_do_not_fit_is_refused(backends, lbproxy):
    """A file that passes validation but cannot be built into a snapshot
    (64 Maglev services: the tables exceed the pool) must be refused like any
    bad file, with the old version still serving; the agent must not die."""
    b = backends({"web-1": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [("web-1", b["web-1"], 1)], algorithm="maglev")],
                   workers=1)
    big = [service("web", listen, [("web-1", b["web-1"], 1)], algorithm="maglev")]
    # 63 more listeners: one port on 127.0.2.1 .. 127.0.2.63 (addresses no
    # one else uses, so none of them is in use by chance)
    port = free_port("127.0.2.1")
    big += [service(f"s{i}", f"127.0.2.{i}:{port}", [("web-1", b["web-1"], 1)],
                    algorithm="maglev") for i in range(1, 64)]
    node.write_config(node.node, big)
    node.send(signal.SIGHUP)
    wait_until(lambda: "reload refused" in node.log() or "reloaded" in node.log()
               or node.process.poll() is not None, 15,
               message=lambda: f"the reload to finish:\n{node.log()}")
    time.sleep(0.3)
    assert node.process.poll() is None, \
        f"the agent died (status {node.process.returncode}) on SIGHUP:\n{node.log()[-3000:]}"
    assert "cannot be bound" not in node.log(), f"test setup: a listen address was in use\n{node.log()}"
    assert "reload refused, still serving version 1" in node.log(), node.log()[-3000:]
    with Client(listen) as c:
        assert c.ident() == "web-1"
        _exchange(c, b"still serving\n")


@pytest.mark.timeout(120)
def test_reload_adds_a_service_that_serves_once_reloaded_is_logged(backends, lbproxy):
    """After "reloaded: version 2" new connections follow the new config,
    including a service that version 2 adds."""
    b = backends({"web-1": "127.0.0.1", "api-1": "127.0.0.1"})
    web, api = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    v1 = [service("web", web, [("web-1", b["web-1"], 1)])]
    node = lbproxy(v1, workers=2)
    node.write_config(node.node, [*v1, service("api", api, [("api-1", b["api-1"], 1)])])
    node.send(signal.SIGHUP)
    wait_until(lambda: "reloaded: version 2" in node.log(), 15, interval=0.002,
               message=lambda: f"reloaded: version 2:\n{node.log()}")
    try:
        with Client(api) as c:
            first = c.ident()
    except ConnectionRefusedError:
        first = "refused"
    if first == "refused":
        t0 = time.monotonic()

        def serving():
            try:
                with Client(api) as c:
                    return c.ident()
            except ConnectionRefusedError:
                return None
        wait_until(serving, 5, interval=0.01, message=f"{api} to be served at all")
        pytest.fail(f"{api} (service 'api', new in version 2) refused a connection made right after "
                    f"'reloaded: version 2' was logged; it was served {time.monotonic() - t0:.3f} s later")
    assert first == "api-1"
    with Client(web) as c:
        assert c.ident() == "web-1"


@pytest.mark.timeout(120)
def test_reload_moves_a_listener_and_scales_workers(backends, lbproxy):
    b = backends({"web-1": "127.0.0.1"})
    old_port, new_port = free_port(), free_port()
    node = lbproxy([service("web", f"127.0.0.1:{old_port}", [("web-1", b["web-1"], 1)])], workers=2)
    pids = node.worker_pids()
    node.node["workers"] = 1
    node.write_config(node.node, [service("web", f"127.0.0.1:{new_port}", [("web-1", b["web-1"], 1)])])
    node.send(signal.SIGHUP)
    node.wait_log("reloaded: version 2")

    def moved():
        if not connection_refused(("127.0.0.1", old_port), timeout=1):
            return False
        try:
            with Client(("127.0.0.1", new_port)) as c:
                return c.ident() == "web-1"
        except ConnectionRefusedError:
            return False
    wait_until(moved, 5, interval=0.05, message="the listener to move")
    wait_until(lambda: not pid_alive(pids[1]), 10, message="worker 1 to stop")
    assert pid_alive(pids[0])
    stats = node.stats()
    assert [w["index"] for w in stats["workers"]] == [0], stats["workers"]
    assert stats["services"][0]["listen"] == f"127.0.0.1:{new_port}"
    assert "restarting" not in node.log(), "a worker stopped by the reload was restarted"
    for n in range(10):
        with Client(("127.0.0.1", new_port)) as c:
            assert c.ident() == "web-1"
            _exchange(c, b"moved %d\n" % n)


@pytest.mark.timeout(120)
def test_reload_new_service_starts_with_zero_accepted(backends, lbproxy):
    """A service added by a reload has accepted nothing yet, even when it
    replaces a service removed by the same reload."""
    b = backends({"web-1": "127.0.0.1", "api-1": "127.0.0.1"})
    web, api = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", web, [("web-1", b["web-1"], 1)])])
    for n in range(5):
        with Client(web) as c:
            assert c.ident() == "web-1"
            _exchange(c, b"v1 %d\n" % n)
    assert node.stats()["services"][0]["accepted"] == 5

    node.write_config(node.node, [service("api", api, [("api-1", b["api-1"], 1)])])
    node.send(signal.SIGHUP)
    node.wait_log("reloaded: version 2")
    [svc] = node.stats()["services"]
    assert (svc["name"], svc["listen"]) == ("api", api)
    assert svc["accepted"] == 0, f"service 'api', new in version 2, already counts {svc['accepted']} accepted"

    # The new service serves (once its listener is open) and counts from 0.
    served = 0

    def serve_one():
        nonlocal served
        try:
            with Client(api) as c:
                assert c.ident() == "api-1"
        except ConnectionRefusedError:
            return False
        served += 1
        return served >= 3
    wait_until(serve_one, 5, interval=0.02, message=f"3 connections served by {api}")
    wait_until(lambda: node.stats()["services"][0]["accepted"] == served, 5,
               message=lambda: f"accepted == {served}: {node.stats()['services']}")


@pytest.mark.timeout(120)
def test_stop_serves_connections_already_queued(backends, lbproxy):
    """Connections the kernel queued on a worker's listener before SIGTERM are
    accepted and served during the drain, not reset with the listener."""
    b = backends({"web-1": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [("web-1", b["web-1"], 1)])], workers=1)
    (worker,) = node.worker_pids().values()
    os.kill(worker, signal.SIGSTOP)  # the queue fills while the worker cannot accept
    clients = []
    try:
        for _ in range(100):
            clients.append(Client(listen, timeout=20))
        node.send(signal.SIGTERM)
        node.wait_log("stopping")
    finally:
        os.kill(worker, signal.SIGCONT)
    try:
        served = 0
        for n, c in enumerate(clients):
            assert c.ident() == "web-1", f"queued connection {n} was not served"
            assert c.echo(b"queued %d\n" % n) == b"queued %d\n" % n
            served += 1
    finally:
        for c in clients:
            c.close()
    assert served == 100
    assert node.process is not None and node.process.wait(15) == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("key, value, reason", [
    ("idle_timeout_ms", 4294967297, "must be 1..2147483647 (got 4294967297)"),
    ("connect_timeout_ms", 2147483648, "must be 1..2147483647 (got 2147483648)"),
    ("drain_timeout_ms", 1 << 40, f"must be 0..2147483647 (got {1 << 40})"),
    ("max_staleness_ms", 1 << 63, f"must be 1..2147483647 (got {1 << 63})"),
    ("fin_timeout_ms", 0, "must be 1..2147483647 (got 0)"),
], ids=["idle", "connect", "drain", "staleness", "fin"])
def test_check_start_and_reload_refuse_the_same_out_of_range_setting(backends, lbproxy, key, value, reason):
    """A value past what the node holds (the image's uint32 timeouts, a C
    int) once passed ``check`` and then killed the agent on SIGHUP
    (OverflowError), taking the workers and the port with it. Each setting
    has its real range, refused alike by check, start and reload."""
    b = backends({"web-1": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    services = [service("web", listen, [("web-1", b["web-1"], 1)])]
    node = lbproxy(services, workers=1)
    expected = f"{node.config_path}: node.{key}: {reason}"
    node.write_config({**node.node, key: value}, services)

    check = node.run_cli("check", "-c", str(node.config_path))
    assert check.returncode == 2 and check.stderr.strip() == expected, check.stderr

    node.send(signal.SIGHUP)
    line = next(x for x in node.wait_log("reload refused").splitlines() if "reload refused" in x)
    assert line.endswith(f"reload refused, still serving version 1: {expected}"), line
    time.sleep(0.2)
    assert node.process.poll() is None, f"the agent died on SIGHUP:\n{node.log()[-3000:]}"
    with Client(listen) as c:
        assert c.ident() == "web-1"

    copy = node.workdir / "start.toml"
    copy.write_text(node.config_path.read_text().replace(node.node_id, f"{node.node_id}-b"))
    start = node.run_cli("-c", str(copy), timeout=60)
    assert start.returncode == 2, start.stderr
    assert start.stderr.strip() == f"{copy}: node.{key}: {reason}", start.stderr
