"""The health verdict, in one place (DESIGN, "Health"): which nodes probe a
backend, how their results become one verdict, and when that verdict
changes the backend's state. Pure: times are given, nothing is read.

- ``probers_for``: the ``k`` nodes that probe a backend, by rendezvous
  hashing over the nodes the control plane hears from. Adding or losing a
  node moves only the backends it probes (k x M probes, not N x M).
- ``quorum``: the probers' latest results, those older than 3 intervals
  counting as none; down when a majority of the current probers say down.
- ``RiseFall``: one counter per backend in [0, rise + fall - 1], up while
  it is at least ``rise`` (HAProxy's src/check.c): ``fall`` bad verdicts in
  a row take an up backend down, ``rise`` good ones bring it back, and
  alternating verdicts never change its state.
- ``FlapDamper``: more than ``max_changes`` changes of state within
  ``window_s`` hold the backend down for ``hold_s``, and say so.
"""
from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

STALE_INTERVALS = 3  # a prober's result older than this many intervals counts as no result


def probers_for(backend: str, nodes: Iterable[str], k: int) -> list[str]:
    """The ``k`` nodes (all of them, when fewer) that probe ``backend``: the
    highest scores of hash(node, backend), in score order."""
    def score(node: str) -> bytes:
        return hashlib.blake2b(f"{node}\0{backend}".encode(), digest_size=8).digest()

    return sorted(set(nodes), key=score, reverse=True)[:max(0, k)]


@dataclass(frozen=True)
class Result:
    up: bool
    at_s: float  # when the prober observed it, on the control plane's clock


def quorum(results: Mapping[str, Result], probers: Iterable[str], now_s: float,
           interval_s: float) -> bool | None:
    """The verdict of the current probers' fresh results: True (up), False
    (down: a majority of the current probers say so), or None (no prober
    has a fresh result: nothing to conclude)."""
    current = list(probers)
    fresh = [results[p] for p in current
             if p in results and now_s - results[p].at_s <= STALE_INTERVALS * interval_s]
    if not fresh:
        return None
    down = sum(1 for r in fresh if not r.up)
    return not down * 2 > len(current)


class RiseFall:
    """One counter: up while at least ``rise``. A new backend starts up
    (full health), as a backend with no observation is routable."""

    def __init__(self, rise: int, fall: int, up: bool = True) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise, self.fall = rise, fall
        self.health = rise + fall - 1 if up else 0

    @property
    def up(self) -> bool:
        return self.health >= self.rise

    def observe(self, good: bool) -> bool | None:
        """Count one verdict; the new state when it changed, else None."""
        was = self.up
        if good:
            self.health = min(self.health + 1, self.rise + self.fall - 1)
            if not was and self.health >= self.rise:
                self.health = self.rise + self.fall - 1  # up again: full health, as check.c does
        else:
            self.health = max(self.health - 1, 0)
            if was and self.health < self.rise:
                self.health = 0  # down: rise good verdicts to come back
        return None if self.up == was else self.up


class FlapDamper:
    """Holds a backend down after too many changes of state in a window."""

    def __init__(self, max_changes: int = 4, window_s: float = 60.0, hold_s: float = 120.0) -> None:
        self.max_changes, self.window_s, self.hold_s = max_changes, window_s, hold_s
        self.changes: deque[float] = deque()
        self.held_until_s = 0.0

    def held(self, now_s: float) -> bool:
        return now_s < self.held_until_s

    def record(self, now_s: float) -> bool:
        """A change of state at ``now_s``; True when it starts a hold."""
        self.changes.append(now_s)
        while self.changes and now_s - self.changes[0] > self.window_s:
            self.changes.popleft()
        if len(self.changes) > self.max_changes and not self.held(now_s):
            self.held_until_s = now_s + self.hold_s
            return True
        return False

    @property
    def flaps(self) -> int:
        return len(self.changes)
