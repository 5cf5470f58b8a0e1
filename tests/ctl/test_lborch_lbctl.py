"""lborch and lbctl as real processes over real ZeroMQ and a real SQLite file."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from lbcore.wire import report_request
from tests.support import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
[node]
id = "ctl-test"

[orchestrator]
store = "sqlite:///{store}"
control = "tcp://127.0.0.1:{control}"
publish = "tcp://127.0.0.1:{publish}"
heartbeat_ms = 100

[[service]]
name = "web"
listen = "127.0.0.1:18080"
algorithm = "wrr"

[[service.backend]]
id = "w1"
address = "127.0.0.1:9001"
weight = 1
"""


class Orch:
    def __init__(self, tmp: Path) -> None:
        self.control, self.publish = free_port(), free_port()
        self.config = tmp / "orch.toml"
        self.config.write_text(CONFIG.format(store=tmp / "state.db", control=self.control,
                                             publish=self.publish))
        self.log = tmp / "orch.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.control}"

    def start(self) -> Orch:
        self.starts += 1
        command = [sys.executable, "-m", "orchestrator.cli", "-c", str(self.config)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for(lambda: self.log.read_text().count("ready:") >= self.starts, 15, "lborch ready")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(10)


@pytest.fixture
def orch(tmp_path):
    o = Orch(tmp_path)
    o.start()
    yield o
    if o.process is not None and o.process.poll() is None:
        o.stop()


def lbctl(orch: Orch, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctl.lbctl", "--control", orch.endpoint, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_seeded_from_the_file_then_changed_with_lbctl(orch):
    listed = json.loads(lbctl(orch, "backend", "list", "--json").stdout)
    assert [(b["service"], b["id"], b["state"]) for b in listed] == [("web", "w1", "active")]
    added = lbctl(orch, "backend", "add", "web", "w2", "127.0.0.1:9002", "--weight", "2",
                  "--expected-version", "0")
    assert added.returncode == 0 and added.stdout.startswith("ok: version "), added
    removed = lbctl(orch, "backend", "remove", "web", "w1")
    assert removed.returncode == 0
    snapshot = json.loads(lbctl(orch, "snapshot", "show", "--json").stdout)["snapshot"]
    backends = json.loads(snapshot)["services"][0]["backends"]
    # w1 takes no new connection at once: marked draining (until drained, then gone)
    assert [b["id"] for b in backends if b.get("state", "active") == "active"] == ["w2"]


def test_conflict_exits_3_and_changes_nothing(orch):
    before = lbctl(orch, "backend", "list", "--json").stdout
    result = lbctl(orch, "backend", "set-weight", "web", "w1", "5", "--expected-version", "9")
    assert result.returncode == 3
    assert "expected version 9, current version 1" in result.stderr
    assert lbctl(orch, "backend", "list", "--json").stdout == before


def test_stale_health_revision_changes_nothing(orch):
    assert lbctl(orch, "health", "report", "w1", "down", "--revision", "5").returncode == 0
    stale = lbctl(orch, "health", "report", "w1", "up", "--revision", "4")
    assert stale.returncode == 1
    assert "revision 4 of w1 is not newer than the stored revision 5: nothing changed" in stale.stderr
    shown = json.loads(lbctl(orch, "health", "show", "--json").stdout)
    assert [(h["id"], h["state"], h["revision"], h["source"]) for h in shown] == [("w1", "down", 5, "report")]


def test_usage_errors_exit_2(orch):
    assert lbctl(orch, "backend", "frobnicate").returncode == 2
    assert lbctl(orch, "backend", "add", "web").returncode == 2


def test_a_dead_endpoint_is_a_clear_error_within_the_timeout(tmp_path):
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "ctl.lbctl", "--control", f"tcp://127.0.0.1:{free_port()}",
                             "--timeout", "1", "backend", "list"], capture_output=True, text=True, cwd=ROOT,
                            timeout=20)
    assert result.returncode == 1
    assert "no answer" in result.stderr
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("frames", [
    [b"not json"], [b'{"verb": "drop.tables"}'], [b'{"verb": "backend.add", "args": {"id": 3}}'],
    [b"\x00" * 70_000],
])
def test_bad_messages_get_an_error_reply_and_the_daemon_keeps_running(orch, frames):
    before = lbctl(orch, "backend", "list", "--json").stdout
    context = zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(orch.endpoint)
        sock.send_multipart(frames)
        assert sock.poll(5000), "no reply to a bad message"
        reply = json.loads(sock.recv())
    finally:
        sock.close(0)
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    assert orch.process is not None and orch.process.poll() is None
    assert lbctl(orch, "backend", "list", "--json").stdout == before


