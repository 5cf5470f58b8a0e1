"""``lbproxy stats`` (table and JSON) and SIGUSR1 (the table in the log)."""
from __future__ import annotations

import re
import signal
import socket

import pytest
from e2e_support import Client, free_port, pid_alive, service, wait_until

COUNTERS = ("active", "total", "failed", "bytes_to_backend", "bytes_to_client")


def _backend_rows(table: str, ids: list[str]) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        fields = line.split()
        if fields and fields[0] in ids:
            rows[fields[0]] = fields
    return rows


def _check_table(table: str, stats: dict, listen: str) -> None:
    node_id = stats["node"]
    heading = rf"^node {re.escape(node_id)}\s+snapshot version 1 \(published \d+ ms ago\)\s+workers 2$"
    assert re.search(heading, table, re.M), table
    for w in stats["workers"]:
        assert re.search(rf"^\s+worker {w['index']}\s+pid {w['pid']}\s", table, re.M), table
    assert re.search(rf"^service web\s+listen {re.escape(listen)}\s+algorithm wrr\s+accepted 6$",
                     table, re.M), table
    header = next(line for line in table.splitlines() if "backend" in line and "address" in line)
    assert header.split() == ["backend", "address", "weight", "elig", *COUNTERS], header
    backends = stats["services"][0]["backends"]
    rows = _backend_rows(table, [b["id"] for b in backends])
    assert set(rows) == {b["id"] for b in backends}, table
    for b in backends:
        assert rows[b["id"]] == [b["id"], b["address"], str(b["weight"]), "yes",
                                 *(str(b[name]) for name in COUNTERS)], rows[b["id"]]


@pytest.mark.timeout(120)
def test_stats_json_table_and_sigusr1(backends, lbproxy):
    b = backends({"web-1": "127.0.0.1", "web-2": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [("web-1", b["web-1"], 1), ("web-2", b["web-2"], 2)])],
                   workers=2)
    for n in range(6):
        with Client(listen) as c:
            c.ident()
            assert c.echo(b"hello %d\n" % n) == b"hello %d\n" % n
            c.sock.shutdown(socket.SHUT_WR)
            assert c.read_to_eof() == b"EOF\n"

    # JSON: the documented fields, consistent with the traffic just sent.
    def settled():
        s = node.stats()
        backends_ = s["services"][0]["backends"]
        return s if all(x["active"] == 0 and x["bytes_to_client"] > 0 for x in backends_) else None
    stats = wait_until(settled, 5, message=lambda: f"counters to settle: {node.stats()}")
    assert stats["node"] == node.node_id
    assert stats["version"] == 1
    assert isinstance(stats["generation"], int) and stats["generation"] >= 1
    assert isinstance(stats["checksum"], int)
    # the node stamps each snapshot as it publishes it (the monotonic clock)
    assert 0 <= stats["snapshot_age_ms"] < 600_000
    assert sorted(w["index"] for w in stats["workers"]) == [0, 1]
    worker_pids = {w["pid"] for w in stats["workers"]}
    assert worker_pids == set(node.remember_pids()), "stats pids are not the agent's children"
    assert all(pid_alive(p) for p in worker_pids)
    assert sum(w["accepted"] for w in stats["workers"]) == 6
    [svc] = stats["services"]
    assert (svc["name"], svc["listen"], svc["algorithm"], svc["accepted"]) == ("web", listen, "wrr", 6)
    by_id = {x["id"]: x for x in svc["backends"]}
    assert set(by_id) == {"web-1", "web-2"}
    assert (by_id["web-1"]["address"], by_id["web-1"]["weight"]) == (b["web-1"], 1)
    assert (by_id["web-2"]["address"], by_id["web-2"]["weight"]) == (b["web-2"], 2)
    assert by_id["web-1"]["total"] == 2 and by_id["web-2"]["total"] == 4
    for ident, x in by_id.items():
        assert x["eligible"] is True and x["failed"] == 0 and x["active"] == 0
        assert isinstance(x["slot"], int)
        sent = x["total"] * len(b"hello 0\n")
        assert x["bytes_to_backend"] == sent, x
        assert x["bytes_to_client"] == x["total"] * len(f"{ident}\n") + sent + x["total"] * len(b"EOF\n"), x

    # The table: same numbers.
    result = node.run_cli("stats", "-c", str(node.config_path))
    assert result.returncode == 0, result.stderr
    assert not result.stdout.lstrip().startswith("{")
    _check_table(result.stdout, stats, listen)

    # SIGUSR1: the table goes to the log.
    before = node.log()
    node.send(signal.SIGUSR1)
    wait_until(lambda: "snapshot version 1" in node.log()[len(before):], 5,
               message=lambda: f"the table in the log:\n{node.log()}")
    wait_until(lambda: len(_backend_rows(node.log()[len(before):], ["web-1", "web-2"])) == 2, 5,
               message=lambda: f"backend rows in the log:\n{node.log()}")
    _check_table(node.log()[len(before):], stats, listen)
    assert node.process.poll() is None

    # Once the node is stopped, stats says it is not running.
    assert node.stop() == 0
    result = node.run_cli("stats", "-c", str(node.config_path), "--json")
    assert result.returncode == 1
    assert "not running" in result.stderr, result.stderr
