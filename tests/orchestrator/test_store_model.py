"""Random sequences of register / remove / health / policy writes sent to
the control plane's admin API (the JSON verbs lbctl sends), with restarts of
the store and snapshots published to a node that may miss some, checked
after every step against a small reference model (I2-I6, I8)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lbcore.config import Backend, Service
from lbcore.routing import Routing
from lbcore.wire import WireError, decode_delta, decode_snapshot
from orchestrator.control import ControlPlane
from orchestrator.derive import Deriver, derive_in_full
from orchestrator.errors import ControlError
from orchestrator.model import Change, Membership
from orchestrator.store import SqliteStore
from tests.wire_reference import encode_snapshot

# The model's own membership rules (not imported from the code under test):
# active -> draining -> drained -> removed; a drained or removed backend may
# become active again.
MODEL_TRANSITIONS = {
    Membership.ACTIVE: {Membership.DRAINING, Membership.REMOVED},
    Membership.DRAINING: {Membership.ACTIVE, Membership.DRAINED, Membership.REMOVED},
    Membership.DRAINED: {Membership.ACTIVE, Membership.REMOVED},
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
        self.plane = ControlPlane(self.store, on_change=lambda change, version: self.deriver.touch(change))
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

    def call(self, verb: str, **args) -> dict:
        args = {k: v for k, v in args.items() if v is not None}
        return self.plane.answer(json.dumps({"verb": verb, "args": args}).encode())[1]

    def attempt(self, verb: str, allowed: bool, **args) -> bool:
        """A write through the admin API; it must succeed exactly when the
        model says so, and answer the next version."""
        reply = self.call(verb, **args)
        assert reply["ok"] == allowed, (verb, args, reply)
        if allowed:
            self.version += 1
            assert reply["result"] == {"version": self.version}
        else:
            assert reply["error"]["code"] in ("version_conflict", "not_found", "bad_request"), reply
        return allowed

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
        assert routing.encode() == derive_in_full(self.store.read()).encode()
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
        self.plane = ControlPlane(self.store, on_change=lambda change, version: self.deriver.touch(change))
        assert self.deriver.routing.version == before == self.version

    @rule(service=st.sampled_from(SERVICES), algorithm=st.sampled_from(ALGORITHMS), expected=versions)
    def put_policy(self, service, algorithm, expected):
        current = self.policies.get(service, (None, 0))[1]
        expected = expected_of(expected, current)
        allowed = expected is None or expected == current
        listen = LISTEN[service]
        if self.attempt("policy.set", allowed, service=service, listen=listen, algorithm=algorithm,
                        expected_version=expected):
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
        if self.attempt("backend.add", allowed, service=service, id=backend, address=address, weight=weight,
                        expected_version=expected):
            self.backends[(service, backend)] = [address, weight, Membership.ACTIVE, current + 1]

    def key(self, pick: int, service: str, backend: str) -> tuple[str, str]:
        """Mostly a backend the model has (so that writes go through and
        reach deep states), sometimes any (so that unknown ones are refused)."""
        known = sorted(self.backends)
        return known[pick % len(known)] if known and pick % 5 else (service, backend)

    @precondition(lambda self: self.backends)
    @rule(pick=st.integers(0, 99), service=st.sampled_from(SERVICES), backend=st.sampled_from(BACKENDS),
          state=st.sampled_from(list(Membership)), expected=versions)
    def set_membership(self, pick, service, backend, state, expected):
        service, backend = self.key(pick, service, backend)
        record = self.backends.get((service, backend))
        expected = expected_of(expected, record[3] if record else 0)
        allowed = (record is not None and (expected is None or expected == record[3])
                   and state in MODEL_TRANSITIONS[record[2]])
        if state is Membership.DRAINING:
            # a drain starts only from active (draining again changes nothing)
            if record is not None and record[2] is Membership.DRAINING:
                return
            if self.attempt("backend.drain", allowed and record[2] is Membership.ACTIVE, service=service,
                            id=backend, expected_version=expected):
                record[2], record[3] = state, record[3] + 1
            return
        if state in (Membership.ACTIVE, Membership.DRAINED):
            # no verb re-activates a record as it is (backend add re-adds it
            # with an address and weight), and drained is the drain watch's
            # word: the store's own call, and the change reported as the
            # admin API reports it
            try:
                self.store.set_membership(service, backend, state, expected)
            except ControlError:
                assert not allowed
                return
            assert allowed
            self.version += 1
            self.deriver.touch(Change(backend=(service, backend)))
            record[2], record[3] = state, record[3] + 1
        elif self.attempt("backend.remove", allowed, service=service, id=backend, expected_version=expected,
                          final=True if state is Membership.REMOVED else None):
            record[2], record[3] = state, record[3] + 1

    @precondition(lambda self: self.backends)
    @rule(pick=st.integers(0, 99), service=st.sampled_from(SERVICES), backend=st.sampled_from(BACKENDS),
          weight=st.integers(0, 5), expected=versions)
    def set_weight(self, pick, service, backend, weight, expected):
        service, backend = self.key(pick, service, backend)
        record = self.backends.get((service, backend))
        expected = expected_of(expected, record[3] if record else 0)
        allowed = (record is not None and record[2] is not Membership.REMOVED
                   and (expected is None or expected == record[3]))
        if self.attempt("backend.set_weight", allowed, service=service, id=backend, weight=weight,
                        expected_version=expected):
            record[1], record[3] = weight, record[3] + 1

    @rule(backend=st.sampled_from(BACKENDS), up=st.booleans(), revision=st.integers(0, 8))
    def record_health(self, backend, up, revision):
        stored = self.health.get(backend)
        newer = stored is None or revision > stored[1]
        reply = self.call("health.report", backend=backend, up=up, revision=revision)
        if not any(b == backend for _, b in self.backends):
            assert reply["error"]["code"] == "not_found"  # health of a backend no service has
            return
        if not newer:  # I4: refused, saying why, and nothing changed
            assert reply["error"]["code"] == "bad_request"
            assert f"not newer than the stored revision {stored[1]}" in reply["error"]["message"]
            return
        assert reply["result"]["applied"]
        self.version += 1
        self.health[backend] = (up, revision)
        assert reply["result"]["version"] == self.version

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
        version = json.loads(derive_in_full(self.store.read()).encode())["version"]
        if self.published:
            assert version >= self.published[-1]
            assert (version > self.published[-1]) == (self.version > self.published[-1])
        self.published.append(version)

    @invariant()
    def routing_state_is_derived(self):
        """I2: the published snapshot is eligible(membership, health, policy):
        active backends with weight above 0, those whose health is down
        marked so (nodes route nothing to them and keep probing them), and
        draining ones marked draining (nodes still report their connections)."""
        expected = [
            Service(service, LISTEN[service], algorithm, tuple(
                Backend(backend, address, weight, self.health.get(backend, (True, 0))[0], 0,
                        "draining" if state is Membership.DRAINING else "active")
                for (s, backend), (address, weight, state, _) in sorted(self.backends.items())
                if s == service and (state is Membership.ACTIVE and weight > 0
                                     or state is Membership.DRAINING)))
            for service, (algorithm, _) in sorted(self.policies.items())]
        state = self.store.read()
        assert derive_in_full(state).encode() == encode_snapshot(self.version, expected, state.epoch)

    @invariant()
    def node_versions_only_increase(self):
        assert self.node_versions == sorted(set(self.node_versions))  # I6


StoreMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_store_against_model = StoreMachine.TestCase