def test_a_huge_message_is_dropped_unread_and_the_daemon_keeps_running(orch):
    before = lbctl(orch, "backend", "list", "--json").stdout
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(orch.endpoint)
        sock.send_multipart([b"", b"{" * (8 << 20)])
        assert not sock.poll(1000), "a reply to a message past the receive limit"
    finally:
        sock.close(0)
    assert orch.process is not None and orch.process.poll() is None
    assert lbctl(orch, "backend", "list", "--json").stdout == before


def test_kill_9_after_an_acknowledged_write_loses_nothing(orch):
    added = lbctl(orch, "backend", "add", "web", "w9", "127.0.0.1:9009", "--expected-version", "0")
    assert added.returncode == 0
    acknowledged = int(added.stdout.split()[-1])
    assert orch.stop(signal.SIGKILL) == -signal.SIGKILL
    orch.start()
    listed = json.loads(lbctl(orch, "backend", "list", "--json").stdout)
    assert "w9" in {b["id"] for b in listed}
    snapshot = json.loads(json.loads(lbctl(orch, "snapshot", "show", "--json").stdout)["snapshot"])
    assert snapshot["version"] >= acknowledged  # versions never go backwards across a restart


def test_snapshots_and_heartbeats_are_published(orch):
    context = zmq.Context.instance()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{orch.publish}")
    try:
        deadline = time.monotonic() + 10
        seen_heartbeat = None
        while seen_heartbeat is None and time.monotonic() < deadline:
            if sub.poll(500):
                kind, body = sub.recv_multipart()
                if kind == b"heartbeat":
                    seen_heartbeat = json.loads(body)["version"]
        assert seen_heartbeat is not None
        t0 = time.monotonic()
        added = lbctl(orch, "backend", "add", "web", "w3", "127.0.0.1:9003")
        version = int(added.stdout.split()[-1])
        got = None
        while got is None and time.monotonic() < deadline + 10:
            if sub.poll(500):
                kind, body = sub.recv_multipart()
                if kind in (b"snapshot", b"delta") and json.loads(body)["version"] >= version:
                    got = json.loads(body)
        assert got is not None, "nothing published after the write"
        # one backend added: a delta naming just that backend
        assert [b["id"] for b in got["backends"]] == ["w3"], got
        print(f"\ncommit-to-published (incl. lbctl start-up): {(time.monotonic() - t0) * 1000:.0f} ms")
    finally:
        sub.close(0)


def test_apply_shows_the_diff_and_applies_it(orch, tmp_path):
    desired = tmp_path / "desired.toml"
    desired.write_text("""
[node]
id = "x"

[[service]]
name = "web"
listen = "127.0.0.1:18080"
algorithm = "maglev"

[[service.backend]]
id = "w1"
address = "127.0.0.1:9001"
weight = 3

[[service.backend]]
id = "w2"
address = "127.0.0.1:9002"
""")
    before = lbctl(orch, "backend", "list", "--json").stdout
    dry = lbctl(orch, "apply", "-f", str(desired), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "~ service web listen 127.0.0.1:18080 algorithm maglev",
        "~ backend web/w1 weight 1 -> 3",
        "+ backend web/w2 127.0.0.1:9002 weight 1",
    ]
    assert lbctl(orch, "backend", "list", "--json").stdout == before  # a dry run changes nothing
    applied = lbctl(orch, "apply", "-f", str(desired))
    assert applied.returncode == 0 and "ok: 3 changes" in applied.stdout, applied
    listed = {b["id"]: b for b in json.loads(lbctl(orch, "backend", "list", "--json").stdout)}
    assert (listed["w1"]["weight"], listed["w2"]["state"]) == (3, "active")
    assert json.loads(lbctl(orch, "policy", "get", "web", "--json").stdout)["algorithm"] == "maglev"
    again = lbctl(orch, "apply", "-f", str(desired))
    assert again.stdout.strip() == "no changes"
    # dropping w1 from the file drains it
    desired.write_text(desired.read_text().replace('id = "w1"\naddress = "127.0.0.1:9001"\nweight = 3\n', "")
                       .replace("[[service.backend]]\n\n[[service.backend]]", "[[service.backend]]"))
    drained = lbctl(orch, "apply", "-f", str(desired))
    assert "- backend web/w1 (drained)" in drained.stdout, drained


