"""Micro benchmarks of what is not a load run: pick cost per algorithm by
pool size, the pick cost of a backend's lifecycle (max_conns, slow start)
beside plain WRR, snapshot and Maglev table builds (node and control
plane), a one-weight delta applied, snapshot publish and notice.

    pytest bench/test_micro.py --benchmark-only [--benchmark-save=NAME]

Each benchmark records a per-operation figure in ``extra_info`` (ns per pick,
ms per build); they never assert on time.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator

import numpy as np
import pytest

from lbcore import layout
from lbcore.balance.maglev import build_table
from lbcore.balance.probe import monotonic_ms, notice_loop, picks
from lbcore.config import Backend, Lifecycle, Service
from lbcore.image import Image, Limits, build_image, patched_tables, publish_image
from lbcore.routing import Routing, rows_changed
from lbcore.segment import Segment
from lbcore.slots import SlotMap
from lbcore.wire import Delta, decode_delta
from orchestrator.derive import derive_in_full
from orchestrator.store import SqliteStore

PICKS_PER_CALL = 100_000
LIMITS = Limits(connect_timeout_ms=2000, idle_timeout_ms=300_000, retries=3)
_ids = itertools.count()


def pool(algorithm: str, size: int) -> list[Service]:
    backends = tuple(Backend(f"b{i}", f"127.{1 + i // 65000}.{(i // 250) % 250}.{1 + i % 250}:80", 1 + i % 3)
                     for i in range(size))
    return [Service("svc", "127.0.0.1:8080", algorithm, backends)]


def build(services: list[Service], version: int = 1) -> Image:
    service_slots: SlotMap[str] = SlotMap(layout.MAX_SERVICES)
    backend_slots: SlotMap[tuple[str, str]] = SlotMap(layout.MAX_BACKENDS)
    service_slots.assign((s.name for s in services), lambda slot: True)
    backend_slots.assign(((s.name, b.id) for s in services for b in s.backends), lambda slot: True)
    return build_image(services, LIMITS, version, service_slots, backend_slots)


@pytest.fixture
def segment() -> Iterator[Segment]:
    seg = Segment.create(f"bench-{os.getpid()}-{next(_ids)}")
    try:
        yield seg
    finally:
        seg.unlink()
        seg.close()


@pytest.mark.parametrize("size", [10, 1_000, 10_000])
@pytest.mark.parametrize("algorithm", ["wrr", "least_conn", "p2c", "maglev"])
def test_pick_cost(benchmark, segment, algorithm, size):
    publish_image(segment, build(pool(algorithm, size)))
    hashes = (np.arange(PICKS_PER_CALL, dtype=np.uint64) * 2654435761 % (1 << 32)).astype(np.uint32)
    benchmark.pedantic(picks, args=(segment.base_address, 0, PICKS_PER_CALL, hashes),
                       rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["ns_per_pick"] = benchmark.stats.stats.median / PICKS_PER_CALL * 1e9
    benchmark.extra_info["backends"] = size


LIFECYCLE_POOL = 1_000


@pytest.mark.parametrize("variant", ["plain", "max_conns", "slow_start_idle", "one_ramping"])
def test_pick_cost_lifecycle(benchmark, segment, variant):
    """WRR over the same 1,000 backends: plain; with max_conns on every row
    (each pick reads the row's limit and its active count); with slow start
    on the service but no row ramping (each pick loads ramp_start_ms); with
    one row ramping at f = 0.5 (its entries draw and are declined half the
    time). Run side by side: compare the ns_per_pick of the four."""
    [service] = pool("wrr", LIFECYCLE_POOL)
    if variant == "max_conns":
        service = dataclasses.replace(service, backends=tuple(
            dataclasses.replace(b, max_conns=1_000_000) for b in service.backends))
    elif variant != "plain":
        service = dataclasses.replace(service, lifecycle=Lifecycle(slow_start_ms=60_000))
    image = build([service])
    publish_image(segment, image)
    if variant == "one_ramping":
        slot = int(image.backends["slot"][0])
        segment.counters["ramp_start_ms"][slot] = (monotonic_ms() - 30_000) & 0xFFFFFFFF  # f = 0.5
    benchmark.pedantic(picks, args=(segment.base_address, 0, PICKS_PER_CALL),
                       rounds=10, iterations=1, warmup_rounds=2)
    benchmark.extra_info["ns_per_pick"] = benchmark.stats.stats.median / PICKS_PER_CALL * 1e9
    benchmark.extra_info["backends"] = LIFECYCLE_POOL


def test_snapshot_build_10k_backends_wrr(benchmark):
    services = pool("wrr", 10_000)
    benchmark.pedantic(build, args=(services,), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["ms_per_build"] = benchmark.stats.stats.median * 1e3


def test_snapshot_build_10k_backends_maglev(benchmark):
    services = pool("maglev", 10_000)
    benchmark.pedantic(build, args=(services,), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["ms_per_build"] = benchmark.stats.stats.median * 1e3


def test_maglev_table_build_10k_backends(benchmark):
    ids = [f"b{i}" for i in range(10_000)]
    weights = [1 + i % 3 for i in range(10_000)]
    rows = list(range(10_000))
    benchmark.pedantic(build_table, args=(ids, weights, rows, layout.MAGLEV_SIZE), rounds=5, iterations=1)
    benchmark.extra_info["ms_per_build"] = benchmark.stats.stats.median * 1e3


def test_snapshot_publish_10k_backends(benchmark, segment):
    image = build(pool("maglev", 10_000))
    benchmark.pedantic(publish_image, args=(segment, image), rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info["ms_per_publish"] = benchmark.stats.stats.median * 1e3


def test_snapshot_notice_per_accept(benchmark, segment):
    """What a worker pays per accept to notice a new version: one atomic
    load of the generation, compared with the one it holds."""
    publish_image(segment, build(pool("wrr", 10)))
    loops = 1_000_000
    benchmark.pedantic(notice_loop, args=(segment.base_address, loops), rounds=5, iterations=1)
    benchmark.extra_info["ns_per_notice"] = benchmark.stats.stats.median / loops * 1e9


def test_control_plane_snapshot_10k_backends(benchmark):
    """What the control plane builds for a fetch: the canonical snapshot of
    10,000 backends from the derived services (pieces and bytes, from scratch)."""
    services = pool("maglev", 10_000)
    benchmark.pedantic(lambda: Routing.of(1, services).encode(), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["ms_per_build"] = benchmark.stats.stats.median * 1e3


def test_control_plane_full_derivation_10k_backends(benchmark, tmp_path):
    """What the control plane does at start, after a failed step, and as its
    idle audit: read the whole store, derive, build, and check every row by
    the nodes' rules (decoding the snapshot back)."""
    store = SqliteStore(tmp_path / "state.db")
    try:
        store.seed(pool("maglev", 10_000))
        benchmark.pedantic(lambda: derive_in_full(store.read()), rounds=5, iterations=1, warmup_rounds=1)
    finally:
        store.close()
    benchmark.extra_info["ms_per_derivation"] = benchmark.stats.stats.median * 1e3


@pytest.mark.parametrize("size", [1_000, 10_000])
@pytest.mark.parametrize("algorithm", ["wrr", "maglev"])
@pytest.mark.parametrize("path", ["applied", "patched"])
def test_one_weight_delta(benchmark, path, algorithm, size):
    """A node's work for a one-weight delta, short of the shared-memory copy.
    applied: check and apply it to the routing, then build the next image
    from the routing's services, reusing the one before (what a delta that
    does more than rewrite rows costs). patched: what a node does with a
    delta that only rewrites rows (Planner.plan_rows): the rows checked
    into a thin routing and patched into the tables. For Maglev either way
    rebuilds the service's table."""
    services = pool(algorithm, size)
    service_slots: SlotMap[str] = SlotMap(layout.MAX_SERVICES)
    backend_slots: SlotMap[tuple[str, str]] = SlotMap(layout.MAX_BACKENDS)
    service_slots.assign(["svc"], lambda slot: True)
    backend_slots.assign((("svc", b.id) for b in services[0].backends), lambda slot: True)
    base = Routing.of(1, services)
    image = build_image(base.as_services(), LIMITS, 1, service_slots, backend_slots)
    row = {"service": "svc", "id": "b0", "address": services[0].backends[0].address, "weight": 7}
    data = Delta(2, 1, backends=[row]).encode()

    def apply() -> Image:
        routing = base.apply(decode_delta(data))
        return build_image(routing.as_services(), LIMITS, 2, service_slots, backend_slots, image.parts,
                              rows_changed(base, routing))

    def patch() -> Image:
        routing = base.with_rows(decode_delta(data))
        assert routing is not None
        parts = dict(image.parts)
        for name, ids in (routing.rewritten_rows(base) or {}).items():
            parts[name] = patched_tables(parts[name], {i: routing.backend(name, i) for i in ids})
        return build_image(base.as_services(), LIMITS, 2, service_slots, backend_slots, parts)  # as held

    def tables(image: Image) -> tuple[int, bytes, bytes, bytes]:
        return image.version, image.services.tobytes(), image.backends.tobytes(), image.table.tobytes()

    expected = tables(apply())
    assert tables(patch()) == expected
    benchmark.pedantic(apply if path == "applied" else patch, rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info["ms_per_apply"] = benchmark.stats.stats.median * 1e3
    benchmark.extra_info["backends"] = size
