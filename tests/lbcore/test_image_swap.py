"""I1 under churn: real worker processes serve connections while images are
swapped hundreds of times a second; every connection must reach a backend of an
image that was current while it was being set up, and none may reach a
backend that was never published."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from lbcore.config import parse_config
from tests.conftest import config_text
from tests.support import BackendPool, free_port, wait_for

WORKERS = 2
PUBLISHED = 8
NEVER_PUBLISHED = 4
SWAP_SECONDS = 3.0


def start_workers(segment_path: str) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-m", "lbcore.worker_main", segment_path, str(i),
                              "1024", "1000", str(os.getpid())])
            for i in range(WORKERS)]


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            w.wait(timeout=10)
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()


@pytest.mark.timeout(120)
def test_swaps_under_load_never_reach_an_unpublished_backend(published):
    listen_port = free_port()
    with BackendPool(PUBLISHED + NEVER_PUBLISHED) as pool:
        good = pool.ports[:PUBLISHED]
        rng = random.Random(7)

        def services() -> list[dict]:
            chosen = rng.sample(range(PUBLISHED), rng.randint(1, PUBLISHED))
            return [{"name": "svc", "listen": f"127.0.0.1:{listen_port}",
                     "algorithm": rng.choice(["wrr", "least_conn", "p2c", "maglev"]),
                     "backends": [(f"b{i}", f"127.0.0.1:{good[i]}", rng.randint(1, 5)) for i in chosen]}]

        history: list[tuple[float, float, set[int]]] = []  # (publish begun, done, ports)
        first = services()
        t0 = time.monotonic()
        published.publish(parse_config(config_text(first)))
        history.append((t0, time.monotonic(), {int(b[1].rsplit(":", 1)[1]) for b in first[0]["backends"]}))
        workers = start_workers(published.segment.path)
        try:
            wait_for(lambda: all(int(published.segment.workers[i]["listening"]) for i in range(WORKERS)),
                     10, "workers listening")
            stop = threading.Event()
            results: list[tuple[float, float, int]] = []
            failures: list[str] = []

            def client() -> None:
                while not stop.is_set():
                    begun = time.monotonic()
                    try:
                        with socket.create_connection(("127.0.0.1", listen_port), timeout=5) as s:
                            port = int(s.recv(16).split(b"\n")[0])
                    except (OSError, ValueError) as exc:
                        failures.append(repr(exc))
                        continue
                    results.append((begun, time.monotonic(), port))

            clients = [threading.Thread(target=client) for _ in range(4)]
            for c in clients:
                c.start()
            deadline = time.monotonic() + SWAP_SECONDS
            while time.monotonic() < deadline:
                nxt = services()
                begun = time.monotonic()
                published.publish(parse_config(config_text(nxt)))
                history.append((begun, time.monotonic(),
                                {int(b[1].rsplit(":", 1)[1]) for b in nxt[0]["backends"]}))
                time.sleep(0.0005)
            stop.set()
            for c in clients:
                c.join(timeout=30)
        finally:
            stop_workers(workers)

        swaps_per_second = len(history) / SWAP_SECONDS
        print(f"\n{len(history)} images ({swaps_per_second:.0f}/s), {len(results)} connections")
        assert swaps_per_second > 100
        assert len(results) > 200
        assert failures == []
        assert sum(pool.accepted(p) for p in pool.ports[PUBLISHED:]) == 0
        for begun, done, port in results:
            # versions that may have been current at some moment in [begun, done]
            candidates = [ports for i, (start, _, ports) in enumerate(history)
                          if start <= done and (i + 1 == len(history) or history[i + 1][1] >= begun)]
            assert any(port in ports for ports in candidates), (begun, done, port)
        counters = published.segment.counters
        assert int(counters["failed"].sum()) == 0
        assert int(counters["active"].sum()) == 0
