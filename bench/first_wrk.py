#!/usr/bin/env python3
"""First throughput benchmark: wrk through lbproxy against wrk straight to a backend.

Starts 3 nginx backends and one lbproxy node (1 worker, wrr over the 3) on
127.0.0.1, then alternates ``wrk`` runs (direct to backend 1, then through
lbproxy) for --rounds rounds, prints medians and the lbproxy/direct ratio, and
saves everything to bench/results/first-wrk-<UTC date-time>.json.

    python3 bench/first_wrk.py [--duration 5] [--rounds 3] [--connections 64]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from fixtures import stop_process  # noqa: E402  (one way to stop what we started)
from measure import parse_wrk  # noqa: E402  (one parser for wrk's output)

RESULTS = ROOT / "bench" / "results"
HOST = "127.0.0.1"
BODY = "fulcrum-bench-64-byte-body-" + "x" * 36 + "\n"  # exactly 64 bytes
assert len(BODY) == 64
CLK_TCK = os.sysconf("SC_CLK_TCK")
started: list[subprocess.Popen[bytes]] = []  # every process we start, stopped at exit


def log(message: str) -> None:
    print(message, flush=True)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def ensure_tools() -> None:
    """apt-get install wrk / nginx(-light) if missing, without starting the nginx service."""
    missing = [] if shutil.which("wrk") else ["wrk"]
    if nginx_binary() is None:
        policy = subprocess.run(["apt-cache", "policy", "nginx-light"], capture_output=True, text=True)
        has_light = "Candidate:" in policy.stdout and "Candidate: (none)" not in policy.stdout
        missing.append("nginx-light" if has_light else "nginx")
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing {' '.join(missing)}: install them (apt-get install -y {' '.join(missing)})")
    log(f"installing {' '.join(missing)} ...")
    policy_rc = Path("/usr/sbin/policy-rc.d")
    ours = not policy_rc.exists()
    pid_file, had_pid = Path("/run/nginx.pid"), Path("/run/nginx.pid").exists()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    try:
        if ours:  # refuse every service start during the install
            policy_rc.write_text("#!/bin/sh\nexit 101\n")
            policy_rc.chmod(0o755)
        if subprocess.run(command, env=env).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, check=True)
            subprocess.run(command, env=env, check=True)
    finally:
        if ours:
            policy_rc.unlink(missing_ok=True)
    if not had_pid and pid_file.exists():  # the service started anyway: stop it
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        except (ValueError, IndexError, ProcessLookupError):
            pass


def ensure_built() -> None:
    """Build the compiled modules in place if any is missing (does not import lbcore)."""
    modules = ("lbcore/_layout", "lbcore/worker", "lbcore/balance/wrr")
    if not all(list(ROOT.glob(f"{m}.*so")) for m in modules):
        log("building lbcore in place ...")
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=ROOT, check=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pid {process.pid} exited ({process.returncode}) before {HOST}:{port} opened")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{HOST}:{port} did not open within {timeout:.0f}s")


def start(command: list[str], stderr: Path | int, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Popen in its own session (a terminal's Ctrl-C reaches only us; we stop it in order)."""
    err = stderr.open("wb") if isinstance(stderr, Path) else None
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True,
                                   stderr=err or stderr, **kwargs)
    finally:
        if err is not None:
            err.close()
    started.append(process)
    return process


def start_backend(work: Path, index: int) -> tuple[int, subprocess.Popen[bytes]]:
    prefix, port = work / f"nginx{index}", free_port()
    (prefix / "logs").mkdir(parents=True)
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")  # keep nginx out of /var/lib/nginx
    temp = "\n".join(f"    {kind}_temp_path {prefix}/{kind};" for kind in kinds)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""daemon off;
