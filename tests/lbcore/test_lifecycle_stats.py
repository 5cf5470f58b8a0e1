"""A backend's lifecycle as ``lbproxy stats`` and the node's report read it
from the segment: the queue's counters per service, each backend's
max_conns, drain state and slow start left; a summed report still names
the backends in drain."""
from __future__ import annotations

import dataclasses

from lbcore.balance.probe import monotonic_ms
from lbcore.stats import MAX_DRAINING_REPORTED, format_stats, node_stats, report_counters, service_counters
from lbcore.wire import SUMMED
from tests.lbcore.test_lifecycle_picks import lifecycle_config


def drained(config, states: dict[str, str]):
    [service] = config.services
    backends = tuple(dataclasses.replace(b, state=states.get(b.id, "active")) for b in service.backends)
    return dataclasses.replace(config, services=(dataclasses.replace(service, backends=backends),))


def test_stats_show_the_queue_drains_limits_and_ramps(published):
    config = lifecycle_config("wrr", [1, 1, 1, 1], max_conns=[2, 0, 0, 0], slow_start_ms=10_000, max_queue=5)
    image = published.publish(drained(config, {"b1": "draining", "b2": "closing"}))
    segment = published.segment
    plain = format_stats(node_stats(segment))
    assert "queue:" not in plain and "slow start" not in plain and "at max_conns" not in plain
    assert "    draining: b1 (0 open)" in plain and "    closing " in plain
    slots = [int(s) for s in image.backends["slot"]]
    segment.counters["active"][slots[0]] = 2
    segment.counters["active"][slots[1]] = 4
    segment.counters["ramp_start_ms"][slots[3]] = (monotonic_ms() - 4_000) & 0xFFFFFFFF
    state = segment.service_states[0]
    state["waiting"], state["queued"], state["queue_timeouts"], state["rejected"] = 3, 10, 2, 1
    stats = node_stats(segment)
    [svc] = stats["services"]
    assert {k: svc[k] for k in ("waiting", "queued", "queue_timeouts", "rejected")} == \
        {"waiting": 3, "queued": 10, "queue_timeouts": 2, "rejected": 1}
    by_id = {b["id"]: b for b in svc["backends"]}
    assert [by_id[f"b{i}"]["state"] for i in range(4)] == ["active", "draining", "closing", "active"]
    assert by_id["b0"]["max_conns"] == 2 and by_id["b1"]["max_conns"] == 0
    assert 5_000 < by_id["b3"]["ramp_ms_left"] <= 6_000 and by_id["b0"]["ramp_ms_left"] == 0
    table = format_stats(stats)
    assert "    draining: b1 (4 open)" in table
    assert "    slow start: b3 (" in table and "    at max_conns: b0 (2/2)" in table
    assert "    queue: 3 waiting, 10 queued, 2 timed out, 1 rejected" in table
    assert service_counters(segment) == \
        {"svc": {"waiting": 3, "queued": 10, "queue_timeouts": 2, "rejected": 1}}
    assert service_counters(segment, image) == service_counters(segment)


def test_a_ramp_over_or_in_a_service_without_slow_start_shows_nothing(published):
    image = published.publish(lifecycle_config("wrr", [1, 1]))
    published.segment.counters["ramp_start_ms"][int(image.backends["slot"][0])] = monotonic_ms() & 0xFFFFFFFF
    [svc] = node_stats(published.segment)["services"]
    assert [b["ramp_ms_left"] for b in svc["backends"]] == [0, 0]


def test_a_summed_report_keeps_the_rows_of_backends_in_drain(published):
    n = 3 * MAX_DRAINING_REPORTED
    config = lifecycle_config("wrr", [1] * n)
    states = {f"b{i}": "draining" for i in range(0, n, 2)}  # 150 in drain
    states["b1"] = "closing"
    image = published.publish(drained(config, states))
    segment = published.segment
    segment.counters["active"][int(image.backends["slot"][1])] = 7
    full = report_counters(segment, 10_000, image)
    assert len(full["svc"]) == n and SUMMED not in full["svc"]
    summed = report_counters(segment, 10, image)["svc"]
    assert summed[SUMMED]["active"] == 7
    own = set(summed) - {SUMMED}
    assert len(own) == MAX_DRAINING_REPORTED
    assert own <= set(states) and "b1" in own
    assert summed["b1"] == {"active": 7, "total": 0, "failed": 0}
