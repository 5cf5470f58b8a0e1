"""The health verdict, in one place (DESIGN, "Health"): which nodes probe a
backend, how their results become one verdict, and when that verdict
changes the backend's state. Pure: times are given, nothing is read.

- ``probers_for``: the ``k`` nodes that probe a backend, by rendezvous
  hashing over the nodes the control plane hears from. Adding or losing a
  node moves only the backends it probes (k x M probes, not N x M). The
  nodes count with the same function (lbcore.probing, with ``RiseFall``,
  which a node in static mode uses too).
- ``quorum``: the probers' latest results, those older than 3 intervals
  (and 1.5 s: three of the reports that vouch for them) counting as none;
  down when a majority of the current probers say down, up when a majority
  say up, no verdict otherwise (a missing result is never a vote).
- ``RiseFall``: one counter per backend in [0, rise + fall - 1], up while
  it is at least ``rise`` (HAProxy's src/check.c): ``fall`` bad verdicts in
  a row take an up backend down, ``rise`` good ones bring it back, and
  alternating verdicts never change its state.
- ``FlapDamper``: more than ``max_changes`` changes of state within
  ``window_s`` hold the backend down for ``hold_s``, and say so.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lbcore.verdict import RiseFall, probers_for

__all__ = ["STALE_INTERVALS", "FlapDamper", "Result", "RiseFall", "fresh_for", "probers_for", "quorum"]

STALE_INTERVALS = 3  # a prober's result older than this many intervals counts as no result
# ... but never sooner than this: a node vouches for its unchanged results
# with its periodic report (every 0.5 s), so three reports may go by
MIN_FRESH_S = 1.5


def fresh_for(interval_s: float) -> float:
    """How long a prober's result counts (refreshed each time it is vouched for)."""
    return max(STALE_INTERVALS * interval_s, MIN_FRESH_S)


@dataclass(frozen=True)
class Result:
    up: bool
    at_s: float  # when the prober observed it, on the control plane's clock


def quorum(results: Mapping[str, Result], probers: Iterable[str], now_s: float,
           interval_s: float) -> bool | None:
    """The verdict of the current probers' fresh results: False (down: a
    majority of the current probers say so), True (up: a majority say so),
    or None (no majority either way: probers without a fresh result, or a
    tie, are no evidence, so the verdict counter does not move)."""
    current = list(probers)
    fresh = [results[p] for p in current if p in results and now_s - results[p].at_s <= fresh_for(interval_s)]
    down = sum(1 for r in fresh if not r.up)
    if down * 2 > len(current):
        return False
    if (len(fresh) - down) * 2 > len(current):
        return True
    return None


class FlapDamper:
    """Holds a backend down after too many changes of state in a window."""

    def __init__(self, max_changes: int = 4, window_s: float = 60.0, hold_s: float = 120.0) -> None:
        self.max_changes, self.window_s, self.hold_s = max_changes, window_s, hold_s
        self.changes: deque[float] = deque()
        self.held_until_s = 0.0

    def lift(self) -> None:
        """No hold, and no changes counted towards one."""
        self.held_until_s = 0.0
        self.changes.clear()

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