master_process on;
worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
{temp}
    server {{
        listen {HOST}:{port};
        location = / {{ default_type text/plain; return 200 "{BODY[:-1]}\\n"; }}
    }}
}}
""")
    err = prefix / "error.log"
    command = [str(nginx_binary()), "-p", str(prefix), "-c", str(conf), "-e", str(err)]
    process = start(command, stdout=subprocess.DEVNULL, stderr=prefix / "stderr.log")
    try:
        wait_port(port, process)
    except RuntimeError as exc:
        raise RuntimeError(f"nginx {index}: {exc}\n{err.read_text(errors='replace')}") from None
    return port, process


def start_proxy(work: Path, ports: list[int], relay: str) -> tuple[int, subprocess.Popen[bytes], Path]:
    port, config, logfile = free_port(), work / "lbproxy.toml", work / "lbproxy.log"
    backends = "".join(f'\n[[service.backend]]\nid = "b{i}"\naddress = "{HOST}:{p}"\nweight = 1\n'
                       for i, p in enumerate(ports, 1))
    config.write_text(f'[node]\nid = "bench-{os.getpid()}"\nworkers = 1\nrelay = "{relay}"\n\n'
                      '[[service]]\nname = "web"\n'
                      f'listen = "{HOST}:{port}"\nalgorithm = "wrr"\n{backends}')
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    process = start([sys.executable, "-m", "lbcore.cli", "-c", str(config)], cwd=ROOT, env=env,
                    stdout=subprocess.DEVNULL, stderr=logfile)
    deadline = time.monotonic() + 15
    while "]: ready" not in logfile.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"lbproxy did not become ready:\n{logfile.read_text(errors='replace')}")
        time.sleep(0.05)
    wait_port(port, process)
    return port, process, logfile


def check_body(port: int) -> None:
    """One GET must return 200 and exactly BODY (so wrk measures the right thing)."""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = reply.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") or body != BODY.encode():
        raise RuntimeError(f"{HOST}:{port} answered {reply[:300]!r}")


def worker_cpu(agent: int) -> dict[int, tuple[int, int]]:
    """utime, stime (clock ticks) of each child process of the agent."""
    cpu: dict[int, tuple[int, int]] = {}
    try:
        children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    except OSError:
        return cpu
    for pid in map(int, children):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu[pid] = (int(fields[11]), int(fields[12]))  # stat fields 14, 15
    return cpu


def run_wrk(port: int, args: argparse.Namespace) -> dict[str, Any]:
    command = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
               f"http://{HOST}:{port}/"]
    process = start(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = process.communicate(timeout=args.duration + 60)[0].decode(errors="replace")
    if process.returncode != 0 or "Requests/sec" not in out:
        raise RuntimeError(f"wrk failed ({process.returncode}):\n{out}")
    return {**parse_wrk(out), "raw": out}


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    stop_process(process, timeout)


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    backends = [start_backend(work, i) for i in (1, 2, 3)]
    ports = [port for port, _ in backends]
    proxy_port, proxy, proxy_log = start_proxy(work, ports, args.relay)
    for port in (*ports, proxy_port):
        check_body(port)
    log(f"backends on {ports}, lbproxy (pid {proxy.pid}) on {proxy_port}; 64-byte body checked")
    rounds: list[dict[str, Any]] = []
    for n in range(1, args.rounds + 1):
        direct = run_wrk(ports[0], args)
        before = worker_cpu(proxy.pid)
        via = run_wrk(proxy_port, args)
        after = worker_cpu(proxy.pid)
        requests = max(via["requests"], 1.0)
        user = sum(u - before.get(pid, (0, 0))[0] for pid, (u, _) in after.items())
        system = sum(s - before.get(pid, (0, 0))[1] for pid, (_, s) in after.items())
        via["cpu_user_us_per_req"] = user / CLK_TCK * 1e6 / requests
        via["cpu_sys_us_per_req"] = system / CLK_TCK * 1e6 / requests
        via["worker_pids"] = sorted(after)
        if sorted(before) != sorted(after):
            log(f"  note: lbproxy worker pids changed during round {n}: {sorted(before)} -> {sorted(after)}")
        ratio = via["requests_per_s"] / direct["requests_per_s"] if direct["requests_per_s"] else 0.0
        errors = [int(run["socket_errors"] + run["non_2xx"]) for run in (direct, via)]
        rounds.append({"round": n, "direct": direct, "lbproxy": via, "ratio": ratio})
        log(f"round {n}/{args.rounds}: direct {direct['requests_per_s']:,.0f} req/s, "
            f"lbproxy {via['requests_per_s']:,.0f} req/s, ratio {ratio:.3f}, errors {errors[0]}/{errors[1]}")
    stop(proxy)
    return {"rounds": rounds, "ports": {"backends": ports, "lbproxy": proxy_port},
            "lbproxy_log": proxy_log.read_text(errors="replace")}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("requests_per_s", "transfer_bytes_per_s", "p50_ms", "p99_ms")
    summary: dict[str, Any] = {}
    for target in ("direct", "lbproxy"):
        runs = [r[target] for r in rounds]
        summary[target] = {k: statistics.median(run[k] for run in runs) for k in keys}
        summary[target]["errors_total"] = int(sum(run["socket_errors"] + run["non_2xx"] for run in runs))
    for key in ("cpu_user_us_per_req", "cpu_sys_us_per_req"):
        summary["lbproxy"][key] = statistics.median(r["lbproxy"][key] for r in rounds)
    summary["ratio_median"] = statistics.median(r["ratio"] for r in rounds)
    return summary


def table(summary: dict[str, Any]) -> str:
    d, p = summary["direct"], summary["lbproxy"]
    rows = [("requests/s (median)", f"{d['requests_per_s']:,.0f}", f"{p['requests_per_s']:,.0f}",
             f"{summary['ratio_median']:.3f}"),
            ("transfer MiB/s (median)", f"{d['transfer_bytes_per_s'] / 2**20:.2f}",
             f"{p['transfer_bytes_per_s'] / 2**20:.2f}", ""),
            ("latency p50 ms (median)", f"{d['p50_ms']:.3f}", f"{p['p50_ms']:.3f}", ""),
            ("latency p99 ms (median)", f"{d['p99_ms']:.3f}", f"{p['p99_ms']:.3f}", ""),
            ("errors (all rounds)", str(d["errors_total"]), str(p["errors_total"]), ""),
            ("proxy CPU user us/req", "", f"{p['cpu_user_us_per_req']:.2f}", ""),
            ("proxy CPU sys us/req", "", f"{p['cpu_sys_us_per_req']:.2f}", "")]
    lines = [f"{'':26}{'direct':>12}{'lbproxy':>12}{'lbproxy/direct':>16}"]
    lines += [f"{name:26}{a:>12}{b:>12}{c:>16}" for name, a, b, c in rows]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    def first_line(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        return (done.stdout + done.stderr).strip().splitlines()[0] if done.stdout + done.stderr else "?"

    return {"wrk": first_line(["wrk", "-v"]), "nginx": first_line([str(nginx_binary()), "-v"]),
            "python": platform.python_version(), "kernel": platform.release(), "cpus": str(os.cpu_count()),
            "git": first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="direct+lbproxy pairs (default 3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--relay", choices=("auto", "splice", "copy"), default="auto",
                        help="lbproxy node.relay (default auto)")
    args = parser.parse_args()
    if min(args.duration, args.rounds, args.connections) < 1:
        parser.error("--duration, --rounds and --connections must be >= 1")
    ensure_tools()
    ensure_built()

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    when = dt.datetime.now(dt.timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="fulcrum-bench-"))
    try:
        result = bench(args, work)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # let nothing cut the cleanup short
            signal.signal(signum, signal.SIG_IGN)
        for process in reversed(started):
            stop(process)
        Path(f"/dev/shm/fulcrum-bench-{os.getpid()}").unlink(missing_ok=True)  # only if lbproxy was killed
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(result["rounds"])
    print(f"\nwrk -t1 -c{args.connections} -d{args.duration}s, {args.rounds} rounds, "
          f"lbproxy 1 worker, wrr over 3 nginx backends; direct = backend 1 only")
    print(table(summary))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"first-wrk-{when.strftime('%Y%m%dT%H%M%SZ')}.json"
    document = {"benchmark": "first_wrk", "utc": when.isoformat(timespec="seconds"),
                "options": vars(args), "versions": versions(), "body_bytes": len(BODY),
                "summary": summary, **result}
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nsaved {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; all started processes stopped")
        sys.exit(130)
