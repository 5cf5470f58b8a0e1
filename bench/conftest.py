"""Session fixtures for the load benchmarks (bench/test_load.py), built on bench/fixtures.py.

Nothing starts at import or collection: the backends start with the first load
benchmark, each proxy the first time a benchmark asks for it, and all of it stops
by PID at the end of the session (also on Ctrl-C or SIGTERM). A tool that is
missing and cannot be installed skips the benchmarks that need it.

BENCH_WORKERS (default 1) sets the worker count of every proxy.
"""
from __future__ import annotations

import atexit
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import fixtures
import pytest
from fixtures import Backends, Fleet, MissingToolError, Target

WORKERS = int(os.environ.get("BENCH_WORKERS", "1"))
ROWS = pytest.StashKey[list[dict[str, Any]]]()  # extra_info of each load benchmark, for the summary


def _ensure(tools: list[str]) -> None:
    try:
        fixtures.ensure_tools([t for t in tools if t != "perf"])  # perf: only sidebyside counts syscalls
    except MissingToolError as exc:
        pytest.skip(str(exc))


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def fleet() -> Iterator[Fleet]:
    """Every process the load benchmarks start; stopped by PID when the session ends."""
    fleet = Fleet()
    atexit.register(fleet.close)  # idempotent; covers an exit that skips fixture teardown
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # teardown runs on SIGTERM too
    try:
        yield fleet
    finally:
        fleet.close()
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def backends(request: pytest.FixtureRequest, fleet: Fleet) -> Backends:
    """3 nginx backends; with the 10,000-port pool when a W4 benchmark was selected."""
    _ensure(["wrk", "nginx"])
    pool = any("W4" in item.nodeid for item in request.session.items)
    return fixtures.start_backends(fleet, pool=fixtures.POOL_SIZE if pool else 0)


@pytest.fixture(scope="session")
def load_target(fleet: Fleet, backends: Backends) -> Callable[[str, bool], Target]:
    """``load_target(name, pool)``: the target, started with BENCH_WORKERS workers on first use."""
    started: dict[tuple[str, bool], Target] = {}

    def get(name: str, pool: bool = False) -> Target:
        if (name, pool) not in started:
            _ensure(fixtures.tools_for([name]))
            started[(name, pool)] = fixtures.start_target(fleet, name, WORKERS, backends, pool=pool)
        return started[(name, pool)]

    return get


@pytest.fixture(scope="session")
def load_rows(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """Where each load benchmark leaves its numbers for the summary at the end of the session."""
    return request.config.stash.setdefault(ROWS, [])


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The throughput of the load benchmarks (pytest-benchmark's own table shows only run time)."""
    rows = config.stash.get(ROWS, [])
    if not rows:
        return
    write = terminalreporter.write_line
    terminalreporter.section(f"load benchmarks ({WORKERS} worker(s) per proxy)")
    write(f"{'benchmark':<24}{'conn/s':>10}{'req/s':>10}{'MiB/s':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'CPU us/req u+s':>16}")
    for row in rows:
        user, system = row["cpu_user_us_per_req"], row["cpu_sys_us_per_req"]
        cpu = f"{user:.2f}+{system:.1f}" if user is not None else "-"
        write(f"{row['workload'] + '-' + row['target']:<24}{row['connections_per_s']:>10,.0f}"
              f"{row['requests_per_s']:>10,.0f}{row['bytes_per_s'] / 2**20:>9,.1f}{row['p99_ms']:>9.2f}"
              f"{int(row['errors']):>8}{cpu:>16}")
