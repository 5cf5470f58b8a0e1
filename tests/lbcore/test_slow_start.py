"""Slow start as the node's planner stamps it: a backend that becomes
eligible in a service with slow_start_ms (added, up again, back from a
drain) gets its counter's ramp_start_ms at the publish that lets workers
pick it; the first image, a service new to the node and a service without
slow start ramp nothing; ramps that are over are cleared."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from lbcore.config import Backend, Config, Lifecycle, Service, parse_document
from lbcore.planner import Planner, ramp_clock
from lbcore.segment import Segment
from tests.conftest import unique_node_id

WINDOW = 30_000
SLOW = Lifecycle(slow_start_ms=WINDOW)


@pytest.fixture
def planner() -> Iterator[Planner]:
    segment = Segment.create(unique_node_id("ramps"))
    node = parse_document({"node": {"id": "ramps"}}, "test").node
    try:
        yield Planner(Config("test", node), segment, lambda: ())
    finally:
        segment.unlink()
        segment.close()


def backend(i: int, **changes: object) -> Backend:
    return dataclasses.replace(Backend(f"b{i}", f"127.0.0.{i + 2}:80", 1), **changes)


def publish(planner: Planner, *services: Service) -> None:
    planner.publish(planner.plan(Config("test", planner.config.node, services)))


def svc(backends: list[Backend], lifecycle: Lifecycle = SLOW, name: str = "web", port: int = 7000) -> Service:
    return Service(name, f"127.0.0.1:{port}", "wrr", tuple(backends), lifecycle=lifecycle)


def stamps(planner: Planner) -> dict[str, int]:
    """Backend id -> its ramp_start_ms, for the rows of the published image."""
    assert planner.image is not None
    counters = planner.segment.counters
    return {f"{r['id'].decode()}@{int(r['service_slot'])}": int(counters[int(r["slot"])]["ramp_start_ms"])
            for r in planner.image.backends}


def ramping(planner: Planner) -> set[str]:
    return {key for key, stamp in stamps(planner).items() if stamp}


def test_the_first_image_ramps_nothing(planner):
    publish(planner, svc([backend(0), backend(1)]))
    assert ramping(planner) == set()


def test_a_backend_added_ramps_and_only_it(planner):
    publish(planner, svc([backend(0), backend(1)]))
    before = ramp_clock()
    publish(planner, svc([backend(0), backend(1), backend(2)]))
    assert ramping(planner) == {"b2@0"}
    assert 0 <= (stamps(planner)["b2@0"] - before) % (1 << 32) < 5_000


@pytest.mark.parametrize(("was", "back"), [
    ({"up": False}, {"up": True}),
    ({"state": "draining"}, {"state": "active"}),
    ({"weight": 0}, {"weight": 2}),
])
def test_a_backend_eligible_again_ramps(planner, was, back):
    publish(planner, svc([backend(0), backend(1, **was)]))
    assert ramping(planner) == set()
    publish(planner, svc([backend(0), backend(1, **back)]))
    assert ramping(planner) == {"b1@0"}


def test_a_backend_that_stays_eligible_does_not_ramp_again(planner):
    publish(planner, svc([backend(0), backend(1)]))
    publish(planner, svc([backend(0), backend(1, weight=3)]))  # a weight changed: still eligible
    assert ramping(planner) == set()


def test_without_slow_start_or_in_a_new_service_nothing_ramps(planner):
    publish(planner, svc([backend(0)], Lifecycle()))
    publish(planner, svc([backend(0), backend(1)], Lifecycle()),
            svc([backend(0), backend(1)], name="api", port=7001))
    assert ramping(planner) == set()


def test_ramps_that_are_over_are_cleared(planner):
    publish(planner, svc([backend(0)]), svc([backend(0)], name="api", port=7001))
    publish(planner, svc([backend(0), backend(1)]), svc([backend(0), backend(1)], name="api", port=7001))
    assert ramping(planner) == {"b1@0", "b1@1"}
    start = stamps(planner)["b1@0"]
    assert planner.end_ramps(start + WINDOW - 1) == 0
    assert planner.end_ramps(start + WINDOW + 1) == 2
    assert ramping(planner) == set()


def test_a_ramp_whose_service_left_slow_start_is_cleared(planner):
    publish(planner, svc([backend(0)]))
    publish(planner, svc([backend(0), backend(1)]))
    start = stamps(planner)["b1@0"]
    publish(planner, svc([backend(0), backend(1)], Lifecycle()))
    assert planner.end_ramps(start + 1) == 1
    assert ramping(planner) == set()


def test_the_clock_wraps_and_a_stamp_is_never_zero(planner):
    publish(planner, svc([backend(0)]))
    publish(planner, svc([backend(0), backend(1)]))
    slot = int(planner.image.backends["slot"][1])
    planner.segment.counters["ramp_start_ms"][slot] = 0xFFFFFF00  # begun just before the wrap
    assert planner.end_ramps(0x10) == 0  # 0x110 ms in
    assert planner.end_ramps((0xFFFFFF00 + WINDOW) & 0xFFFFFFFF) == 1
    assert 1 <= ramp_clock() <= 0xFFFFFFFF
