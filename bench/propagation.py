#!/usr/bin/env python3
"""Control-plane propagation: from a write's commit to the new version
applied in every node's shared memory.

    python3 bench/propagation.py [--nodes 1 3 10] [--backends 10 1000 10000] [--trials 40]

For each (nodes, backends) it starts one lborch and N lbproxy nodes (1 worker
each, on 127.0.0.2, .3, …), then repeats: set a backend's weight through the
control socket and wait until every node's segment shows that version.
Clocks, all this machine's monotonic clock:

- commit: from the commit of the write (the control plane's stamp,
  ``lbctl status``: version_committed_ns) to the last node's publish of the
  version, as the node stamped it in its image header (published_ns)
  when it made the version current: commit to applied on all nodes;
- stamp: the same from this script's receipt of the write's
  acknowledgement (later than the commit by the reply's trip and this
  script's wake-up, which waits for the CPU the nodes are taking);
- polled: the same, up to when this script saw the version in every node's
  segment, polled every POLL_S (adds the poll interval and this script's own
  wake-up, which waits for the busy nodes' CPU);
- ack: the control plane's (``lbctl status``: per node, from the commit of
  the version to the node's ACK of it, received): the slowest node per
  change, an upper bound of commit-to-applied that includes the ACK's trip.

Also prints the sizes of the full snapshot and of a one-weight delta,
sustained writes per second, and CPU per version.
Every process it starts is stopped by PID at the end; only 127.0.0.0/8 is used.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from fixtures import Fleet  # noqa: E402

from lbcore._layout import lib  # noqa: E402
from lbcore.segment import Segment  # noqa: E402
from lbcore.wire import decode_reply, encode_request  # noqa: E402


def wait_text(path: Path, text: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{path}: no {text!r} after {seconds}s:\n{path.read_text(errors='replace')[-2000:]}")


def request(sock: zmq.Socket[bytes], verb: str, **args: object) -> dict:
    sock.send(encode_request(verb, dict(args)))
    if not sock.poll(10_000):
        raise RuntimeError(f"no answer to {verb}")
    reply = decode_reply(sock.recv())
    if not reply["ok"]:
        raise RuntimeError(reply["error"]["message"])
    return reply["result"]


POLL_S = 0.001


def applied(segment: Segment) -> int:
    # through cffi, not numpy: the poll must not take the CPU the nodes need
    return int(segment.buffer(segment.generation()).header_ptr.snapshot_version)  # type: ignore[attr-defined]


def published_ns(segment: Segment, version: int) -> int:
    """When the node published ``version`` (its own stamp, CLOCK_MONOTONIC:
    the clock of time.monotonic_ns), read under the seqlock."""
    for _ in range(100):
        header = segment.buffer(segment.generation()).header_ptr  # type: ignore[attr-defined]
        seq = lib.flc_read_begin(header)
        stamp, seen = int(header.published_ns), int(header.snapshot_version)
        if lib.flc_read_validate(header, seq):
            if seen != version:
                raise RuntimeError(f"version {seen} published where {version} was expected")
            return stamp
    raise RuntimeError("no stable read of the image header")


def run(fleet: Fleet, nodes: int, backends: int, trials: int) -> dict:
    work = fleet.work / f"p-{nodes}-{backends}"
    work.mkdir()
    control, publish, listen = fleet.ports(3, low=20_000)
    rows = "".join(f'\n[[service.backend]]\nid = "b{i}"\naddress = "127.0.{1 + i // 250 % 250}.{1 + i % 250}:'
                   f'{1000 + i // 62500}"\n' for i in range(backends))
    (work / "orch.toml").write_text(
        f'[node]\nid = "orch"\n[orchestrator]\nstore = "sqlite:///{work / "state.db"}"\n'
        f'control = "tcp://127.0.0.1:{control}"\npublish = "tcp://127.0.0.1:{publish}"\nheartbeat_ms = 200\n'
        f'[[service]]\nname = "web"\nlisten = "127.0.0.1:{listen}"\nalgorithm = "wrr"\n{rows}')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    orch = fleet.spawn([sys.executable, "-m", "orchestrator.cli", "-c", str(work / "orch.toml")],
                       work / "orch.log", cwd=ROOT, env=env)
    wait_text(work / "orch.log", "ready:", 120)
    ids, agents = [], []
    for n in range(nodes):
        node_id = f"prop-{os.getpid()}-{nodes}-{backends}-{n}"
        ids.append(node_id)
        (work / f"n{n}.toml").write_text(
            f'[node]\nid = "{node_id}"\nworkers = 1\ncontrol = "tcp://127.0.0.1:{control}"\n'
            f'subscribe = "tcp://127.0.0.1:{publish}"\naddress = "127.0.0.{n + 2}"\n')
        agents.append(fleet.spawn([sys.executable, "-m", "lbcore.cli", "-c", str(work / f"n{n}.toml")],
                                  work / f"n{n}.log", cwd=ROOT, env=env).pid)
    for n in range(nodes):
        wait_text(work / f"n{n}.log", "applied: version", 120)
    segments = [Segment.attach(i) for i in ids]
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{control}")
    try:
        size = len(request(sock, "snapshot.get")["snapshot"])
        times, polled, from_commit, commit_to_ack = [], [], [], []
        cpu_before = [cpu_seconds(pid) for pid in (orch.pid, *agents)]
        for trial in range(trials):
            weight = 1 + trial % 5
            version = request(sock, "backend.set_weight", service="web", id="b0", weight=weight)["version"]
            acked = time.monotonic_ns()
            deadline = time.monotonic() + 30
            while any(applied(s) < version for s in segments):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"version {version} not applied everywhere after 30 s")
                time.sleep(POLL_S)
            polled.append((time.monotonic_ns() - acked) / 1e6)
            last_publish = max(published_ns(s, version) for s in segments)
            times.append((last_publish - acked) / 1e6)
            committed_ns, slowest = slowest_ack(sock, version, nodes)
            commit_to_ack.append(slowest)
            from_commit.append((last_publish - committed_ns) / 1e6)
            time.sleep(0.02)  # one change at a time
        cpu = [cpu_seconds(pid) - before for pid, before in zip((orch.pid, *agents), cpu_before, strict=True)]
        delta = request(sock, "status")["last_delta_bytes"]  # the last trial's: one weight change
        t0, writes = time.perf_counter(), 0
        while time.perf_counter() - t0 < 3:
            request(sock, "backend.set_weight", service="web", id="b1", weight=1 + writes % 5)
            writes += 1
        rate = writes / (time.perf_counter() - t0)
    finally:
        sock.close(0)
        for s in segments:
            s.close()
    times.sort()
    polled.sort()
    from_commit.sort()
    commit_to_ack.sort()
    return {"nodes": nodes, "backends": backends, "snapshot_bytes": size, "delta_bytes": delta,
            "trials": trials,
            # p50_ms/p99_ms: polled, as in every result file before the stamp existed
            "p50_ms": statistics.median(polled), "p99_ms": percentile(polled, 0.99), "max_ms": polled[-1],
            "p50_stamp_ms": statistics.median(times), "p99_stamp_ms": percentile(times, 0.99),
            "max_stamp_ms": times[-1],
            "p50_commit_ms": statistics.median(from_commit), "p99_commit_ms": percentile(from_commit, 0.99),
            "max_commit_ms": from_commit[-1],
            "p50_commit_to_ack_ms": statistics.median(commit_to_ack),
            "p99_commit_to_ack_ms": percentile(commit_to_ack, 0.99),
            "writes_per_s": rate,
            # every trial, sorted (ms, 3 decimals): runs can be pooled
            "stamp_ms": [round(t, 3) for t in times], "polled_ms": [round(t, 3) for t in polled],
            "commit_ms": [round(t, 3) for t in from_commit],
            # CPU per version (all threads; over the trials, reports and heartbeats included)
            "orch_cpu_ms_per_version": cpu[0] / trials * 1000,
            "node_cpu_ms_per_version": statistics.mean(cpu[1:]) / trials * 1000}


def slowest_ack(sock: zmq.Socket[bytes], version: int, nodes: int) -> tuple[int, float]:
    """(when ``version`` committed, on the control plane's monotonic clock;
    its time from that commit to the last node's ACK), once every node has
    reported it."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = request(sock, "status")
        reported = [n for n in status["nodes"] if n["applied_version"] >= version]
        if len(reported) == nodes:
            if any(n["applied_version"] > version or n["propagation_ms"] is None for n in reported) \
                    or status["version"] != version or status["version_committed_ns"] is None:
                raise RuntimeError(f"version {version}: a later one came first, or no commit time")
            return status["version_committed_ns"], max(n["propagation_ms"] for n in reported)
        time.sleep(0.005)
    raise RuntimeError(f"version {version}: not every node reported it within 10 s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank percentile: with fewer than 100 samples p99 is the maximum."""
    return ordered[min(len(ordered) - 1, max(0, int(len(ordered) * q + 0.999999) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--backends", type=int, nargs="+", default=[10, 1000, 10000])
    parser.add_argument("--trials", type=int, default=40)
    args = parser.parse_args()
    results = []
    print(f"{'nodes':>5} {'backends':>8} {'full B':>9} {'delta B':>8} {'p50 ack':>8} {'p99 ack':>8} "
          f"{'p50 cmt':>8} {'p99 cmt':>8} {'p50 stmp':>8} {'p99 stmp':>8} {'p50 poll':>8} {'p99 poll':>8} "
          f"{'writes/s':>9} {'orch cpu':>9} {'node cpu':>9}", flush=True)
    for backends in args.backends:
        for nodes in args.nodes:
            fleet = Fleet()
            try:
                r = run(fleet, nodes, backends, args.trials)
            finally:
                fleet.close()
            results.append(r)
            print(f"{r['nodes']:>5} {r['backends']:>8} {r['snapshot_bytes']:>9,} {r['delta_bytes']:>8,} "
                  f"{r['p50_commit_to_ack_ms']:>8.2f} {r['p99_commit_to_ack_ms']:>8.2f} "
                  f"{r['p50_commit_ms']:>8.2f} {r['p99_commit_ms']:>8.2f} "
                  f"{r['p50_stamp_ms']:>8.2f} {r['p99_stamp_ms']:>8.2f} "
                  f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                  f"{r['writes_per_s']:>9.0f} {r['orch_cpu_ms_per_version']:>9.2f} "
                  f"{r['node_cpu_ms_per_version']:>9.2f}", flush=True)
    out = ROOT / "bench" / "results" / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-propagation.json"
    # one line per result: every trial's times are in it
    lines = ",\n".join(json.dumps(r) for r in results)
    out.write_text(f'{{"command": {json.dumps(" ".join(sys.argv))}, "results": [\n{lines}\n]}}\n')
    print(f"saved {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
