#!/usr/bin/env python3
"""Side-by-side load benchmark: lbproxy against HAProxy, HAProxy+splice, nginx stream and direct.

    python3 bench/sidebyside.py                       # workers 1 2, 3 rounds of 10 s, W1-W4
    python3 bench/sidebyside.py --quick               # smoke run: 1 worker, 1 round of 2 s
    python3 bench/sidebyside.py --workers 1 --rounds 3 --duration 5 --workloads W1 W2

Per worker count it starts every proxy with that many workers over the same 3 nginx
backends (and a pool of 10,000 backend ports for W4), then for each workload runs
rounds in which the targets alternate (A B C D A B C D ...), and once per proxy
counts system calls per request on W1 and W2. Writes
bench/results/<UTC date>-sidebyside.json, the table between the sidebyside markers
in BENCHMARKS.md and bench/results/sidebyside.png. See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fixtures  # noqa: E402  (bench/ is not a package)
import measure  # noqa: E402
import report  # noqa: E402
from fixtures import TARGETS, Fleet, Target  # noqa: E402
from measure import POOL_TARGETS, WORKLOADS  # noqa: E402

RESULTS = fixtures.ROOT / "bench" / "results"
SYSCALL_TARGETS = ("lbproxy", "haproxy", "nginx")
SYSCALL_WORKLOADS = ("W1", "W2")
DEFAULTS: dict[str, Any] = {"workers": [1, 2], "rounds": 3, "duration": 10.0, "syscall_duration": 3.0}
QUICK: dict[str, Any] = {"workers": [1], "rounds": 1, "duration": 2.0, "syscall_duration": 1.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts (default 1 2)")
    parser.add_argument("--rounds", type=int, help="rounds per workload (default 3)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 10)")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--syscall-duration", type=float,
                        help="seconds of the wrk run each syscall count is taken over (default 3)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk -t (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run; defaults become --workers 1 "
                        "--rounds 1 --duration 2 --syscall-duration 1 (options given still win)")
    parser.add_argument("--no-markdown", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.rounds, *args.workers) < 1 or min(args.duration, args.syscall_duration) <= 0:
        parser.error("--rounds, --workers, --duration and --syscall-duration must be positive")
    if "lbproxy" not in args.targets:
        parser.error("--targets must include lbproxy (every ratio is lbproxy against the others)")
    return args


def round_targets(workload: str, targets: list[str]) -> list[str]:
    """The targets one round of ``workload`` alternates over. W4 pairs each pool proxy with the
    same proxy over the 3 backends ("NAME-3") in the same round, for the W4 vs W2 ratio."""
    if workload != "W4":
        return list(targets)
    pool = [t for t in POOL_TARGETS if t in targets]
    return pool + [t + report.REFERENCE for t in pool]


class Progress:
    """One line per run, with elapsed time and an estimate of what is left."""

    def __init__(self, total: int, guess: float) -> None:
        self.total, self.done, self.guess, self.start = total, 0, guess, time.monotonic()

    def line(self, text: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.start
        per_run = elapsed / self.done if self.done else self.guess
        left = per_run * (self.total - self.done)
        print(f"[{self.done:>3}/{self.total}] {_clock(elapsed)} elapsed, ~{_clock(left)} left  {text}",
              flush=True)


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def describe(run: dict[str, Any]) -> str:
    rate = (f"{run['transfer_bytes_per_s'] / 2**20:8,.0f} MiB/s" if run["workload"] == "W3"
            else f"{run['requests_per_s']:8,.0f} req/s")
    cpu = run["cpu_user_us_per_req"]
    cpu_text = f", CPU {cpu:.2f}+{run['cpu_sys_us_per_req']:.1f} µs/req" if cpu is not None else ""
    errors = f", {int(run['errors'])} ERRORS" if run["errors"] else ""
    return f"{rate}, p99 {run['p99_ms']:.2f} ms{cpu_text}{errors}"


def bench_workers(fleet: Fleet, backends: fixtures.Backends, workers: int, args: argparse.Namespace,
                  progress: Progress, runs: list[dict[str, Any]]) -> tuple[dict[str, Any], Any]:
    """All rounds for one worker count (appended to ``runs``); returns the syscall counts
    ({workload: {target: count}}) and lbproxy's own counters after the runs."""
    started: dict[str, Target] = {}
    try:
        for name in args.targets:
            started[name] = fixtures.start_target(fleet, name, workers, backends)
        if "W4" in args.workloads:
            for name in POOL_TARGETS:
                if name in args.targets:
                    started[name + "@pool"] = fixtures.start_target(fleet, name, workers, backends, pool=True)
        print(f"{workers} worker(s): " + ", ".join(f"{n} on {t.port} (pids {t.pids()})"
                                                   for n, t in started.items()), flush=True)
        for workload in args.workloads:
            for number in range(1, args.rounds + 1):
                for name in round_targets(workload, args.targets):
                    if workload == "W4":
                        target = started[name.removesuffix(report.REFERENCE)] if name.endswith(
                            report.REFERENCE) else started[name + "@pool"]
                    else:
                        target = started[name]
                    run = measure.wrk(target, WORKLOADS[workload], args.duration, args.wrk_threads)
                    run.update(workers=workers, workload=workload, round=number, target=name)
                    runs.append(run)
                    progress.line(f"{workers}w {workload} round {number}/{args.rounds} {name:<16}"
                                  f"{describe(run)}")
        counts: dict[str, dict[str, Any]] = {}
        for workload in (w for w in SYSCALL_WORKLOADS if w in args.workloads):
            for name in (t for t in SYSCALL_TARGETS if t in started):
                target, spec = started[name], WORKLOADS[workload]
                count = measure.count_syscalls(target, lambda t=target, s=spec: measure.wrk(
                    t, s, args.syscall_duration, args.wrk_threads))
                counts.setdefault(workload, {})[name] = count
                progress.line(f"{workers}w {workload} syscalls {name:<14}"
                              f"{count['per_request'] or float('nan'):.2f}/request ({count['tool']})")
        lb = started.get("lbproxy")
        return counts, lbproxy_stats(lb) if lb is not None else None
    finally:
        for target in started.values():
            fixtures.stop_target(fleet, target)


