"""A bounded soak: random churn of membership, weights, policy and health
through the admin API, in bursts of about a second each followed by verify,
under client load through two nodes. It must end with no invariant
violation, no acknowledged write lost (the store against a model of every
acknowledged write), and flat memory of the control plane and the nodes
(RSS at the start and the end printed).

    FULCRUM_SOAK_S=600 python3 -m pytest tests/faults/test_soak.py -s   # 10 minutes

CI runs it for FULCRUM_SOAK_S (default 60 s)."""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import zmq
from harness import Load, verify

from lbcore.wire import decode_reply, encode_request

SOAK_S = float(os.environ.get("FULCRUM_SOAK_S", "60"))
BURST_S = 0.8
ALGORITHMS = ("wrr", "least_conn", "p2c", "maglev")
RSS_GROWTH_MB = 25  # what "flat" allows over the run: caches filling, not a leak


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Admin:
    """The admin API over one REQ socket; the model of what it acknowledged."""

    def __init__(self, endpoint: str, listen: str, addresses: list[str]) -> None:
        self.sock = zmq.Context.instance().socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.listen, self.addresses = listen, addresses
        # backend id -> (address, weight, state) as acknowledged; health by id
        self.backends: dict[str, tuple[str, int, str]] = {}
        self.health: dict[str, bool] = {}
        self.revisions: dict[str, int] = {}
        self.algorithm = "wrr"
        self.acknowledged = 0

    def call(self, verb: str, **args: object) -> dict:
        self.sock.send(encode_request(verb, args))
        assert self.sock.poll(10_000), f"no answer to {verb}"
        return decode_reply(self.sock.recv())

    def churn(self, rng: random.Random) -> None:
        """One random write; the model follows what is acknowledged."""
        ids = [f"c{i}" for i in range(8)]  # the churned pool; "anchor" is never touched
        kind = rng.choice(["add", "add", "weight", "weight", "drain", "remove", "policy", "health", "health"])
        backend = rng.choice(ids)
        record = self.backends.get(backend)
        if kind == "add" and (record is None or record[2] == "removed"):
            address, weight = rng.choice(self.addresses), rng.randint(0, 4)
            if self.call("backend.add", service="web", id=backend, address=address, weight=weight)["ok"]:
                self.backends[backend] = (address, weight, "active")
        elif kind == "weight" and record is not None and record[2] != "removed":
            weight = rng.randint(0, 4)
            if self.call("backend.set_weight", service="web", id=backend, weight=weight)["ok"]:
                self.backends[backend] = (record[0], weight, record[2])
        elif kind in ("drain", "remove") and record is not None and record[2] != "removed":
            final = kind == "remove"
            if self.call("backend.remove", service="web", id=backend, final=final)["ok"]:
                self.backends[backend] = (record[0], record[1], "removed" if final else "draining")
        elif kind == "policy":
            algorithm = rng.choice(ALGORITHMS)
            if self.call("policy.set", service="web", algorithm=algorithm)["ok"]:
                self.algorithm = algorithm
        elif kind == "health" and record is not None:
            up = rng.random() < 0.6
            revision = self.revisions.get(backend, 0) + 1
            if self.call("health.report", backend=backend, up=up, revision=revision)["ok"]:
                self.health[backend], self.revisions[backend] = up, revision
        else:
            return
        self.acknowledged += 1

    def lost(self) -> list[str]:
        """What the store does not hold of the acknowledged writes."""
        listed = {b["id"]: (b["address"], b["weight"], b["state"])
                  for b in self.call("backend.list", service="web")["result"]}
        for i, (address, weight, state) in list(self.backends.items()):
            # a drain that was a removal ends removed once the nodes confirm it
            if state == "draining" and listed.get(i) == (address, weight, "removed"):
                self.backends[i] = (address, weight, "removed")
        lost = [f"backend {i}: acknowledged {want}, stored {listed.get(i)}"
                for i, want in self.backends.items() if listed.get(i) != want]
        health = {h["id"]: (h["state"] == "up", h["revision"])
                  for h in self.call("health.show")["result"] if h["revision"] is not None}
        shown = {i for i, record in self.backends.items() if record[2] != "removed"}  # health show's rows
        lost += [f"health {i}: acknowledged {(up, self.revisions[i])}, stored {health.get(i)}"
                 for i, up in self.health.items() if i in shown and health.get(i) != (up, self.revisions[i])]
        algorithm = self.call("policy.get", service="web")["result"]["algorithm"]
        if algorithm != self.algorithm:
            lost.append(f"policy: acknowledged {self.algorithm}, stored {algorithm}")
        return lost


@pytest.mark.timeout(int(SOAK_S) + 180)
def test_soak_random_churn_under_load(fleet):
    f = fleet()
    addresses = [address for p in f.backends.values() for address in p.addresses.values()]
    rng = random.Random(int(os.environ.get("FULCRUM_SOAK_SEED", "7")))
    admin = Admin(f.orch.endpoint, f.targets[0], addresses)
    # the file's backends w1-w3 stay as they are: clients always have somewhere to go
    pids = {"lborch": f.orch.process.pid, **{n.node_id: n.pid for n in f.nodes}}
    violations: list[str] = []
    rounds = 0
    with Load(f.targets) as load:
        time.sleep(2.0)  # warm: imports, caches, first connections
        start = {name: rss_mb(pid) for name, pid in pids.items()}
        deadline = time.monotonic() + SOAK_S
        while time.monotonic() < deadline:
            burst_end = time.monotonic() + BURST_S
            while time.monotonic() < burst_end:
                admin.churn(rng)
            rounds += 1
            settle = time.monotonic() + 3.0
            while not (result := verify(f.orch.endpoint))["consistent"] and time.monotonic() < settle:
                time.sleep(0.05)
            if not result["consistent"] or result["nodes"] != len(f.nodes):
                violations += [f"round {rounds}: {v}" for v in result["violations"]] or \
                    [f"round {rounds}: {result['nodes']} nodes heard"]
        end = {name: rss_mb(pid) for name, pid in pids.items()}
    lost = admin.lost()
    figures = load.figures
    print(f"\nSOAK {SOAK_S:.0f} s: {rounds} rounds, {admin.acknowledged} acknowledged writes, "
          f"{len(violations)} violations, {len(lost)} lost; {figures.connections} new connections "
          f"({len(figures.failed_connections)} failed), {figures.transfer_rounds} transfer rounds "
          f"({len(figures.cut_transfers)} cut)")
    for name in pids:
        print(f"SOAK RSS {name}: {start[name]:.1f} MB -> {end[name]:.1f} MB")
    assert violations == [], violations[:10]
    assert lost == [], lost[:10]
    assert figures.failed_connections == [] and figures.cut_transfers == [], \
        (figures.failed_connections[:5], figures.cut_transfers[:5])
    assert admin.acknowledged > 10 * rounds
    for name in pids:
        assert end[name] - start[name] < RSS_GROWTH_MB, f"{name}: {start[name]:.1f} -> {end[name]:.1f} MB"
    print(json.dumps({"soak_s": SOAK_S, "rounds": rounds, "writes": admin.acknowledged}))
