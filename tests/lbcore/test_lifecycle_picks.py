"""A backend's lifecycle in the picks, on a real image in a real segment
(the compiled picks through the probe): slow start thins a ramping row by
its factor f = max(min, (t / window) ^ (1 / aggression)); a row at its
max_conns takes no pick, in a panic neither; claims never take a backend
past its max_conns, whatever races them; the image carries the settings."""
from __future__ import annotations

import dataclasses
import threading
from collections import Counter

import numpy as np
import pytest

from lbcore import layout
from lbcore.balance.probe import hammer, monotonic_ms, picks
from lbcore.config import Config, parse_config
from lbcore.ejection import set_local_down
from tests.conftest import unique_node_id
from tests.lbcore.reference import wrr_picks
from tests.lbcore.test_balance import positions

N = 40_000
WINDOW = 10_000
ALGORITHMS = ["wrr", "least_conn", "p2c", "maglev"]


def lifecycle_config(algorithm: str, weights: list[int], max_conns: list[int] | None = None,
                     **lifecycle: object) -> Config:
    """One service "svc" of backends b0, b1... on 127.0.0.x:80 with these
    weights (and max_conns), and the service's lifecycle keys."""
    lines = ["[node]", f'id = "{unique_node_id()}"', "workers = 1",
             "[[service]]", 'name = "svc"', 'listen = "127.0.0.1:7000"', f'algorithm = "{algorithm}"',
             *(f"{key} = {value}" for key, value in lifecycle.items())]
    for i, weight in enumerate(weights):
        lines += ["[[service.backend]]", f'id = "b{i}"', f'address = "127.0.{i // 250}.{i % 250 + 2}:80"',
                  f"weight = {weight}"]
        if max_conns is not None:
            lines.append(f"max_conns = {max_conns[i]}")
    return parse_config("\n".join(lines) + "\n")


def ramp(published, position: int, elapsed_ms: int, now: int) -> None:
    """The backend at ``position`` began its ramp ``elapsed_ms`` before ``now``."""
    slot = int(published.image.backends["slot"][position])
    published.segment.counters["ramp_start_ms"][slot] = (now - elapsed_ms) & 0xFFFFFFFF or 1


def shares(published, rows: np.ndarray, n: int) -> list[float]:
    counts = Counter(positions(published, rows))
    assert -1 not in counts
    return [counts[i] / len(rows) for i in range(n)]


def formula(weights: list[int], ramping: int, f: float) -> float:
    """Envoy's effective weight: the ramping backend's share of new connections."""
    others = sum(weights) - weights[ramping]
    return weights[ramping] * f / (others + weights[ramping] * f)


# ---------------------------------------------------------------- slow start

RAMPS = [
    ([1, 1, 1, 1], 1.0, 2_500, 0.25),
    ([1, 1, 1, 1], 2.0, 2_500, 0.5),     # (1/4) ^ (1/2)
    ([2, 1, 3], 1.0, 5_000, 0.5),
    ([1, 1, 1, 1], 1.0, 200, 0.1),       # below the least share: min_weight_percent = 10
]


# p2c with unequal weights and no load takes the heavier candidate: its
# shares are not the weights' to begin with, so only equal weights for it
@pytest.mark.parametrize(("algorithm", "weights", "aggression", "elapsed", "f"),
                         [("wrr", *case) for case in RAMPS]
                         + [("p2c", *case) for case in RAMPS if len(set(case[0])) == 1])
def test_a_ramping_backend_takes_the_formula_share(published, algorithm, weights, aggression, elapsed, f):
    published.publish(lifecycle_config(algorithm, weights, slow_start_ms=WINDOW,
                                       slow_start_aggression=aggression))
    now = monotonic_ms()
    ramp(published, 0, elapsed, now)
    got = shares(published, picks(published.segment.base_address, 0, N, now_ms=now), len(weights))
    expected = formula(weights, 0, f)
    assert abs(got[0] - expected) < 0.01, (got, expected)
    if algorithm == "wrr":  # the others keep their ratio
        rest = sum(weights[1:])
        for i in range(1, len(weights)):
            assert abs(got[i] - (1 - expected) * weights[i] / rest) < 0.01, got


