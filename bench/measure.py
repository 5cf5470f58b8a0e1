"""Load runs: the workloads, one wrk run with the proxy's CPU time, and system calls per request."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fixtures import HOST, Target, which

CLK_TCK = os.sysconf("SC_CLK_TCK")
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}  # -> milliseconds
SIZES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    path: str
    connections: int
    close: bool  # one connection per request (wrk -H 'Connection: close')
    pool: bool = False  # through the 10,000-backend pool


WORKLOADS = {
    "W1": Workload("W1", "keep-alive, 64 B body, 64 conns", "/small", 64, close=False),
    "W2": Workload("W2", "new connection per request, 64 B body, 64 conns", "/small", 64, close=True),
    "W3": Workload("W3", "keep-alive, 1 MiB body, 8 conns", "/big", 8, close=False),
    "W4": Workload("W4", "W2 through a pool of 10,000 backends", "/small", 64, close=True, pool=True),
}
POOL_TARGETS = ("lbproxy", "haproxy")  # the only targets W4 runs


def wrk_command(port: int, workload: Workload, duration: float, threads: int = 1) -> list[str]:
    command = ["wrk", f"-t{threads}", f"-c{workload.connections}", f"-d{duration:g}s", "--latency"]
    if workload.close:
        command += ["-H", "Connection: close"]  # the space after the colon matters to wrk
    return [*command, f"http://{HOST}:{port}{workload.path}"]


def parse_wrk(text: str) -> dict[str, float]:
    """Numbers from wrk's --latency output (latencies in ms, transfer in bytes/s)."""
    def number(pattern: str) -> float:
        match = re.search(pattern, text)
        return float(match.group(1)) if match else 0.0

    def latency(percent: str) -> float:
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M)
        return float(match.group(1)) * UNITS[match.group(2)] if match else float("nan")

    transfer = re.search(r"Transfer/sec:\s+([\d.]+)([KMGT]?B)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h), ([\d.]+)([KMGT]?B) read", text)
    return {
        "requests": float(total.group(1)) if total else 0.0,
        "seconds": float(total.group(2)) * UNITS[total.group(3)] / 1e3 if total else 0.0,
        "bytes": float(total.group(4)) * SIZES[total.group(5)] if total else 0.0,
        "requests_per_s": number(r"Requests/sec:\s+([\d.]+)"),
        "transfer_bytes_per_s": float(transfer.group(1)) * SIZES[transfer.group(2)] if transfer else 0.0,
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "socket_errors": float(sum(int(g) for g in sock.groups())) if sock else 0.0,
        "non_2xx": number(r"Non-2xx or 3xx responses:\s+(\d+)"),
    }


def cpu_ticks(pids: list[int]) -> dict[int, tuple[int, int]]:
    """utime and stime (clock ticks, all threads) of each process in ``pids`` (/proc/PID/stat)."""
    cpu: dict[int, tuple[int, int]] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu[pid] = (int(fields[11]), int(fields[12]))  # stat fields 14 and 15
    return cpu


def wrk(target: Target, workload: Workload, duration: float, threads: int = 1) -> dict[str, Any]:
    """One wrk run against ``target``: wrk's numbers, errors, and the proxy's CPU µs per request."""
    pids = target.pids()
    before = cpu_ticks(pids)
    command = wrk_command(target.port, workload, duration, threads)
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    after = cpu_ticks(pids)
    out = done.stdout + done.stderr
    if done.returncode != 0 or "Requests/sec" not in out:
        raise RuntimeError(f"wrk failed ({done.returncode}) against {target.name}:\n{out}")
    run: dict[str, Any] = parse_wrk(out)
    run["errors"] = run["socket_errors"] + run["non_2xx"]
    requests = max(run["requests"], 1.0)
    user = sum(u - before.get(pid, (u, s))[0] for pid, (u, s) in after.items())
    system = sum(s - before.get(pid, (u, s))[1] for pid, (u, s) in after.items())
    run["cpu_user_us_per_req"] = user / CLK_TCK * 1e6 / requests if pids else None
    run["cpu_sys_us_per_req"] = system / CLK_TCK * 1e6 / requests if pids else None
    run["connections_per_s"] = (run["requests_per_s"] if workload.close
                                else workload.connections / max(run["seconds"], 1e-9))
    run["pids"] = sorted(after)
    run["command"] = command
    run["raw"] = out
    return run


def _perf(pids: list[int], out: Path) -> list[str]:
    # A lone tracepoint with -p shows "<not counted>" on this kernel/perf 6.1; with task-clock it counts.
    return ["perf", "stat", "-x,", "-e", "task-clock,raw_syscalls:sys_enter", "-o", str(out),
            "-p", ",".join(map(str, pids))]


def _strace(pids: list[int], out: Path) -> list[str]:
    return ["strace", "-c", "-f", "-o", str(out), *[a for pid in pids for a in ("-p", str(pid))]]


def _parse_counts(tool: str, text: str) -> float:
    if tool == "perf":
        for line in text.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2] == "raw_syscalls:sys_enter":
                return float(fields[0]) if fields[0][:1].isdigit() else float("nan")
        return float("nan")
    for line in text.splitlines():  # "% time  seconds  usecs/call  calls  [errors]  total"
        fields = line.split()
        if len(fields) >= 5 and fields[-1] == "total":
            return float(fields[3])
    return float("nan")


def count_syscalls(target: Target, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """System calls made by the target's processes during ``run()`` (a wrk run), per request.

    Uses ``perf stat -e raw_syscalls:sys_enter -p PIDS``; ``strace -c -f`` if perf is missing.
    """
    pids = target.pids()
    tool = "perf" if which("perf") else "strace"
    if not pids or which(tool) is None:
        return {"tool": None, "syscalls": None, "per_request": None}
    with tempfile.TemporaryDirectory(prefix="fulcrum-syscalls-") as tmp:
        out = Path(tmp) / "counts.txt"
        command = (_perf if tool == "perf" else _strace)(pids, out)
        counter = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, start_new_session=True)
        try:
            time.sleep(0.5)  # attached (perf writes its header at once; strace needs a moment)
            result = run()
        finally:
            counter.send_signal(signal.SIGINT)
            try:
                err = counter.communicate(timeout=30)[1].decode(errors="replace")
            except subprocess.TimeoutExpired:
                counter.kill()
                err = counter.communicate()[1].decode(errors="replace")
        text = out.read_text(errors="replace") if out.exists() else ""
    syscalls = _parse_counts(tool, text)
    requests = max(result["requests"], 1.0)
    return {"tool": tool, "command": command, "pids": pids, "syscalls": syscalls,
            "requests": result["requests"], "per_request": syscalls / requests,
            "counter_output": (text + err)[-2000:], "run": {k: v for k, v in result.items() if k != "raw"}}