def test_a_burst_of_writes_gives_few_snapshots(orch):
    """Recompute is coalesced: 50 writes queued at once are answered, then
    published as far fewer versions (each one the state after a whole batch)."""
    context = zmq.Context.instance()
    sub = context.socket(zmq.SUB)
    dealer = context.socket(zmq.DEALER)
    for sock in (sub, dealer):
        sock.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"tcp://127.0.0.1:{orch.publish}")
    dealer.connect(orch.endpoint)
    try:
        wait_for(lambda: sub.poll(100) and sub.recv_multipart()[0] == b"heartbeat", 10, "subscribed")
        for weight in range(50):
            args = {"service": "web", "id": "w1", "weight": weight % 7}
            request = {"verb": "backend.set_weight", "args": args}
            dealer.send_multipart([b"", json.dumps(request).encode()])
        versions = []
        for _ in range(50):
            assert dealer.poll(10_000)
            versions.append(json.loads(dealer.recv_multipart()[-1])["result"]["version"])
        last = max(versions)
        published: list[int] = []
        deadline = time.monotonic() + 10
        while (not published or published[-1] < last) and time.monotonic() < deadline:
            if sub.poll(200):
                kind, body = sub.recv_multipart()
                if kind in (b"snapshot", b"delta"):
                    published.append(json.loads(body)["version"])
        assert published and published[-1] == last  # the final state is published
        assert len(published) < 25, f"{len(published)} publications for 50 writes"
        print(f"\n50 writes -> {len(published)} publications")
    finally:
        sub.close(0)
        dealer.close(0)


def test_the_endpoint_comes_from_the_environment_or_the_config_file(orch):
    base = [sys.executable, "-m", "ctl.lbctl"]
    env = {**os.environ, "LBCTL_CONTROL": orch.endpoint}
    from_env = subprocess.run([*base, "backend", "list", "--json"], capture_output=True, text=True, cwd=ROOT,
                              env=env, timeout=20)
    assert from_env.returncode == 0 and json.loads(from_env.stdout), from_env.stderr
    env.pop("LBCTL_CONTROL")
    from_file = subprocess.run([*base, "-c", str(orch.config), "backend", "list", "--json"],
                               capture_output=True, text=True, cwd=ROOT, env=env, timeout=20)
    assert from_file.returncode == 0 and json.loads(from_file.stdout) == json.loads(from_env.stdout)
    node_file = orch.config.parent / "node.toml"
    node_file.write_text(f'[node]\nid = "n1"\ncontrol = "{orch.endpoint}"\n'
                         f'subscribe = "tcp://127.0.0.1:{orch.publish}"\n')
    from_node_file = subprocess.run([*base, "-c", str(node_file), "backend", "list", "--json"],
                                    capture_output=True, text=True, cwd=ROOT, env=env, timeout=20)
    assert from_node_file.returncode == 0, from_node_file.stderr
    assert json.loads(from_node_file.stdout) == json.loads(from_env.stdout)
    static_file = orch.config.parent / "static.toml"
    static_file.write_text('[node]\nid = "n2"\n')
    nowhere = subprocess.run([*base, "-c", str(static_file), "status"], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=20)
    assert nowhere.returncode == 2 and "names no control plane" in nowhere.stderr


def test_remove_drains_first_and_final_removes_at_once(orch):
    # with no node, nothing can hold a connection: the drain is confirmed at once
    assert lbctl(orch, "backend", "remove", "web", "w1").returncode == 0
    assert lbctl(orch, "backend", "wait-drained", "web", "w1", "--timeout-ms", "5000").returncode == 0
    (record,) = json.loads(lbctl(orch, "backend", "list", "--json").stdout)
    assert (record["state"], record["drain"]["then"], record["drain"]["ended"]) == ("removed", "remove",
                                                                                     "confirmed")
    assert lbctl(orch, "backend", "add", "web", "w1", "127.0.0.1:9001").returncode == 0
    (record,) = json.loads(lbctl(orch, "backend", "list", "--json").stdout)
    assert record["drain"] is None and record["state"] == "active"
    # a write naming a stale record version is refused and changes nothing
    final_at = ("backend", "remove", "web", "w1", "--final", "--expected-version")
    stale = lbctl(orch, *final_at, str(record["version"] - 1))
    assert stale.returncode == 3, stale
    final = lbctl(orch, *final_at, str(record["version"]))
    assert final.returncode == 0, final.stderr
    (after,) = json.loads(lbctl(orch, "backend", "list", "--json").stdout)
    assert (after["state"], after["version"], after["drain"]) == ("removed", record["version"] + 1, None)
    again = lbctl(orch, "backend", "remove", "web", "w1", "--final")
    assert again.returncode == 1 and "is removed; cannot become removed" in again.stderr
    # a removed id may be registered again
    assert lbctl(orch, "backend", "add", "web", "w1", "127.0.0.1:9009").returncode == 0


