#!/usr/bin/env python3
"""Health checks: what they cost and how fast they act.

    python3 bench/health.py [--backends 1000] [--seconds 20] [--trials 20] [--only probe cp death]

- probe: a static node probing BACKENDS backends (kind tcp, interval 1 s)
  against a node with the same backends and no checks; the agent's CPU
  (its own process, not the workers) over SECONDS, as a share of one
  core, and the probes per second the backends counted; then HAProxy
  checking the same backends (check inter 1000) in the same run: the CPU
  per check of a C prober on this host, so that the ratio, not the share
  of this shared machine's core, is the figure that travels.
- cp: lborch with BACKENDS checked backends (probers 1, rise 1, fall 1)
  and one node of this script's that reports results turned over at a
  steady rate: lborch's CPU per result received and per observation
  written (a change of verdict, each one a store write and a routing
  recompute, coalesced).
- death: lborch, 3 nodes (127.0.0.2-.4), TRIALS backends (tcp, interval
  200 ms, timeout 100 ms, fall 2): a backend's listener is closed, and the
  time until the last node applied the version that takes it out (the
  version read from the control plane, each node's applied version from
  its shared segment) is measured, TRIALS times; p50 / p99 and the bound
  interval x fall + timeout + heartbeat.

Every process it starts is stopped by PID at the end; only 127.0.0.0/8 is used.
"""
from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from fixtures import Fleet  # noqa: E402
from propagation import request  # noqa: E402

from lbcore.segment import Segment  # noqa: E402
from lbcore.verdict import results_digest  # noqa: E402
from lbcore.wire import encode_request  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def cpu_s(pid: int) -> float:
    return sum(cpu_split(pid))


