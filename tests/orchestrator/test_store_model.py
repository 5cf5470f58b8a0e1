"""Random sequences of register / remove / health / policy writes against the
store, with restarts of the store and snapshots published to a node that may
miss some, checked after every step against a small reference model (I2-I6,
I8)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lbcore.config import Backend, Service
from lbcore.routing import Routing
from lbcore.wire import WireError, decode_delta, decode_snapshot, encode_snapshot
from orchestrator.derive import Deriver, routing_snapshot
from orchestrator.errors import ControlError, NotFoundError
from orchestrator.model import Change, Membership
from orchestrator.store import SqliteStore

# The model's own membership rules (not imported from the code under test):
# active -> draining -> removed; a drained or removed backend may become
# active again.
MODEL_TRANSITIONS = {
    Membership.ACTIVE: {Membership.DRAINING, Membership.REMOVED},
    Membership.DRAINING: {Membership.ACTIVE, Membership.REMOVED},
    Membership.REMOVED: {Membership.ACTIVE},
}
SERVICES = ["web", "api"]
BACKENDS = ["b1", "b2", "b3"]
ALGORITHMS = ["wrr", "least_conn", "p2c", "maglev"]
LISTEN = {"web": "127.0.0.1:8080", "api": "127.0.0.1:8081"}
# How a write names the version it expects: not at all, the current one, or a
# stale one (resolved against the model, so most writes go through and the
# machine reaches deep states, while conflicts are still exercised).
versions = st.sampled_from(["none", "current", "stale"])


def expected_of(choice: str, current: int) -> int | None:
    return {"none": None, "current": current, "stale": current + 1 if current == 0 else current - 1}[choice]


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory(prefix="fulcrum-model-")
        self.store = SqliteStore(Path(self.dir.name) / "state.db")
        self.version = 0
        self.policies: dict[str, tuple[str, int]] = {}              # service -> (algorithm, version)
        self.backends: dict[tuple[str, str], list] = {}             # key -> [address, weight, state, version]
        self.health: dict[str, tuple[bool, int]] = {}               # backend id -> (up, revision)
        self.published: list[int] = []                              # snapshot versions seen
        self.row_reads = 256
        self.deriver = Deriver(self.store)  # the control plane's single writer
        self.deriver.next()
        self.node = Routing(-1, {})         # what a node subscribed to it holds
        self.node_versions: list[int] = []

    @initialize(algorithms=st.tuples(st.sampled_from(ALGORITHMS), st.sampled_from(ALGORITHMS)),
                row_reads=st.sampled_from([0, 1, 256]))
    def services(self, algorithms, row_reads):
        # 0: every change derived in full; 1: one touched row by row reads,
        # more in full; 256: row by row (the running default for small pools)
        self.row_reads = self.deriver.row_reads_at_most = row_reads
        for service, algorithm in zip(SERVICES, algorithms, strict=True):
            self.put_policy(service, algorithm, "current")

    def teardown(self) -> None:
        self.store.close()
        self.dir.cleanup()

    def attempt(self, call, allowed: bool, change: Change) -> bool:
        """Run a store write; it must succeed exactly when the model says so."""
        try:
            call()
        except ControlError:
            assert not allowed, "the store refused a write the model allows"
            return False
        assert allowed, "the store applied a write the model refuses"
        self.version += 1
        self.deriver.touch(change)
        return True

    @rule(delivered=st.booleans())
    def publish(self, delivered):
        """The single writer derives what changed; the node gets the delta
        (or misses it), applies only a delta on its own version and fetches
        the full snapshot when it sees a gap (I6)."""
        derived = self.deriver.next()
        if derived is None:
            assert self.deriver.routing.version == self.version
            return
        routing, delta = derived
        # I2 for the running control plane: derived from the touched rows
        # only, byte for byte what a full recompute from the store gives
        assert routing.encode() == routing_snapshot(self.store.read())
        if not delivered:
            return
        received = decode_delta(delta.encode())
        if received.version <= self.node.version:
            return
        try:
            self.node = self.node.apply(received)
        except WireError:
            assert received.base != self.node.version, "a delta on the node's own version was refused"
            self.node = Routing.of(*decode_snapshot(routing.encode()))  # the fetch
        self.node_versions.append(self.node.version)
        assert self.node.encode() == routing.encode()

    @rule()
    def audit(self):
        """I2 at rest: when nothing is pending, the published routing is a
        full derivation from the store."""
        if self.deriver.routing.version == self.version:
            self.deriver.audit()

    @rule()
    def restart(self):
        """The control plane stops and starts again on the same file: every
        write is still there (the invariants check it) and the version did
        not go backwards (I8)."""
        before = self.store.read().version
        self.store.close()
        self.store = SqliteStore(Path(self.dir.name) / "state.db")
        self.deriver = Deriver(self.store, self.row_reads)
        self.deriver.next()  # at start: the whole state, derived in full and checked
        assert self.deriver.routing.version == before == self.version

    @rule(service=st.sampled_from(SERVICES), algorithm=st.sampled_from(ALGORITHMS), expected=versions)
    def put_policy(self, service, algorithm, expected):
        current = self.policies.get(service, (None, 0))[1]
        expected = expected_of(expected, current)
        allowed = expected is None or expected == current
        listen = LISTEN[service]
        if self.attempt(lambda: self.store.put_policy(service, listen, algorithm, expected), allowed,
                        Change(service=service)):
            self.policies[service] = (algorithm, current + 1)

    @rule(service=st.sampled_from(SERVICES), backend=st.sampled_from(BACKENDS),
          weight=st.integers(0, 5), port=st.integers(9000, 9003), expected=versions)
    def add_backend(self, service, backend, weight, port, expected):
        record = self.backends.get((service, backend))
        current = record[3] if record else 0
        expected = expected_of(expected, current)
        allowed = (service in self.policies and (expected is None or expected == current)
                   and (record is None or record[2] is not Membership.ACTIVE))
        address = f"127.0.0.1:{port}"
        if self.attempt(lambda: self.store.add_backend(service, backend, address, weight, expected), allowed,
                        Change(backend=(service, backend))):
            self.backends[(service, backend)] = [address, weight, Membership.ACTIVE, current + 1]

    @precondition(lambda self: self.backends)
    @rule(service=st.sampled_from(SERVICES), backend=st.sampled_from(BACKENDS),
          state=st.sampled_from(list(Membership)), expected=versions)
    def set_membership(self, service, backend, state, expected):
        record = self.backends.get((service, backend))
        expected = expected_of(expected, record[3] if record else 0)
        allowed = (record is not None and (expected is None or expected == record[3])
                   and state in MODEL_TRANSITIONS[record[2]])
        if self.attempt(lambda: self.store.set_membership(service, backend, state, expected), allowed,
                        Change(backend=(service, backend))):
            record[2], record[3] = state, record[3] + 1

    @precondition(lambda self: self.backends)
    @rule(service=st.sampled_from(SERVICES), backend=st.sampled_from(BACKENDS),
          weight=st.integers(0, 5), expected=versions)
    def set_weight(self, service, backend, weight, expected):
        record = self.backends.get((service, backend))
        expected = expected_of(expected, record[3] if record else 0)
        allowed = (record is not None and record[2] is not Membership.REMOVED
                   and (expected is None or expected == record[3]))
        if self.attempt(lambda: self.store.set_weight(service, backend, weight, expected), allowed,
                        Change(backend=(service, backend))):
            record[1], record[3] = weight, record[3] + 1

    @rule(backend=st.sampled_from(BACKENDS), up=st.booleans(), revision=st.integers(0, 8))
    def record_health(self, backend, up, revision):
        stored = self.health.get(backend)
        newer = stored is None or revision > stored[1]
        if not any(b == backend for _, b in self.backends):
            with pytest.raises(NotFoundError):  # health of a backend no service has
                self.store.record_health(backend, up, revision)
            return
        applied, version = self.store.record_health(backend, up, revision)
        assert applied == newer  # I4
        if newer:
            self.version += 1
            self.health[backend] = (up, revision)
            self.deriver.touch(Change(health=backend))
        assert version == self.version

    @invariant()
    def store_equals_model(self):
        state = self.store.read()
        assert state.version == self.version
        keys = [(b.service, b.id) for b in state.backends]
        assert len(keys) == len(set(keys))  # I3
        assert {(b.service, b.id): [b.address, b.weight, b.state, b.version] for b in state.backends} \
            == self.backends
        assert {p.service: (p.algorithm, p.version) for p in state.policies} == self.policies  # I5
        assert {h.backend_id: (h.up, h.revision) for h in state.health} == self.health  # I4

    @invariant()
    def snapshot_versions_only_increase(self):
        """I6 at the source: a new snapshot carries a strictly newer version
        exactly when a write was applied."""
        version = json.loads(routing_snapshot(self.store.read()))["version"]
        if self.published:
            assert version >= self.published[-1]
            assert (version > self.published[-1]) == (self.version > self.published[-1])
        self.published.append(version)

    @invariant()
    def routing_state_is_derived(self):
        """I2: the published snapshot is eligible(membership, health, policy)."""
        expected = [
            Service(service, LISTEN[service], algorithm, tuple(
                Backend(backend, address, weight)
                for (s, backend), (address, weight, state, _) in sorted(self.backends.items())
                if s == service and state is Membership.ACTIVE and weight > 0
                and self.health.get(backend, (True, 0))[0]))
            for service, (algorithm, _) in sorted(self.policies.items())]
        assert routing_snapshot(self.store.read()) == encode_snapshot(self.version, expected)

    @invariant()
    def node_versions_only_increase(self):
        assert self.node_versions == sorted(set(self.node_versions))  # I6


StoreMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_store_against_model = StoreMachine.TestCase