def test_a_refused_node_report_leaves_the_status_as_it_was(orch):
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)

    def call(verb: str, **args: object) -> dict:
        sock.send(json.dumps({"verb": verb, "args": args}).encode())
        assert sock.poll(5000)
        return json.loads(sock.recv())

    try:
        sock.connect(orch.endpoint)
        assert call("node.report", node="n1", epoch=0, version=1, staleness_ms=5, counters={})["ok"]
        refused = call("node.report", node="n1", epoch=0, version=2, staleness_ms=5, counters=[1])
        assert refused["error"]["code"] == "bad_request"
        (node,) = call("status")["result"]["nodes"]
        assert (node["node"], node["applied_version"]) == ("n1", 1)
    finally:
        sock.close(0)


def test_a_nodes_report_is_answered_only_when_refused_and_the_ack_keeps_the_digest_of_its_version(orch):
    """Nodes report from a DEALER (no delimiter frame): an accepted report
    gets no reply (fire and forget), a refused one gets its reason. An ACK
    without a digest keeps the digest the node last reported for that same
    version, and knows none for a newer one."""
    context = zmq.Context.instance()
    dealer, req = context.socket(zmq.DEALER), context.socket(zmq.REQ)
    try:
        for sock in (dealer, req):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(orch.endpoint)

        def report(**args: object) -> None:
            dealer.send(json.dumps({"verb": "node.report", "args": args}).encode())

        def node_view() -> dict:
            req.send(json.dumps({"verb": "snapshot.node", "args": {"node": "n1"}}).encode())
            assert req.poll(5000)
            return json.loads(req.recv())["result"]

        def view_at(version: int) -> dict:
            # the reports travel on another connection than the query: no order between them
            wait_for(lambda: node_view()["applied_version"] == version, 5, f"the report of version {version}")
            return node_view()

        report(node="n1", epoch=0, version=1, staleness_ms=5, counters={}, digest="d1" * 32)
        report(node="n1", epoch=0, version=1, staleness_ms=5)
        assert not dealer.poll(300), "an accepted report was answered"
        assert view_at(1)["digest"] == "d1" * 32
        report(node="n1", epoch=0, version=2, staleness_ms=5)
        assert view_at(2)["digest"] == ""
        # the ACK exactly as a node writes it (read without a JSON parse): the same rules
        def staleness() -> int:
            req.send(json.dumps({"verb": "status", "args": {}}).encode())
            assert req.poll(5000)
            (node,) = json.loads(req.recv())["result"]["nodes"]
            return node["staleness_ms"]

        report(node="n1", epoch=0, version=3, staleness_ms=5, counters={}, digest="d3" * 32)
        dealer.send(report_request("n1", 0, 3, 7, None))  # after the report: the same connection
        wait_for(lambda: staleness() == 7, 5, "the ACK of version 3")
        assert node_view()["digest"] == "d3" * 32
        dealer.send(report_request("n1", 0, 4, 8, None))
        wait_for(lambda: staleness() == 8, 5, "the ACK of version 4")
        assert node_view()["applied_version"] == 4 and node_view()["digest"] == ""
        assert not dealer.poll(300), "an ACK was answered"
        report(node="n1", epoch=0, version="2", staleness_ms=5)
        assert dealer.poll(5000), "a refused report got no answer"
        refused = json.loads(dealer.recv())
        assert refused["error"]["code"] == "bad_request" and "version" in refused["error"]["message"]
    finally:
        dealer.close(0)
        req.close(0)