def lbproxy_stats(target: Target) -> Any:
    """``lbproxy stats --json`` of the running node (its own counters, e.g. failed connects)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(fixtures.ROOT),
                                                                      os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "lbcore.cli", "stats", "-c", str(target.config), "--json"],
                          capture_output=True, text=True, env=env, cwd=fixtures.ROOT, timeout=30)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return (done.stdout + done.stderr)[-2000:]


def first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "?"


def machine() -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release()}


def versions() -> dict[str, str]:
    def last_word(text: str) -> str:
        return text.split("/")[-1].split()[0] if "/" in text else text

    haproxy = first_line([fixtures.which("haproxy") or "haproxy", "-v"])
    wrk = first_line(["wrk", "-v"]).split()
    return {"haproxy": haproxy.split("version")[-1].split()[0] if "version" in haproxy else haproxy,
            "nginx": last_word(first_line([fixtures.which("nginx") or "nginx", "-v"])),
            "wrk": wrk[1] if len(wrk) > 1 else "?",
            "perf": first_line(["perf", "--version"]), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python3", "bench/sidebyside.py", *map(shlex.quote, given)])
    fixtures.ensure_tools(fixtures.tools_for(args.targets))

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    when = dt.datetime.now(dt.timezone.utc)
    per_workers = sum(args.rounds * len(round_targets(w, args.targets)) for w in args.workloads)
    syscall_runs = (sum(w in args.workloads for w in SYSCALL_WORKLOADS)
                    * sum(t in args.targets for t in SYSCALL_TARGETS))
    progress = Progress(len(args.workers) * (per_workers + syscall_runs), args.duration + 0.5)
    print(f"{progress.total} runs, about {_clock(progress.total * (args.duration + 0.5))} "
          f"(plus start-up); Ctrl-C stops everything", flush=True)
    runs: list[dict[str, Any]] = []
    syscalls: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    fleet = Fleet()
    try:
        backends = fixtures.start_backends(fleet, pool=fixtures.POOL_SIZE if "W4" in args.workloads else 0)
        print(f"backends: nginx on {backends.ports}, {len(backends.pool)} ports in all", flush=True)
        for workers in args.workers:
            syscalls[str(workers)], stats[str(workers)] = bench_workers(fleet, backends, workers, args,
                                                                        progress, runs)
    finally:
        fleet.close()
    tools = {c["tool"] for w in syscalls.values() for per in w.values() for c in per.values()}
    doc: dict[str, Any] = {
        "benchmark": "sidebyside", "utc": when.isoformat(timespec="seconds"), "command": command,
        "options": vars(args), "machine": machine(), "versions": versions(),
        "git": first_line(["git", "-C", str(fixtures.ROOT), "describe", "--always", "--dirty"]),
        "syscall_tool": ", ".join(sorted(t for t in tools if t)) or None,
        "summary": report.summarize(runs),
        "syscalls": syscalls, "lbproxy_stats": stats,
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{when.strftime('%Y%m%dT%H%M%SZ')}-sidebyside.json"
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    png = RESULTS / "sidebyside.png"
    drawn = report.chart(doc, png)
    section = report.markdown(doc, out.name, png.name if drawn else None)
    print("\n" + section)
    if not args.no_markdown:
        report.update_benchmarks(fixtures.ROOT / "BENCHMARKS.md", section)
    saved = [str(out.relative_to(fixtures.ROOT))] + (["bench/results/sidebyside.png"] if drawn else [])
    print("\nsaved " + ", ".join(saved + ([] if args.no_markdown else ["BENCHMARKS.md"])))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped", flush=True)
        sys.exit(130)
