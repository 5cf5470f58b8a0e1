"""Balancing through a real node: WRR shares, least connections over held
connections, Maglev affinity to the client address."""
from __future__ import annotations

import threading
from collections import Counter

import pytest
from e2e_support import Client, free_port, service, wait_until


@pytest.mark.timeout(120)
def test_wrr_weights_1_2_3_give_exact_shares(backends, lbproxy):
    b = backends({"web-1": "127.0.0.1", "web-2": "127.0.0.1", "web-3": "127.0.0.1"})
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [("web-1", b["web-1"], 1), ("web-2", b["web-2"], 2),
                                            ("web-3", b["web-3"], 3)], algorithm="wrr")])
    seen: Counter[str] = Counter()
    for _ in range(600):
        with Client(listen) as c:
            seen[c.ident()] += 1
    expected = {"web-1": 100, "web-2": 200, "web-3": 300}
    for ident, want in expected.items():
        assert abs(seen[ident] - want) <= want * 0.02, f"shares {dict(seen)}, want {expected}"
    assert sum(seen.values()) == 600

    # The node's own counters agree with what the clients saw.
    def totals():
        stats = node.backend_stats()
        got = {i: s["total"] for i, s in stats.items()}
        return got if got == dict(seen) else None
    wait_until(totals, 5, message=lambda: f"stats totals {node.backend_stats()} == {dict(seen)}")
    stats = node.stats()
    assert stats["services"][0]["accepted"] == 600
    assert all(s["failed"] == 0 for s in stats["services"][0]["backends"])


def _open_concurrently(listen: str, n: int) -> list[Client]:
    """``n`` connections opened at the same moment from ``n`` threads."""
    barrier = threading.Barrier(n)
    results: list[Client | BaseException] = [None] * n  # type: ignore[list-item]

    def run(i: int) -> None:
        try:
            barrier.wait(10)
            results[i] = Client(listen)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    clients = [r for r in results if isinstance(r, Client)]
    errors = [r for r in results if not isinstance(r, Client)]
    if errors:
        for c in clients:
            c.close()
        raise AssertionError(f"{len(errors)} connections failed: {errors[:3]}")
    return clients


@pytest.mark.timeout(120)
@pytest.mark.parametrize("opening", ["sequential", "concurrent"])
def test_least_conn_spreads_held_connections_evenly(backends, lbproxy, opening):
    ids = [f"web-{i}" for i in range(1, 5)]
    b = backends({i: "127.0.0.1" for i in ids})
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [(i, b[i], 1) for i in ids], algorithm="least_conn")],
                   workers=2)
    clients: list[Client] = []
    try:
        seen: Counter[str] = Counter()
        if opening == "sequential":
            for _ in range(20):
                c = Client(listen)
                clients.append(c)
                seen[c.ident()] += 1
        else:
            clients = _open_concurrently(listen, 20)
            for c in clients:
                seen[c.ident()] += 1
        assert dict(seen) == {i: 5 for i in ids}, f"held connections per backend: {dict(seen)}"
        active = {i: s["active"] for i, s in node.backend_stats().items()}
        assert active == {i: 5 for i in ids}, f"stats active: {active}"
        # Both workers took part (otherwise node-wide sharing was not exercised).
        accepted = [w["accepted"] for w in node.stats()["workers"]]
        assert len(accepted) == 2 and sum(accepted) == 20 and min(accepted) > 0, accepted
    finally:
        for c in clients:
            c.close()
    wait_until(lambda: all(s["active"] == 0 for s in node.backend_stats().values()), 5,
               message=lambda: f"active back to 0: {node.backend_stats()}")


@pytest.mark.timeout(120)
def test_maglev_keeps_a_client_address_on_one_backend(backends, lbproxy):
    ids = [f"web-{i}" for i in range(1, 5)]
    b = backends({i: "127.0.0.1" for i in ids})
    listen = f"127.0.0.1:{free_port()}"
    lbproxy([service("web", listen, [(i, b[i], 1) for i in ids], algorithm="maglev")], workers=2)

    # One source address, random source ports (so both workers get some):
    # every connection goes to the same backend.
    one: Counter[str] = Counter()
    for _ in range(20):
        with Client(listen, source="127.0.0.7") as c:
            one[c.ident()] += 1
    assert len(one) == 1, f"connections from 127.0.0.7 went to {dict(one)}"

    # Many source addresses: spread over every backend, each address sticky.
    by_source: dict[str, set[str]] = {}
    for n in range(1, 61):
        source = f"127.0.1.{n}"
        for _ in range(2):
            with Client(listen, source=source) as c:
                by_source.setdefault(source, set()).add(c.ident())
    unstable = {s: sorted(v) for s, v in by_source.items() if len(v) != 1}
    assert not unstable, f"sources that changed backend: {unstable}"
    spread = Counter(next(iter(v)) for v in by_source.values())
    assert set(spread) == set(ids), f"60 sources over backends: {dict(spread)}"


@pytest.mark.timeout(120)
def test_least_conn_serves_when_a_count_dipped_below_zero(backends, lbproxy):
    """A worker killed between its two counter updates can leave a count at
    -1; least_conn must still claim backends, not refuse clients."""
    from lbcore.segment import Segment

    ids = ["web-1", "web-2"]
    b = backends({i: "127.0.0.1" for i in ids})
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [(i, b[i], 1) for i in ids], algorithm="least_conn")],
                   workers=2)
    slot = node.backend_stats()["web-1"]["slot"]
    segment = Segment.attach(node.node_id)
    try:
        segment.counters[slot]["active"] = -1
    finally:
        segment.close()
    seen: Counter[str] = Counter()
    for n in range(20):
        with Client(listen) as c:
            seen[c.ident()] += 1
            assert c.echo(b"n %d\n" % n) == b"n %d\n" % n
    assert sum(seen.values()) == 20 and set(seen) == set(ids), dict(seen)
