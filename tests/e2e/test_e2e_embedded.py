"""Embedded mode (``node.control = "embedded"`` plus an [orchestrator] table
in the same file): the node agent runs ``python -m orchestrator.cli
--parent-pid AGENT`` as a child, restarts it when it dies, and stops it when
the node stops; ``lbproxy quickstart`` is such a node with demo backends.

All real processes on 127.0.0.0/8. Every loop is bounded in count and time.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest
from e2e_support import (
    LBPROXY,
    ROOT,
    Client,
    child_env,
    children_of,
    descendants_of,
    free_port,
    pid_alive,
    service,
    shm_path,
    wait_until,
)

ORCHESTRATOR_MARK = b"orchestrator.cli"
QUICKSTART_PORTS = (8080, 9001, 9002, 9003, 7700, 7701)
QUICKSTART_NODE_ID = "quickstart"


# ---------------------------------------------------------------- helpers


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def is_orchestrator(pid: int) -> bool:
    return any(ORCHESTRATOR_MARK.decode() in part for part in cmdline(pid))


def orchestrator_children(agent_pid: int) -> list[int]:
    """Live direct children of the agent that run ``orchestrator.cli``."""
    return [p for p in children_of(agent_pid) if pid_alive(p) and is_orchestrator(p)]


def the_orchestrator_child(agent_pid: int) -> int:
    """The single live control-plane child of the agent (waits up to 10 s)."""
    found = wait_until(lambda: orchestrator_children(agent_pid), 10,
                       message=f"an orchestrator.cli child of {agent_pid}")
    assert len(found) == 1, f"expected one control-plane child, found {found}"
    return found[0]


def lbctl(*args: str) -> subprocess.CompletedProcess[str]:
    """``lbctl`` as a real process (``python -m ctl.lbctl``)."""
    return subprocess.run([sys.executable, "-m", "ctl.lbctl", "--timeout", "5", *args],
                          capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=30)


def written_version(done: subprocess.CompletedProcess[str]) -> int:
    assert done.returncode == 0, f"lbctl exited {done.returncode}: {done.stderr}"
    return int(done.stdout.split()[-1])  # "ok: version N"


def embedded_node(lbproxy, workdir: Path, backends: list[tuple[str, str, int]]):
    """An embedded-mode node (one worker) on a free port; not started."""
    port, control, publish = free_port(), free_port(), free_port()
    node = lbproxy([service("web", f"127.0.0.1:{port}", backends)], start=False,
                   workers=1, control="embedded")
    node.write_config_text(node.config_path.read_text() + (
        f'\n[orchestrator]\nstore = "sqlite:///{workdir / f"{node.node_id}.db"}"\n'
        f'control = "tcp://127.0.0.1:{control}"\npublish = "tcp://127.0.0.1:{publish}"\n'
        "heartbeat_ms = 100\n"))
    return node, port


def ident_of_new_connection(port: int) -> str:
    with Client(f"127.0.0.1:{port}", timeout=5) as c:
        return c.ident()


def end_by_pid(pids: Iterable[int], mark: bytes) -> list[int]:
    """SIGKILL each live pid whose command line contains ``mark`` (a pid may
    have been reused by someone else's process); the ones it had to end."""
    ended = []
    for pid in pids:
        if pid_alive(pid) and mark.decode() in " ".join(cmdline(pid)):
            try:
                os.kill(pid, signal.SIGKILL)
                ended.append(pid)
            except ProcessLookupError:
                pass
    return ended


@pytest.fixture
def orchestrator_pids() -> Iterable[set[int]]:
    """PIDs of control-plane children seen by a test. Requested before
    ``lbproxy``, so this teardown runs after the node's own (which checks,
    and reports, what was left): a last resort that ends them by PID."""
    pids: set[int] = set()
    yield pids
    end_by_pid(pids, ORCHESTRATOR_MARK)


# ---------------------------------------------------------------- tests


@pytest.mark.timeout(180)
def test_node_serves_through_a_kill_9_of_its_control_plane_which_is_restarted(
        orchestrator_pids, backends, lbproxy, workdir):
    b = backends({"w1": "127.0.0.1", "w2": "127.0.0.1", "w3": "127.0.0.1"})
    node, port = embedded_node(lbproxy, workdir, [("w1", b["w1"], 1)])
    node.start()
    node.wait_log("applied: version")
    first = the_orchestrator_child(node.pid)
    orchestrator_pids.add(first)
    assert f"--parent-pid {node.pid}" in " ".join(cmdline(first)), cmdline(first)
    assert ident_of_new_connection(port) == "w1"

    # a write acknowledged right before the kill
    acknowledged = written_version(lbctl("-c", str(node.config_path), "backend", "add", "web", "w2", b["w2"]))
    wait_until(lambda: int(node.stats()["version"]) >= acknowledged, 10,
               message="the node to apply the acknowledged write")
    ready_before = node.log().count("lborch: ready")
    assert ready_before == 1, node.log()

    os.kill(first, signal.SIGKILL)
    killed_at = time.monotonic()
    failures: list[str] = []
    seen: Counter[str] = Counter()
    during_outage = after_restart = 0
    second: int | None = None
    # new connections all the time: while the control plane is down, while it
    # restarts, and a while after (at least 2.5 s; at most 10 s, 2000 tries)
    for _ in range(2000):
        elapsed = time.monotonic() - killed_at
        if elapsed > 10 or (elapsed > 2.5 and second is not None and after_restart >= 10):
            break
        restarted = node.log().count("lborch: ready") > ready_before
        try:
            seen[ident_of_new_connection(port)] += 1
        except (OSError, EOFError) as exc:
            failures.append(f"{elapsed:.2f}s: {exc!r}")
        if restarted:
            after_restart += 1
        else:
            during_outage += 1
        if second is None:
            now = [p for p in orchestrator_children(node.pid) if p != first]
            if now:
                second = now[0]
                orchestrator_pids.add(second)
        time.sleep(0.01)
    log = node.log()
    print(f"\nkill -9 of the control plane: {sum(seen.values())} connections ({during_outage} while it was "
          f"down, {after_restart} after its restart), {len(failures)} failed; {dict(seen)}")
    assert failures == [], f"{len(failures)} failed connections: {failures[:5]}\n{log}"
    assert set(seen) <= {"w1", "w2"} and seen["w2"] > 0, seen
    assert during_outage > 0, "no connection was made while the control plane was down"
    assert after_restart > 0, f"the control plane did not come back within 10 s:\n{log}"
    assert "embedded control plane exited with status -9; restarting" in log, log
    assert second is not None and second != first, f"no new control-plane child:\n{log}"
    assert not pid_alive(first)
    assert orchestrator_children(node.pid) == [second]
    assert f"--parent-pid {node.pid}" in " ".join(cmdline(second)), cmdline(second)
    node.remember_pids()  # the node's teardown checks the new child is gone after stop

    # the acknowledged write survived the kill -9
    listed = lbctl("-c", str(node.config_path), "backend", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {x["id"] for x in json.loads(listed.stdout)} == {"w1", "w2"}, listed.stdout

    # and the restarted control plane takes writes that reach the data path
    added = written_version(lbctl("-c", str(node.config_path), "backend", "add", "web", "w3", b["w3"]))
    assert added > acknowledged  # the version did not go backwards across the restart

    def reached_w3() -> bool:
        return any(ident_of_new_connection(port) == "w3" for _ in range(3))

    wait_until(reached_w3, 15, interval=0.1, message=lambda: f"a connection to w3; log:\n{node.log()}")
    assert int(node.stats()["version"]) >= added
    assert node.stop() == 0
    wait_until(lambda: not pid_alive(second), 5, message="the restarted control plane to stop")


@pytest.mark.timeout(120)
def test_sigterm_to_an_embedded_node_stops_its_control_plane_child(orchestrator_pids, backends, lbproxy,
                                                                   workdir):
    b = backends({"w1": "127.0.0.1"})
    node, port = embedded_node(lbproxy, workdir, [("w1", b["w1"], 1)])
    node.start()
    node.wait_log("applied: version")
    child = the_orchestrator_child(node.pid)
    orchestrator_pids.add(child)
    assert ident_of_new_connection(port) == "w1"
    workers = [p for p in descendants_of(node.pid) if p != child]
    assert workers, "no worker process under the agent"

    assert node.stop() == 0, node.log()
    wait_until(lambda: not pid_alive(child), 5,
               message=lambda: f"control plane {child} to stop:\n{node.log()}")
    assert not any(pid_alive(p) for p in workers), workers
    log = node.log()
    assert "lborch: stopped" in log, log  # it stopped cleanly, told by its node (not orphaned)
    assert "is gone; stopping" not in log, f"orphaned, not stopped by its node:\n{log}"
    assert "restarting" not in log, log  # the agent did not restart it while stopping
    assert not shm_path(node.node_id).exists()


def quickstart_ports_in_use() -> list[str]:
    """Which of quickstart's fixed ports something on this machine holds."""
    busy = []
    for port in QUICKSTART_PORTS:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
            try:
                s.bind(("127.0.0.1", port))
                s.listen(1)
            except OSError as exc:
                busy.append(f"127.0.0.1:{port} ({exc.strerror})")
    return busy


def http_get(port: int) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)  # no proxy from the environment
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        assert response.status == 200, response.status
        return response.read().decode().strip()
    finally:
        connection.close()


@pytest.mark.timeout(180)
def test_quickstart_rotates_answers_takes_lbctl_and_stops_clean(workdir):
    busy = quickstart_ports_in_use()
    if busy:
        pytest.skip(f"lbproxy quickstart needs fixed ports that are in use here: {', '.join(busy)}")
    if shm_path(QUICKSTART_NODE_ID).exists():
        pytest.skip(f"{shm_path(QUICKSTART_NODE_ID)} exists: another quickstart node may be running")
    log_path = workdir / "quickstart.log"

    def log() -> str:
        return log_path.read_text(errors="replace")

    with open(log_path, "wb") as out:
        process = subprocess.Popen([*LBPROXY, "quickstart"], stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, cwd=ROOT, env=child_env())
    tree: set[int] = set()
    try:
        wait_until(lambda: "applied: version" in log() or process.poll() is not None, 30,
                   message=lambda: f"quickstart to apply its services; log:\n{log()}")
        assert process.poll() is None, f"quickstart exited {process.returncode}:\n{log()}"
        assert "quickstart: try  curl http://127.0.0.1:8080/" in log(), log()
        child = the_orchestrator_child(process.pid)
        tree.update(descendants_of(process.pid))
        config = next(arg for arg in cmdline(child) if arg.endswith("quickstart.toml"))
        quickstart_dir = Path(config).parent
        assert quickstart_dir.is_dir() and (quickstart_dir / "state.db").exists(), quickstart_dir
        assert shm_path(QUICKSTART_NODE_ID).exists()

        answers = [http_get(8080) for _ in range(6)]
        assert Counter(answers) == {f"hello from web-{n}": 2 for n in (1, 2, 3)}, answers
        assert all(len(set(answers[i:i + 3])) == 3 for i in range(4)), answers  # a rotation

        def status() -> subprocess.CompletedProcess[str] | None:
            done = lbctl("--control", "tcp://127.0.0.1:7700", "status")
            return done if done.returncode != 0 or "quickstart:" in done.stdout else None

        shown = wait_until(status, 10, interval=0.2, message="lbctl status to list the quickstart node")
        assert shown.returncode == 0, shown.stderr
        assert "1 nodes" in shown.stdout and "quickstart: applied" in shown.stdout, shown.stdout
        as_json = json.loads(lbctl("--control", "tcp://127.0.0.1:7700", "status", "--json").stdout)
        assert [n["node"] for n in as_json["nodes"]] == ["quickstart"], as_json

        tree.update(descendants_of(process.pid))
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log()
        wait_until(lambda: not any(pid_alive(p) for p in tree), 5,
                   message=lambda: f"quickstart's processes {[p for p in tree if pid_alive(p)]} to end")
        assert not pid_alive(child)
        assert not shm_path(QUICKSTART_NODE_ID).exists()
        assert not any(p.name.startswith(f"fulcrum-{QUICKSTART_NODE_ID}") for p in Path("/dev/shm").iterdir())
        assert not quickstart_dir.exists(), f"{quickstart_dir} left behind"
        assert "lborch: stopped" in log() and "is gone; stopping" not in log(), log()
        assert quickstart_ports_in_use() == []
    finally:
        if process.poll() is None:
            tree.update(descendants_of(process.pid))
            process.kill()
            process.wait(10)
            shm_path(QUICKSTART_NODE_ID).unlink(missing_ok=True)  # it did not exist before we started
        end_by_pid(tree, ORCHESTRATOR_MARK)
        end_by_pid(tree, b"lbcore.worker_main")
