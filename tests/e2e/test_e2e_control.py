"""Nodes fed by a control plane: lborch + several lbproxy nodes on distinct
loopback addresses + lbctl, all real processes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from e2e_support import (
    ROOT,
    Client,
    Orchestrator,
    applied_version,
    child_env,
    free_port,
    pid_alive,
    service,
    shm_path,
    start_nodes,
    wait_until,
)


@pytest.fixture
def control_plane(workdir):
    made: list[Orchestrator] = []

    def start(services: list[dict]) -> Orchestrator:
        orch = Orchestrator(workdir, services)
        orch.start()
        made.append(orch)
        return orch

    yield start
    for orch in made:
        orch.stop()


@pytest.mark.timeout(180)
def test_add_and_remove_propagate_to_every_node(backends, lbproxy, control_plane):
    b = backends({"w1": "127.0.0.1", "w2": "127.0.0.1"})
    port = free_port()
    orch = control_plane([service("web", f"127.0.0.1:{port}", [("w1", b["w1"], 1)])])
    nodes = start_nodes(lbproxy, orch, 3)
    for i in range(3):
        with Client(f"127.0.0.{i + 2}:{port}") as c:
            assert c.ident() == "w1"

    t0 = time.monotonic()
    added = orch.lbctl("backend", "add", "web", "w2", b["w2"], "--expected-version", "0")
    assert added.returncode == 0, added.stderr
    version = int(added.stdout.split()[-1])
    wait_until(lambda: all(applied_version(n) >= version for n in nodes), 10)
    print(f"\npropagation commit -> applied on 3 nodes: {(time.monotonic() - t0) * 1000:.0f} ms")
    for i in range(3):
        seen = Counter()
        for _ in range(6):
            with Client(f"127.0.0.{i + 2}:{port}") as c:
                seen[c.ident()] += 1
        assert seen == {"w1": 3, "w2": 3}, (i, seen)

    removed = orch.lbctl("backend", "remove", "web", "w1")
    assert removed.returncode == 0, removed.stderr
    version = int(removed.stdout.split()[-1])
    wait_until(lambda: all(applied_version(n) >= version for n in nodes), 10)
    for i in range(3):
        for _ in range(6):
            with Client(f"127.0.0.{i + 2}:{port}") as c:
                assert c.ident() == "w2"

    def converged() -> bool:
        status = json.loads(orch.lbctl("status", "--json").stdout)
        applied = {n["applied_version"] for n in status["nodes"]}
        return len(status["nodes"]) == 3 and applied == {status["version"]}

    wait_until(converged, 10)
    # the published version's commit, on this host's monotonic clock (what the benchmark times from)
    committed = json.loads(orch.lbctl("status", "--json").stdout)["version_committed_ns"]
    assert isinstance(committed, int) and t0 * 1e9 < committed < time.monotonic_ns()

    def w2_totals() -> list[int]:  # per node, from its periodic report (every 0.5 s)
        status = json.loads(orch.lbctl("status", "--json").stdout)
        return [n["counters"].get("web", {}).get("w2", {}).get("total", -1) for n in status["nodes"]]

    # per-backend counters, per node: 3 connections to w2 while w1 was there, 6 after
    wait_until(lambda: w2_totals() == [9, 9, 9], 10)

    def audited(node_id: str) -> dict:
        return json.loads(orch.lbctl("snapshot", "show", "--node", node_id, "--json").stdout)

    for node in nodes:  # I2 audit: each node's applied snapshot hashes like the control plane's
        # the digest comes with the node's periodic report (every 0.5 s), not with its ACK
        shown = wait_until(lambda n=node.node_id: (v := audited(n))["consistent"] is not None and v, 5)
        assert shown["current"] and shown["consistent"], shown


@pytest.mark.timeout(180)
def test_maglev_sends_one_client_address_to_one_backend_through_every_node(backends, lbproxy, control_plane):
    ids = ["m1", "m2", "m3", "m4"]
    b = backends({i: "127.0.0.1" for i in ids})
    port = free_port()
    orch = control_plane([service("web", f"127.0.0.1:{port}", [(i, b[i], 1) for i in ids],
                                  algorithm="maglev")])
    start_nodes(lbproxy, orch, 3)
    for source in ("127.0.5.1", "127.0.5.2", "127.0.5.3"):
        chosen = set()
        for i in range(3):
            with Client(f"127.0.0.{i + 2}:{port}", source=source) as c:
                chosen.add(c.ident())
        assert len(chosen) == 1, (source, chosen)


@pytest.mark.timeout(180)
def test_nodes_serve_through_a_control_plane_outage_and_converge_after(backends, lbproxy, control_plane):
    b = backends({"w1": "127.0.0.1", "w2": "127.0.0.1"})
    port = free_port()
    orch = control_plane([service("web", f"127.0.0.1:{port}", [("w1", b["w1"], 1)])])
    nodes = start_nodes(lbproxy, orch, 2)
    acknowledged = orch.lbctl("backend", "add", "web", "w2", b["w2"])
    assert acknowledged.returncode == 0
    version = int(acknowledged.stdout.split()[-1])
    orch.stop(signal.SIGKILL)  # right after an acknowledged write
    failures = 0
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:  # past max_staleness_ms: fail-static
        for i in range(2):
            try:
                with Client(f"127.0.0.{i + 2}:{port}", timeout=5) as c:
                    c.ident()
            except OSError:
                failures += 1
        time.sleep(0.05)
    assert failures == 0
    for node in nodes:
        node.wait_log("STALE")
    orch.start()
    listed = json.loads(orch.lbctl("backend", "list", "--json").stdout)
    assert "w2" in {x["id"] for x in listed}  # the acknowledged write survived kill -9
    wait_until(lambda: all(applied_version(n) >= version for n in nodes), 15)
    for node in nodes:
        node.wait_log("control plane heard again")
    # and the restarted control plane reaches them: a change made now arrives
    changed = orch.lbctl("backend", "set-weight", "web", "w2", "3")
    assert changed.returncode == 0, changed.stderr
    after = int(changed.stdout.split()[-1])
    assert after > version  # the version did not go backwards across the restart
    wait_until(lambda: all(applied_version(n) >= after for n in nodes), 15)


@pytest.mark.timeout(180)
def test_embedded_mode_runs_the_control_plane_in_the_node_tree(backends, lbproxy, workdir):
    b = backends({"w1": "127.0.0.1", "w2": "127.0.0.1"})
    node, port, control = embedded_node(lbproxy, workdir, b)
    node.start()
    node.wait_log("applied: version")
    with Client(f"127.0.0.1:{port}") as c:
        assert c.ident() == "w1"
    endpoint = f"tcp://127.0.0.1:{control}"
    command = [sys.executable, "-m", "ctl.lbctl", "--control", endpoint,
               "backend", "add", "web", "w2", b["w2"]]
    added = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=30)
    assert added.returncode == 0, added.stderr
    version = int(added.stdout.split()[-1])
    wait_until(lambda: int(node.stats()["version"]) >= version, 10)
    seen = Counter()
    for _ in range(4):
        with Client(f"127.0.0.1:{port}") as c:
            seen[c.ident()] += 1
    assert seen == {"w1": 2, "w2": 2}
    child_pids = node.remember_pids()
    assert node.stop() == 0
    assert not any(pid_alive(p) for p in child_pids)


def embedded_node(lbproxy, workdir, b, heartbeat_ms: int = 100):
    port, control, publish = free_port(), free_port(), free_port()
    node = lbproxy([service("web", f"127.0.0.1:{port}", [("w1", b["w1"], 1)])], start=False,
                   workers=1, control="embedded")
    node.write_config_text(node.config_path.read_text() + (
        f'\n[orchestrator]\nstore = "sqlite:///{workdir / "embedded.db"}"\n'
        f'control = "tcp://127.0.0.1:{control}"\npublish = "tcp://127.0.0.1:{publish}"\n'
        f"heartbeat_ms = {heartbeat_ms}\n"))
    return node, port, control


@pytest.mark.timeout(120)
def test_embedded_mode_refuses_a_bad_orchestrator_table_and_starts_nothing(backends, lbproxy, workdir):
    b = backends({"w1": "127.0.0.1"})
    node, _, _ = embedded_node(lbproxy, workdir, b, heartbeat_ms=0)
    node.launch()
    assert node.wait_ready_or_exit() == 2
    assert "orchestrator" in node.log() and "heartbeat_ms" in node.log(), node.log()
    assert not shm_path(node.node_id).exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("table", ["", '\n[orchestrator]\ncontrol = "tcp://127.0.0.1:{control}"\n'],
                         ids=["no-table", "no-publish"])
def test_embedded_mode_needs_both_endpoints_named(backends, lbproxy, workdir, table):
    """The node connects to what the file names: an embedded node whose
    [orchestrator] table is missing, or names one endpoint only, is refused
    rather than started on the defaults."""
    b = backends({"w1": "127.0.0.1"})
    node = lbproxy([service("web", f"127.0.0.1:{free_port()}", [("w1", b["w1"], 1)])], start=False,
                   workers=1, control="embedded")
    node.write_config_text(node.config_path.read_text() + table.format(control=free_port()))
    node.launch()
    assert node.wait_ready_or_exit() == 2
    expected = (f'{node.config_path}: orchestrator: control = "embedded" needs an [orchestrator] table '
                "with control and publish")
    assert expected in node.log(), node.log()
    assert "Traceback" not in node.log(), node.log()
    assert not shm_path(node.node_id).exists()
    assert not list(workdir.glob("*.db")) and not (node.config_path.parent / "fulcrum-state.db").exists()


@pytest.mark.timeout(120)
def test_the_embedded_control_plane_ends_with_its_node(backends, lbproxy, workdir):
    b = backends({"w1": "127.0.0.1"})
    node, _, _ = embedded_node(lbproxy, workdir, b)
    node.start()
    node.wait_log("applied: version")
    tree = node.remember_pids()
    assert node.process is not None
    node.process.kill()  # kill -9 of the node agent
    node.process.wait(10)
    wait_until(lambda: not any(pid_alive(p) for p in tree), 15)
    shm_path(node.node_id).unlink(missing_ok=True)  # left by a kill -9, by design (reused on restart)


@pytest.mark.timeout(120)
def test_a_snapshot_the_node_cannot_apply_is_refused_once_and_the_next_one_applies(
        backends, lbproxy, control_plane):
    import socket

    b = backends({"w1": "127.0.0.1"})
    port, taken, free = free_port(), free_port(), free_port()
    orch = control_plane([service("web", f"127.0.0.1:{port}", [("w1", b["w1"], 1)])])
    (node,) = start_nodes(lbproxy, orch, 1)
    holder = socket.socket()
    holder.bind(("127.0.0.2", taken))  # someone else holds the address the next service wants
    holder.listen()
    try:
        bad = orch.lbctl("policy", "set", "api", "--algorithm", "wrr", "--listen", f"127.0.0.1:{taken}")
        assert bad.returncode == 0, bad.stderr
        bad_version = int(bad.stdout.split()[-1])
        node.wait_log(f"snapshot version {bad_version} refused")
        time.sleep(1.0)  # ten heartbeats announce the version the node refused
        assert node.log().count(f"snapshot version {bad_version} refused") == 1, node.log()
        assert applied_version(node) < bad_version
        with Client(f"127.0.0.2:{port}") as c:  # the last good snapshot keeps serving
            assert c.ident() == "w1"
        good = orch.lbctl("policy", "set", "api", "--algorithm", "wrr", "--listen", f"127.0.0.1:{free}")
        assert good.returncode == 0, good.stderr
        wait_until(lambda: applied_version(node) >= int(good.stdout.split()[-1]), 10)
    finally:
        holder.close()


def _status(orch: Orchestrator) -> dict:
    done = orch.lbctl("status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _converged(orch: Orchestrator, nodes: list) -> bool:
    status = _status(orch)
    return len(status["nodes"]) == len(nodes) and all(
        n["epoch"] == status["epoch"] and n["applied_version"] == status["version"] for n in status["nodes"])


@pytest.mark.timeout(120)
def test_nodes_follow_a_store_restored_from_an_older_copy(backends, lbproxy, control_plane, workdir):
    """The store goes back in time (restored from a backup): the control
    plane publishes version 1 while its nodes hold 3 of the same store.
    Nodes once held 3 forever (lag -2), serving the newer routing with no
    error anywhere. The control plane sees its nodes ahead of it, starts a
    new epoch, and the nodes re-base on the restored store."""
    b = backends({"w1": "127.0.0.1", "w2": "127.0.0.1"})
    port = free_port()
    orch = control_plane([service("web", f"127.0.0.1:{port}", [("w1", b["w1"], 1)])])
    nodes = start_nodes(lbproxy, orch, 2)
    epoch = _status(orch)["epoch"]
    orch.stop()
    store = workdir / "state.db"
    backup = workdir / "state.db.backup"
    backup.write_bytes(store.read_bytes())  # version 1: w1 only
    orch.start()
    assert orch.lbctl("backend", "add", "web", "w2", b["w2"]).returncode == 0
    # removed at once: a drain would end in one more version
    assert orch.lbctl("backend", "remove", "web", "w1", "--final").returncode == 0
    wait_until(lambda: _converged(orch, nodes) and _status(orch)["version"] == 3, 15)
    with Client(f"127.0.0.2:{port}") as c:
        assert c.ident() == "w2"
    orch.stop()
    for leftover in workdir.glob("state.db-*"):
        leftover.unlink()
    store.write_bytes(backup.read_bytes())
    orch.start()
    wait_until(lambda: "STORE BEHIND ITS NODES" in orch.log.read_text(), 15,
               message=lambda: orch.log.read_text()[-2000:])
    wait_until(lambda: _converged(orch, nodes), 15, message=lambda: json.dumps(_status(orch)))
    status = _status(orch)
    assert status["epoch"] != epoch and status["version"] >= 1
    assert all(n["lag"] == 0 for n in status["nodes"]), status
    for i, node in enumerate(nodes):
        assert "EPOCH CHANGED" in node.log(), node.log()[-2000:]
        with Client(f"127.0.0.{i + 2}:{port}") as c:
            assert c.ident() == "w1"  # the restored store's routing


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loss", ["deleted", "emptied"])
def test_nodes_follow_a_store_lost_and_started_anew(backends, lbproxy, control_plane, workdir, loss):
    """A store lost (its file gone, or left empty) is a new store: said so
    in the log, seeded from the file, and the nodes re-base on it."""
    b = backends({"w1": "127.0.0.1", "w2": "127.0.0.1"})
    port = free_port()
    orch = control_plane([service("web", f"127.0.0.1:{port}", [("w1", b["w1"], 1)])])
    nodes = start_nodes(lbproxy, orch, 2)
    for weight in ("2", "3", "4"):
        assert orch.lbctl("backend", "set-weight", "web", "w1", weight).returncode == 0
    assert orch.lbctl("backend", "add", "web", "w2", b["w2"]).returncode == 0
    wait_until(lambda: _converged(orch, nodes) and _status(orch)["version"] == 5, 15)
    epoch = _status(orch)["epoch"]
    orch.stop()
    for path in workdir.glob("state.db*"):
        path.unlink()
    if loss == "emptied":
        (workdir / "state.db").write_bytes(b"")
    orch.start()
    log = orch.log.read_text()
    assert f"{workdir / 'state.db'}: a new store, epoch " in log, log
    wait_until(lambda: _converged(orch, nodes), 15, message=lambda: json.dumps(_status(orch)))
    status = _status(orch)
    assert status["epoch"] != epoch and status["version"] == 1
    for i, node in enumerate(nodes):
        assert "EPOCH CHANGED" in node.log(), node.log()[-2000:]
        with Client(f"127.0.0.{i + 2}:{port}") as c:
            assert c.ident() == "w1"  # seeded afresh from the file: w1 alone


@pytest.mark.timeout(120)
def test_lbctl_verify_checks_the_fleet_against_the_store(backends, lbproxy, control_plane):
    """lbctl verify: I2 (store -> published routing -> every node's bytes),
    every node on the published epoch and version, I7 (staleness within
    each node's bound). Exit 0 and one line when consistent; 1 and each
    violation otherwise."""
    import zmq

    from lbcore.wire import report_request

    b = backends({"w1": "127.0.0.1", "w2": "127.0.0.1"})
    port = free_port()
    orch = control_plane([service("web", f"127.0.0.1:{port}", [("w1", b["w1"], 1)])])
    nodes = start_nodes(lbproxy, orch, 2)
    done = orch.lbctl("verify")
    assert done.returncode == 0, done.stdout + done.stderr
    version = _status(orch)["version"]
    assert done.stdout.strip().startswith(f"all 2 nodes consistent at version {version} (epoch ")
    assert orch.lbctl("backend", "add", "web", "w2", b["w2"]).returncode == 0
    done = orch.lbctl("verify", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["consistent"] is True, done.stdout

    stopped = nodes[1]
    stopped.send(signal.SIGSTOP)
    try:
        assert orch.lbctl("backend", "set-weight", "web", "w2", "3").returncode == 0
        time.sleep(1.5)  # past the nodes' max_staleness_ms (1000): the stopped one has not reported since
        done = orch.lbctl("verify", "--settle-ms", "0")
        assert done.returncode == 1, done.stdout
        lines = done.stdout.strip().splitlines()
        name = stopped.node_id
        assert any(line.startswith(f"node {name}: applied version {version + 1}, {version + 2} is published")
                   for line in lines), lines
        assert any(line.startswith(f"I7: node {name} has not reported for ") for line in lines), lines
        assert not any(nodes[0].node_id in line for line in lines), lines
    finally:
        stopped.send(signal.SIGCONT)
    done = orch.lbctl("verify", "--settle-ms", "5000")
    assert done.returncode == 0, done.stdout

    # a node that says it applied the published version, with other bytes:
    # the store may have gone back (restored, and caught up): a new epoch,
    # on which the real nodes re-base; verify names the one left behind
    status = _status(orch)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(orch.endpoint)
    try:
        dealer.send(report_request("liar", status["epoch"], status["version"], 5, {}, "00" * 32, 60_000))
        wait_until(lambda: "STORE BEHIND ITS NODES" in orch.log.read_text(), 10)
        done = orch.lbctl("verify", "--settle-ms", "5000", "--json")
        result = json.loads(done.stdout)
        assert done.returncode == 1 and result["epoch"] != status["epoch"]
        left_behind = f"node liar: on epoch {status['epoch']}, the store's is {result['epoch']}"
        assert result["violations"] == [left_behind]
    finally:
        dealer.close(0)