def test_a_control_plane_file_needs_no_node_table(tmp_path):
    """The README's [orchestrator] example has no [node] table: lborch once
    refused it (node.id: required). A [node] table, when there is one, is
    still checked; lbctl apply takes a file of services alone too."""
    o = Orch(tmp_path)
    o.config.write_text(o.config.read_text().replace('[node]\nid = "ctl-test"\n', ""))
    assert "[node]" not in o.config.read_text()
    o.start()
    try:
        listed = lbctl(o, "backend", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [(b["service"], b["id"]) for b in json.loads(listed.stdout)] == [("web", "w1")]
        services = tmp_path / "services.toml"
        services.write_text('[[service]]\nname = "web"\nlisten = "127.0.0.1:18080"\n'
                            '[[service.backend]]\nid = "w1"\naddress = "127.0.0.1:9001"\nweight = 4\n')
        applied = lbctl(o, "apply", "-f", str(services))
        assert applied.returncode == 0, applied.stderr
        assert "weight 1 -> 4" in applied.stdout
    finally:
        o.stop()
    bad = tmp_path / "bad-node.toml"
    bad.write_text(o.config.read_text() + '\n[node]\nworkers = 0\n')
    check = subprocess.run([sys.executable, "-m", "orchestrator.cli", "--check", "-c", str(bad)],
                           capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert check.returncode == 2 and check.stderr.strip() == f"{bad}: node.id: required", check.stderr


def _start_lborch(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "-c", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=30, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_store_file_is_one_line_naming_it(tmp_path, damage):
    """A store file that is not one (or was cut short) once gave a
    traceback. One line names the file and what to do; exit 1; the file
    is left as it was for the operator to look at."""
    o = Orch(tmp_path)
    store = tmp_path / "state.db"
    if damage == "garbage":
        store.write_bytes(os.urandom(5000))
    else:
        o.start()
        lbctl(o, "backend", "set-weight", "web", "w1", "2")
        o.stop()
        for leftover in tmp_path.glob("state.db-*"):
            leftover.unlink()
        with open(store, "r+b") as f:
            f.truncate(5000)
    before = store.read_bytes()
    done = _start_lborch(o.config)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"lborch: {store}: not a Fulcrum store, or damaged ("), done.stderr
    assert store.read_bytes() == before


def test_a_store_on_a_read_only_file_system_is_one_line_naming_it(tmp_path):
    """A store that cannot be written once gave a traceback."""
    mount = tmp_path / "ro"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        o = Orch(tmp_path)
        o.config.write_text(o.config.read_text().replace(f"sqlite:///{tmp_path}/state.db",
                                                         f"sqlite:///{mount}/state.db"))
        o.start()
        o.stop()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        done = _start_lborch(o.config)
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"lborch: {mount}/state.db: cannot be written ("), done.stderr
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_reports_are_checked_and_what_is_kept_of_them_is_bounded(orch):
    """One report with counters {"web": 1} once made lbctl status fail for
    everyone; 2,000 large reports from invented node names took lborch from
    42 MB to 724 MB and status --json to 231 MB. Reports are checked like
    any request; what is kept per node and in all is bounded."""
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(orch.endpoint)
    try:
        dealer.send(json.dumps({"verb": "node.report", "args": {
            "node": "n1", "epoch": 0, "version": 1, "staleness_ms": 5, "counters": {"web": 1}}}).encode())
        assert dealer.poll(5000), "a refused report got no answer"
        reply = json.loads(dealer.recv())
        assert reply["ok"] is False and "counters.web: must be an object" in reply["error"]["message"]
        status = lbctl(orch, "status")
        assert status.returncode == 0, status.stderr
        status = json.loads(lbctl(orch, "status", "--json").stdout)
        assert status["nodes"] == []
        epoch, version = status["epoch"], status["version"]

        assert orch.process is not None
        before = _rss_mb(orch.process.pid)
        rows = {"web": {f"b{i}": {"active": i, "total": 2 * i, "failed": 0} for i in range(500)}}
        for n in range(2000):  # on this store's epoch and version: as real as reports get
            dealer.send(report_request(f"invented-{n}", epoch, version, 5, rows, ""))
        def status_json() -> subprocess.CompletedProcess[str]:
            return lbctl(orch, "--timeout", "30", "status", "--json", timeout=60)

        wait_for(lambda: "invented-1999" in status_json().stdout, 60, "the last report")
        done = status_json()
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        grown = _rss_mb(orch.process.pid) - before
        print(f"\nlborch RSS {before:.0f} MB -> +{grown:.0f} MB, "
              f"status --json {len(done.stdout) / 1e6:.1f} MB")
        assert len(status["nodes"]) <= 1024
        kept = sum(len(b) for n in status["nodes"] for b in n["counters"].values())
        assert kept <= 50_000 + len(status["nodes"])
        assert len(done.stdout) < 20_000_000
        assert grown < 200, f"lborch grew by {grown:.0f} MB"
        # reports of another epoch keep no counters, and few of their nodes
        for n in range(200):
            dealer.send(report_request(f"other-{n}", epoch + 1, 1, 5, rows, ""))
        wait_for(lambda: "other-199" in status_json().stdout, 60, "the other epoch's last report")
        status = json.loads(status_json().stdout)
        others = [n for n in status["nodes"] if n["epoch"] != epoch]
        assert len(others) <= 64 and all(n["counters"] == {} for n in others)
    finally:
        dealer.close(0)


def test_a_node_on_the_published_version_with_other_bytes_starts_one_new_epoch(orch):
    """A store restored from an older copy may catch up with its nodes'
    version before any of them reports: then only the bytes differ. The
    control plane takes a new epoch for that too, and only one for a burst
    of such reports (until it is published)."""
    status = json.loads(lbctl(orch, "status", "--json").stdout)
    epoch, version = status["epoch"], status["version"]
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(orch.endpoint)
    try:
        for n in range(5):
            dealer.send(report_request(f"old-{n}", epoch, version, 5, {}, "ab" * 32, 5000))
        wait_for(lambda: json.loads(lbctl(orch, "status", "--json").stdout)["epoch"] != epoch, 10,
                 "a new epoch published")
        time.sleep(0.5)
        assert orch.log.read_text().count("STORE BEHIND ITS NODES") == 1, orch.log.read_text()
        # the same bytes as the control plane's: nothing to say
        now = json.loads(lbctl(orch, "status", "--json").stdout)
        snapshot = json.loads(lbctl(orch, "snapshot", "show", "--json").stdout)["snapshot"]
        import hashlib
        dealer.send(report_request("new-0", now["epoch"], now["version"], 5, {},
                                   hashlib.sha256(snapshot.encode()).hexdigest(), 5000))
        time.sleep(0.5)
        assert orch.log.read_text().count("STORE BEHIND ITS NODES") == 1
    finally:
        dealer.close(0)


def test_apply_makes_a_services_health_and_outlier_tables_the_files(orch, tmp_path):
    desired = tmp_path / "desired.toml"
    desired.write_text("""
[[service]]
name = "web"
listen = "127.0.0.1:18080"
[service.health]
kind = "http"
path = "/ready"
[service.outlier]
max_ejection_percent = 20

[[service.backend]]
id = "w1"
address = "127.0.0.1:9001"
""")
    dry = lbctl(orch, "apply", "-f", str(desired), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "~ service web listen 127.0.0.1:18080 algorithm wrr; health kind none -> http, path / -> /ready; "
        "outlier max_ejection_percent 50 -> 20"]
    assert lbctl(orch, "apply", "-f", str(desired)).returncode == 0
    policy = json.loads(lbctl(orch, "policy", "get", "web", "--json").stdout)
    assert (policy["health"]["kind"], policy["health"]["path"], policy["outlier"]["max_ejection_percent"]) \
        == ("http", "/ready", 20)
    assert lbctl(orch, "apply", "-f", str(desired), "--dry-run").stdout.strip() == "no changes"


def test_status_watch_redraws_until_interrupted_and_follows_changes(orch):
    command = [sys.executable, "-m", "ctl.lbctl", "--control", orch.endpoint, "status", "--watch",
               "--interval-ms", "100"]
    watch = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        time.sleep(1.0)
        assert lbctl(orch, "backend", "set-weight", "web", "w1", "3").returncode == 0
        version = json.loads(lbctl(orch, "status", "--json").stdout)["version"]
        time.sleep(0.8)
        watch.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = watch.communicate(timeout=10)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)
    assert watch.returncode == 0, err
    frames = [f for f in out.split("--- ")[1:] if f.strip()]
    assert len(frames) >= 5, out  # about one every 100 ms (the lbctl start and requests take their share)
    assert all("(every 100 ms; Ctrl-C to stop)" in f for f in frames)
    assert "control plane version" in frames[0]
    assert f"control plane version {version} " in frames[-1], frames[-1]  # the change, seen without a restart
    assert "Traceback" not in err


@pytest.mark.parametrize("interval", ["0", "99", "3600001", "soon"])
def test_status_watch_refuses_an_interval_out_of_range(orch, interval):
    done = lbctl(orch, "status", "--watch", "--interval-ms", interval)
    assert done.returncode == 2 and "--interval-ms" in done.stderr, done