def test_p2c_gives_the_formula_share_with_loads_too(published):
    # short connections under load: the others have some open, the ramping
    # one fewer; were it a second candidate too it would win nearly every
    # comparison it is in (about twice the formula's share)
    published.publish(lifecycle_config("p2c", [1, 1, 1, 1], slow_start_ms=WINDOW))
    now = monotonic_ms()
    for slot in published.image.backends["slot"][1:]:
        published.segment.counters["active"][int(slot)] = 7
    ramp(published, 0, 1_000, now)  # f = 0.1
    got = shares(published, picks(published.segment.base_address, 0, N, now_ms=now), 4)
    assert abs(got[0] - formula([1, 1, 1, 1], 0, 0.1)) < 0.006, got


def test_least_conn_among_equal_loads_gives_the_formula_share(published):
    # no connection open: every pick is a tie of the four; a declined pick
    # is drawn again among them (from a random row, not the successor,
    # which would take every declined tie), so the others share evenly
    published.publish(lifecycle_config("least_conn", [1, 1, 1, 1], slow_start_ms=WINDOW))
    now = monotonic_ms()
    ramp(published, 0, 2_500, now)
    got = shares(published, picks(published.segment.base_address, 0, N, now_ms=now), 4)
    assert abs(got[0] - formula([1, 1, 1, 1], 0, 0.25)) < 0.01, got
    assert max(got[1:]) - min(got[1:]) < 0.02, got


@pytest.mark.parametrize("algorithm", ["least_conn", "p2c"])
def test_a_ramping_backend_fills_up_at_the_rate_its_factor_allows(published, algorithm):
    # long-lived connections: the others hold 30 each, the ramping one none;
    # without the ramp it would take every pick until it caught up. least_conn
    # takes it at each pick with probability f; p2c has it as first candidate
    # (the only place it may be) w·f / (others + w·f) of the time, and it wins
    published.publish(lifecycle_config(algorithm, [1, 1, 1, 1], slow_start_ms=WINDOW))
    now = monotonic_ms()
    slots = [int(s) for s in published.image.backends["slot"]]
    for slot in slots[1:]:
        published.segment.counters["active"][slot] = 30
    ramp(published, 0, 2_500, now)  # f = 0.25
    n = 400
    got = Counter(positions(published, picks(published.segment.base_address, 0, n, hold=True, now_ms=now)))
    rate = 0.25 if algorithm == "least_conn" else formula([1, 1, 1, 1], 0, 0.25)
    assert abs(got[0] - n * rate) <= 4 * (n * rate * (1 - rate)) ** 0.5, got
    active = [int(published.segment.counters["active"][s]) for s in slots]
    assert active[0] < min(active[1:]), active  # still below the others: filling, not filled


@pytest.mark.parametrize("algorithm", ["wrr", "least_conn", "p2c"])
def test_a_ramp_that_is_over_takes_its_full_share(published, algorithm):
    published.publish(lifecycle_config(algorithm, [1, 1, 1, 1], slow_start_ms=WINDOW))
    now = monotonic_ms()
    ramp(published, 0, WINDOW, now)
    got = shares(published, picks(published.segment.base_address, 0, N, now_ms=now), 4)
    assert abs(got[0] - 0.25) < 0.01, got


def test_a_stamp_ahead_of_the_clock_is_a_ramp_just_begun(published):
    # the agent's clock may be a moment ahead of a worker's coarse one: the
    # stamp then reads as "just begun" (the least share), not as a ramp
    # long over (the whole share)
    published.publish(lifecycle_config("wrr", [1, 1, 1, 1], slow_start_ms=WINDOW))
    now = monotonic_ms()
    ramp(published, 0, -3, now)
    got = shares(published, picks(published.segment.base_address, 0, N, now_ms=now), 4)
    assert abs(got[0] - formula([1, 1, 1, 1], 0, 0.1)) < 0.01, got


def test_a_stamp_in_a_service_without_slow_start_changes_nothing(published):
    published.publish(lifecycle_config("wrr", [1, 2, 3]))
    now = monotonic_ms()
    ramp(published, 2, 100, now)
    got = positions(published, picks(published.segment.base_address, 0, 600, now_ms=now))
    assert got == wrr_picks([1, 2, 3], 600)


def test_a_lone_ramping_backend_still_serves(published):
    # serving beats ramping: declined every time, the scan still takes it
    for algorithm in ("wrr", "least_conn", "p2c"):
        published.publish(lifecycle_config(algorithm, [1], slow_start_ms=WINDOW))
        now = monotonic_ms()
        ramp(published, 0, 0, now)
        assert set(positions(published, picks(published.segment.base_address, 0, 2000, now_ms=now))) == {0}


# ---------------------------------------------------------------- max_conns