def wait_for(predicate, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise RuntimeError(f"timed out waiting for {what}")


def serve(ports_file: str, seconds: float) -> None:
    """The backends: listen on every port, accept and close, count; print the count."""
    ports = json.loads(Path(ports_file).read_text())
    selector = selectors.DefaultSelector()
    for port in ports:
        sock = socket.create_server(("127.0.0.1", port), backlog=512)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    accepted = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key, _ in selector.select(0.2):
            try:
                conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                conn.close()
                accepted += 1
            except BlockingIOError:
                pass
            Path(ports_file + ".count").write_text(str(accepted)) if accepted % 100 == 0 else None
    Path(ports_file + ".count").write_text(str(accepted))


def start_backends(fleet: Fleet, count: int, seconds: float) -> tuple[list[int], Path]:
    ports = fleet.ports(count)
    path = fleet.work / f"ports-{ports[0]}.json"
    path.write_text(json.dumps(ports))
    fleet.spawn([sys.executable, __file__, "--serve", str(path), "--serve-seconds", str(seconds)],
                fleet.work / "backends.log")
    time.sleep(1.0)
    return ports, path


def accepted(path: Path) -> int:
    count = Path(str(path) + ".count")
    return int(count.read_text() or 0) if count.exists() else 0


def service_toml(name: str, listen: str, ports: list[int], health: str) -> str:
    backends = "".join(f'[[service.backend]]\nid = "b{i}"\naddress = "127.0.0.1:{p}"\n'
                       for i, p in enumerate(ports))
    return f'[[service]]\nname = "{name}"\nlisten = "{listen}"\n{health}\n{backends}'


def node_pid_ready(fleet: Fleet, config: Path, log: Path) -> int:
    process = fleet.spawn([sys.executable, "-m", "lbcore.cli", "-c", str(config)], log, cwd=ROOT)
    try:
        wait_for(lambda: "ready" in log.read_text(errors="replace") or process.poll() is not None, 30,
                 f"{config} ready")
    finally:
        if "ready" not in log.read_text(errors="replace"):
            print(log.read_text(errors="replace")[-2000:], file=sys.stderr)
    return process.pid


# ---------------------------------------------------------------- probe cost

def bench_probe(backends: int, seconds: float) -> dict[str, float]:
    fleet = Fleet()
    try:
        ports, counted = start_backends(fleet, backends, 5 * seconds + 90)
        results = {}
        for kind in ("none", "tcp"):
            health = f'[service.health]\nkind = "{kind}"\ninterval_ms = 1000\ntimeout_ms = 500\n'
            config = fleet.work / f"node-{kind}.toml"
            config.write_text(f'[node]\nid = "fulcrum-bench-{os.getpid()}-{kind}"\nworkers = 1\n'
                              + service_toml("web", f"127.0.0.1:{fleet.port()}", ports, health))
            pid = node_pid_ready(fleet, config, fleet.work / f"node-{kind}.log")
            time.sleep(2.0)  # the first interval spreads the probes
            (user0, sys0), probes0, t0 = cpu_split(pid), accepted(counted), time.monotonic()
            time.sleep(seconds)
            took = time.monotonic() - t0
            user1, sys1 = cpu_split(pid)
            results[kind] = (user1 - user0 + sys1 - sys0) / took
            results[f"{kind}_user"], results[f"{kind}_sys"] = (user1 - user0) / took, (sys1 - sys0) / took
            results[f"{kind}_probes_per_s"] = (accepted(counted) - probes0) / took
            fleet.stop(fleet.processes.pop())
        share = results["tcp"] - results["none"]
        per_probe_us = share * 1e6 / max(1.0, results["tcp_probes_per_s"])
        haproxy = haproxy_checks(fleet, ports, seconds)
        results.update(haproxy)
        rate = max(1.0, results["tcp_probes_per_s"])
        user_us = (results["tcp_user"] - results["none_user"]) * 1e6 / rate
        sys_us = (results["tcp_sys"] - results["none_sys"]) * 1e6 / rate
        print(f"probe: {backends} backends, interval 1 s: agent CPU {results['tcp'] * 100:.2f} % of a core "
              f"with checks, {results['none'] * 100:.2f} % without: {share * 100:.2f} % of a core for "
              f"{results['tcp_probes_per_s']:.0f} probes/s ({per_probe_us:.1f} us CPU per probe: "
              f"{user_us:.1f} us user, {sys_us:.1f} us kernel, which on loopback includes the backend's side "
              f"of each handshake); per 1,000 backends: {share * 100 * 1000 / backends:.2f} % of a core")
        if haproxy:
            h_rate = max(1.0, haproxy["haproxy_probes_per_s"])
            h_us = haproxy["haproxy"] * 1e6 / h_rate
            print(f"probe: HAProxy checking the same {backends} backends (check inter 1000), same run: "
                  f"{haproxy['haproxy'] * 100:.2f} % of a core for "
                  f"{haproxy['haproxy_probes_per_s']:.0f} checks/s (as configured) "
                  f"({h_us:.1f} us per check: {haproxy['haproxy_user'] * 1e6 / h_rate:.1f} user, "
                  f"{haproxy['haproxy_sys'] * 1e6 / h_rate:.1f} kernel); lbproxy / HAProxy per probe: "
                  f"{per_probe_us / h_us:.2f}")
        return {"backends": backends, "agent_cpu_checks": results["tcp"], "agent_cpu_none": results["none"],
                "probes_per_s": results["tcp_probes_per_s"], "share_per_1000": share * 1000 / backends,
                "user_us_per_probe": user_us, "kernel_us_per_probe": sys_us, **haproxy}
    finally:
        fleet.close()


def haproxy_checks(fleet: Fleet, ports: list[int], seconds: float) -> dict[str, float]:
    """HAProxy health-checking the same backends (its own idle cost is
    negligible: no traffic), for a CPU per check measured on this host in
    the same run; {} when HAProxy is not installed."""
    binary = shutil.which("haproxy")
    if binary is None:
        return {}
    servers = "".join(f"    server b{i} 127.0.0.1:{p} check inter 1000 fall 3 rise 2\n"
                      for i, p in enumerate(ports))
    config = fleet.work / "haproxy.cfg"
    config.write_text("global\n    maxconn 4096\ndefaults\n    mode tcp\n    timeout connect 500ms\n"
                      "    timeout client 5s\n    timeout server 5s\n"
                      f"listen pool\n    bind 127.0.0.1:{fleet.port()}\n{servers}")
    process = fleet.spawn([binary, "-db", "-f", str(config)], fleet.work / "haproxy.log")
    time.sleep(3.0)  # its checks spread over the first interval
    (user0, sys0), t0 = cpu_split(process.pid), time.monotonic()
    time.sleep(seconds)
    took = time.monotonic() - t0
    user1, sys1 = cpu_split(process.pid)
    # its checks close before the backends accept them (a reset at once), so
    # they cannot be counted there: inter 1000 is one check a second a server
    rate = float(len(ports))
    fleet.stop(fleet.processes.pop())
    return {"haproxy": (user1 - user0 + sys1 - sys0) / took, "haproxy_user": (user1 - user0) / took,
            "haproxy_sys": (sys1 - sys0) / took, "haproxy_probes_per_s": rate}


# ---------------------------------------------------------------- control-plane CPU per observation

def bench_cp(backends: int, seconds: float) -> dict[str, float]:
    fleet = Fleet()
    try:
        control, publish = fleet.ports(2)
        ports = fleet.ports(backends)  # never listened on: the results are this script's
        health = ('[service.health]\nkind = "tcp"\ninterval_ms = 200\ntimeout_ms = 100\nrise = 1\nfall = 1\n'
                  'probers = 1\n')
        config = fleet.work / "orch.toml"
        config.write_text(f'[orchestrator]\nstore = "sqlite:///state.db"\ncontrol = "tcp://127.0.0.1:{control}"\n'
                          f'publish = "tcp://127.0.0.1:{publish}"\n'
                          + service_toml("web", f"127.0.0.1:{fleet.port()}", ports, health))
        log = fleet.work / "orch.log"
        orch = fleet.spawn([sys.executable, "-m", "orchestrator.cli", "-c", str(config)], log, cwd=ROOT)
        wait_for(lambda: "ready" in log.read_text(errors="replace"), 30, "lborch ready")
        context = zmq.Context()
        req = context.socket(zmq.REQ)
        req.connect(f"tcp://127.0.0.1:{control}")
        node = context.socket(zmq.DEALER)
        node.connect(f"tcp://127.0.0.1:{control}")
        snapshot = json.loads(request(req, "snapshot.get")["snapshot"])  # type: ignore[index]
        held = {f"b{i}": True for i in range(backends)}

        def report() -> None:
            node.send(encode_request("node.report", {
                "node": "bench", "epoch": snapshot["epoch"], "version": snapshot["version"],
                "staleness_ms": 0, "health": {"digest": results_digest(held), "ejected": {}, "panics": {}}}))

        node.send(encode_request("health.results", {"node": "bench", "results": held, "replace": True}))
        report()
        time.sleep(1.0)
        sent = 0
        flip = 0
        cpu0, t0 = cpu_s(orch.pid), time.monotonic()
        next_report = t0
        while time.monotonic() - t0 < seconds:
            batch = {}
            for _ in range(max(1, backends // 50)):  # 2 % of the pool changes every 100 ms
                name = f"b{flip % backends}"
                held[name] = not held[name]
                batch[name] = held[name]
                flip += 1
            node.send(encode_request("health.results", {"node": "bench", "results": batch}))
            sent += len(batch)
            if time.monotonic() >= next_report:
                report()
                next_report += 0.5
            time.sleep(0.1)
        time.sleep(1.0)  # the last verdicts
        took = time.monotonic() - t0
        cpu = cpu_s(orch.pid) - cpu0
        rows = request(req, "health.show")
        written = sum(r["revision"] or 0 for r in rows)  # type: ignore[union-attr]
        versions = request(req, "version")["version"]  # type: ignore[index]
        print(f"cp: {backends} checked backends, {sent} results in {took:.1f} s, "
              f"{written} observations written, "
              f"version {versions}: lborch CPU {cpu:.2f} s ({cpu / took * 100:.1f} % of a core): "
              f"{cpu * 1e6 / max(1, sent):.0f} us per result received, "
              f"{cpu * 1e6 / max(1, written):.0f} us per observation written (incl. recompute and publish)")
        for sock in (req, node):
            sock.close(0)
        context.term()
        return {"backends": backends, "results": sent, "observations": written, "cpu_s": cpu, "seconds": took,
                "us_per_result": cpu * 1e6 / max(1, sent), "us_per_observation": cpu * 1e6 / max(1, written)}
    finally:
        fleet.close()


# ---------------------------------------------------------------- death to the last node's stop

def bench_death(trials: int) -> dict[str, float]:
    fleet = Fleet()
    try:
        control, publish, listen = fleet.ports(3)
        # a backend per trial: one killed and restarted over and over would be
        # held down for flapping (more than 4 changes in 60 s)
        ports = fleet.ports(trials)
        interval, timeout, fall, heartbeat = 200, 100, 2, 500
        health = (f'[service.health]\nkind = "tcp"\ninterval_ms = {interval}\ntimeout_ms = {timeout}\n'
                  f'rise = 2\nfall = {fall}\nprobers = 3\n')
        config = fleet.work / "orch.toml"
        config.write_text(f'[orchestrator]\nstore = "sqlite:///state.db"\ncontrol = "tcp://127.0.0.1:{control}"\n'
                          f'publish = "tcp://127.0.0.1:{publish}"\nheartbeat_ms = {heartbeat}\n'
                          + service_toml("web", f"127.0.0.1:{listen}", ports, health))
        listeners = {p: socket.create_server(("127.0.0.1", p), backlog=512) for p in ports}
        log = fleet.work / "orch.log"
        fleet.spawn([sys.executable, "-m", "orchestrator.cli", "-c", str(config)], log, cwd=ROOT)
        wait_for(lambda: "ready" in log.read_text(errors="replace"), 30, "lborch ready")
        segments = []
        for i in range(3):
            node_id = f"fulcrum-bench-{os.getpid()}-n{i}"
            node = fleet.work / f"node{i}.toml"
            node.write_text(f'[node]\nid = "{node_id}"\nworkers = 1\ncontrol = "tcp://127.0.0.1:{control}"\n'
                            f'subscribe = "tcp://127.0.0.1:{publish}"\naddress = "127.0.0.{i + 2}"\n')
            node_pid_ready(fleet, node, fleet.work / f"node{i}.log")
            segments.append(Segment.attach(node_id))
        context = zmq.Context()
        req = context.socket(zmq.REQ)
        req.connect(f"tcp://127.0.0.1:{control}")

        def backend_up(backend: str) -> bool | None:
            routing = json.loads(request(req, "snapshot.get")["snapshot"])  # type: ignore[index]
            for row in routing["services"][0]["backends"]:
                if row["id"] == backend:
                    return (row.get("up", True), routing["version"])  # type: ignore[return-value]
            return None

        def applied(segment: Segment) -> int:
            return int(segment.buffer(segment.generation()).header_ptr.snapshot_version)  # type: ignore[attr-defined]

        wait_for(lambda: len(request(req, "status")["nodes"]) == 3, 20, "3 nodes")  # type: ignore[index]
        time.sleep(2.0)
        took = []
        for trial in range(trials):
            port = ports[trial]
            backend = f"b{trial}"
            killed = time.monotonic()
            listeners.pop(port).close()
            version = None
            deadline = killed + 10
            while time.monotonic() < deadline:
                up, v = backend_up(backend)  # type: ignore[misc]
                if not up:
                    version = v
                    break
                time.sleep(0.005)
            if version is None:
                raise RuntimeError(f"trial {trial}: {backend} never went down")
            wait_for(lambda v=version: all(applied(s) >= v for s in segments), 10, "every node applied")
            took.append((time.monotonic() - killed) * 1000)
            listeners[port] = socket.create_server(("127.0.0.1", port), backlog=512)
            wait_for(lambda b=backend: backend_up(b)[0], 10, f"{backend} up again")  # type: ignore[index]
        for s in segments:
            s.close()
        req.close(0)
        context.term()
        for sock in listeners.values():
            sock.close()
        took.sort()
        bound = interval * fall + timeout + heartbeat
        p50 = statistics.median(took)
        p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
        print(f"death: {trials} trials, 3 nodes, interval {interval} ms, timeout {timeout} ms, fall {fall}: "
              f"kill to the last node's stop p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {took[-1]:.0f} ms "
              f"(bound interval x fall + timeout + heartbeat = {bound} ms)")
        return {"trials": trials, "p50_ms": p50, "p99_ms": p99, "max_ms": took[-1], "bound_ms": bound,
                "all_ms": took}
    finally:
        fleet.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--only", nargs="*", default=["probe", "cp", "death"])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--serve-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.serve_seconds)
        return 0
    results: dict[str, object] = {}
    if "probe" in args.only:
        results["probe"] = bench_probe(args.backends, args.seconds)
    if "cp" in args.only:
        results["cp"] = bench_cp(args.backends, args.seconds)
    if "death" in args.only:
        results["death"] = bench_death(args.trials)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
