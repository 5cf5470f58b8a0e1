"""The rules of the health checks that a node and the control plane share
(the contract, like the wire format: both sides must count alike).

- ``probers_for``: the ``k`` nodes that probe a backend, by rendezvous
  hashing over the nodes the control plane hears from (it announces them
  with each heartbeat): a node probes exactly the backends whose verdict
  counts its results; k x M probes in all, not N x M, and adding or losing
  a node moves only its share.
- ``results_digest``: what a node's periodic report says of all its current
  probe results, so that a lost result message is noticed and repaired.
- ``RiseFall``: one counter per backend (HAProxy's src/check.c): the
  control plane's verdict, and a node's own where it applies.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping


def probers_for(backend: str, nodes: Iterable[str], k: int) -> list[str]:
    """The ``k`` nodes (all of them, when fewer) that probe ``backend``: the
    highest scores of hash(node, backend), in score order."""
    def score(node: str) -> bytes:
        return hashlib.blake2b(f"{node}\0{backend}".encode(), digest_size=8).digest()

    return sorted(set(nodes), key=score, reverse=True)[:max(0, k)]


def results_digest(results: Mapping[str, bool]) -> str:
    """A node's current results, digested: equal digests, equal results."""
    text = json.dumps(sorted(results.items()), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class RiseFall:
    """One counter in [0, rise + fall - 1], up while at least ``rise``:
    ``fall`` bad verdicts in a row take an up backend down, ``rise`` good
    ones bring it back, and alternating verdicts never change its state. A
    new backend starts up (full health), as one with no observation is
    routable."""

    def __init__(self, rise: int, fall: int, up: bool = True) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise, self.fall = rise, fall
        self.health = rise + fall - 1 if up else 0

    @property
    def up(self) -> bool:
        return self.health >= self.rise

    def set(self, up: bool) -> None:
        """Full health, or none (an operator's report: check.c's ``set server health``)."""
        self.health = self.rise + self.fall - 1 if up else 0

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