@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_backend_at_its_max_conns_takes_no_pick(published, algorithm):
    published.publish(lifecycle_config(algorithm, [3, 1, 1], max_conns=[2, 0, 5]))
    slots = [int(s) for s in published.image.backends["slot"]]
    counters = published.segment.counters
    counters["active"][slots[0]] = 2
    hashes = (np.arange(2000, dtype=np.uint64) * 2654435761 % (1 << 32)).astype(np.uint32)
    got = set(positions(published, picks(published.segment.base_address, 0, 2000, client_hashes=hashes)))
    assert got == {1, 2}
    counters["active"][slots[0]] = 1  # one slot free again
    got = set(positions(published, picks(published.segment.base_address, 0, 2000, client_hashes=hashes)))
    assert 0 in got


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_full_backend_takes_no_pick_in_a_panic_either(published, algorithm):
    published.publish(lifecycle_config(algorithm, [1, 1, 1], max_conns=[1, 0, 0]))
    slots = [int(s) for s in published.image.backends["slot"]]
    counters, now = published.segment.counters, monotonic_ms()
    counters["ejected_until_ms"][slots[0]] = now + 60_000
    counters["ejected_until_ms"][slots[1]] = now + 60_000
    set_local_down(published.segment, slots[2], True)
    counters["active"][slots[0]] = 1
    hashes = (np.arange(500, dtype=np.uint64) * 2654435761 % (1 << 32)).astype(np.uint32)
    rows, panicked = picks(published.segment.base_address, 0, 500, client_hashes=hashes, now_ms=now,
                           panic=True)
    assert panicked.all()
    assert set(positions(published, rows)) == {1, 2}


@pytest.mark.parametrize("algorithm", ["wrr", "least_conn", "p2c"])
def test_claims_racing_in_threads_never_pass_max_conns(published, algorithm):
    # two threads without the GIL, each holding up to 3 claims at once on
    # a pool of two backends limited to 2 each: the claims kept at any
    # moment never pass a backend's limit, and all are given back
    published.publish(lifecycle_config(algorithm, [1, 1], max_conns=[2, 2]))
    slots = [int(s) for s in published.image.backends["slot"]]
    held = np.zeros(layout.MAX_BACKENDS, dtype=np.int64)
    results: list[tuple[int, int, int]] = []

    rounds = 200_000

    def run(seed: int) -> None:
        results.append(hammer(published.segment.base_address, 0, rounds, 3, held.ctypes.data, seed))

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claims = sum(r[0] for r in results)
    assert 2 * rounds <= claims < 2 * rounds * 3, results  # each round holds one at least; they met
    assert max(r[2] for r in results) <= 2, results
    assert held[slots[1]] == 0 and held[slots[0]] == 0
    assert [int(published.segment.counters["active"][s]) for s in slots] == [0, 0]


def test_a_claim_alone_fills_a_backend_exactly_to_its_limit(published):
    published.publish(lifecycle_config("wrr", [1], max_conns=[3]))
    held = np.zeros(layout.MAX_BACKENDS, dtype=np.int64)
    claims, full, most = hammer(published.segment.base_address, 0, 10, 5, held.ctypes.data)
    assert (claims, full, most) == (30, 0, 3)  # alone, the pick already leaves a full backend out


# ---------------------------------------------------------------- the image

def test_the_image_carries_the_lifecycle(published):
    config = lifecycle_config("p2c", [1, 1, 1, 1], max_conns=[0, 7, 0, 0], slow_start_ms=2500,
                              slow_start_aggression=4.0, slow_start_min_weight_percent=25, max_queue=9,
                              queue_timeout_ms=700)
    [service] = config.services
    states = ["active", "active", "draining", "closing"]
    backends = tuple(dataclasses.replace(b, state=state)
                     for b, state in zip(service.backends, states, strict=True))
    service = dataclasses.replace(service, backends=backends)
    image = published.publish(dataclasses.replace(config, services=(service,)))
    row = image.services[0]
    assert (int(row["slow_start_ms"]), int(row["slow_start_min_permille"]), int(row["max_queue"]),
            int(row["queue_timeout_ms"]), int(row["closing_count"])) == (2500, 250, 9, 700, 1)
    assert float(row["slow_start_exponent"]) == 0.25
    assert image.backends["drain"].tolist() == [0, 0, 1, 2]
    assert image.backends["max_conns"].tolist() == [0, 7, 0, 0]
    assert image.backends["eligible"].tolist() == [1, 1, 0, 0]  # in the image, not eligible
    assert int(row["eligible_count"]) == 2
    rows = picks(published.segment.base_address, 0, 1000)
    assert set(positions(published, rows)) == {0, 1}
