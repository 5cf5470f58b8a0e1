"""Load benchmarks: wrk through each target for a short fixed duration (pytest-benchmark).

    pytest bench/test_load.py --benchmark-only                      # every target x workload, 3 s each
    pytest bench/test_load.py --benchmark-only -k W1 --benchmark-save=w1
    pytest bench/test_load.py --benchmark-only -k W1 --benchmark-compare

The time pytest-benchmark reports is the length of the wrk run (BENCH_DURATION, default
3 s); the throughput is in each benchmark's extra_info (connections/s, requests/s,
bytes/s, p50/p99 ms, errors, proxy CPU µs per request), saved with --benchmark-save.
Nothing is asserted about speed: these runs never gate anything.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import measure
import pytest
from fixtures import TARGETS, Target
from measure import POOL_TARGETS, WORKLOADS

DURATION = float(os.environ.get("BENCH_DURATION", "3"))
CASES = [pytest.param(target, workload, id=f"{workload}-{target}")
         for workload in WORKLOADS for target in TARGETS
         if workload != "W4" or target in POOL_TARGETS]
EXTRA = ("connections_per_s", "requests_per_s", "transfer_bytes_per_s", "p50_ms", "p99_ms", "errors",
         "requests", "cpu_user_us_per_req", "cpu_sys_us_per_req")


@pytest.mark.parametrize(("target", "workload"), CASES)
def test_load(benchmark: Any, load_target: Callable[[str, bool], Target], load_rows: list[dict[str, Any]],
              target: str, workload: str) -> None:
    spec = WORKLOADS[workload]
    chosen = load_target(target, spec.pool)
    benchmark.group = f"load {workload}: {spec.title}"
    result = benchmark.pedantic(measure.wrk, args=(chosen, spec, DURATION), rounds=1, iterations=1)
    benchmark.extra_info.update({key: result[key] for key in EXTRA})
    benchmark.extra_info["bytes_per_s"] = result["transfer_bytes_per_s"]
    benchmark.extra_info.update(workers=int(os.environ.get("BENCH_WORKERS", "1")), duration_s=DURATION,
                                target=target, workload=workload, wrk=" ".join(result["command"]))
    load_rows.append(dict(benchmark.extra_info))
