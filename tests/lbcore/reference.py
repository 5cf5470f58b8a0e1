"""Pure-Python models of the balancing algorithms: obviously correct, slow.

The compiled picks are compared against these (see test_balance.py)."""
from __future__ import annotations

from fractions import Fraction
from math import gcd

MASK64 = (1 << 64) - 1


def wrr_schedule(weights: list[int]) -> list[int]:
    """Earliest deadline first: the k-th turn of i is due at (k + 1/2) / w_i
    (weights divided by their gcd); ties go to the lower position."""
    positive = [w for w in weights if w > 0]
    if not positive:
        return []
    g = 0
    for w in positive:
        g = gcd(g, w)
    turns = []
    for i, w in enumerate(weights):
        w //= g
        turns += [(Fraction(2 * k + 1, 2 * w), i) for k in range(w)]
    return [i for _, i in sorted(turns)]


def wrr_picks(weights: list[int], n: int) -> list[int]:
    schedule = wrr_schedule(weights)
    return [schedule[k % len(schedule)] for k in range(n)]


def least_conn_picks(weights: list[int], active: list[int], n: int, cursor: int = 0) -> list[int]:
    """Each pick: scan from position cursor % count, take the lowest
    (active + 1) / weight (first found on ties), count it as open."""
    active = list(active)
    picks = []
    count = len(weights)
    for _ in range(n):
        best = None
        for step in range(count):
            i = (cursor + step) % count
            if weights[i] == 0:
                continue
            if best is None or \
                    Fraction(active[i] + 1, weights[i]) < Fraction(active[best] + 1, weights[best]):
                best = i
        cursor += 1
        picks.append(best)
        active[best] += 1
    return picks


def xorshift64star(state: int) -> tuple[int, int]:
    x = state
    x ^= x >> 12
    x ^= (x << 25) & MASK64
    x ^= x >> 27
    return x, (x * 2685821657736338717) & MASK64


def p2c_picks(weights: list[int], n: int, seed: int) -> list[int]:
    """Two distinct candidates drawn uniformly from the WRR schedule, less
    loaded by (active + 1) / weight wins (the first drawn on ties); picks stay
    open."""
    schedule = wrr_schedule(weights)
    active = [0] * len(weights)
    state = seed | 1
    picks = []
    for _ in range(n):
        state, r = xorshift64star(state)
        a = schedule[r % len(schedule)]
        b = None
        for _draw in range(16):  # the second candidate is another backend, if one turns up
            state, r = xorshift64star(state)
            if schedule[r % len(schedule)] != a:
                b = schedule[r % len(schedule)]
                break
        if b is not None and (active[a] + 1) * weights[b] > (active[b] + 1) * weights[a]:
            a = b
        picks.append(a)
        active[a] += 1
    return picks


def maglev_table(permutations: list[tuple[int, int]], weights: list[int], size: int) -> list[int]:
    """Maglev population (Eisenbud et al., NSDI 2016, pseudocode 1), with
    weights as turns: each round a backend gains its weight in credit and
    fills one entry per max-weight of credit."""
    table = [-1] * size
    next_index = [0] * len(weights)
    credit = [0] * len(weights)
    top = max(weights)
    filled = 0
    while True:
        for i, (offset, skip) in enumerate(permutations):
            credit[i] += weights[i]
            if credit[i] < top:
                continue
            credit[i] -= top
            position = (offset + next_index[i] * skip) % size
            while table[position] >= 0:
                next_index[i] += 1
                position = (offset + next_index[i] * skip) % size
            table[position] = i
            next_index[i] += 1
            filled += 1
            if filled == size:
                return table
