"""The SQLite store: compare-and-swap rules (I3-I5), one transaction per
mutation, versions that never go backwards across a reopen (I8)."""
from __future__ import annotations

import pytest

from orchestrator.errors import BadRequestError, NotFoundError, VersionConflictError
from orchestrator.model import Membership
from orchestrator.store import SqliteStore


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(tmp_path / "state.db")
    yield s
    s.close()


def seeded(store: SqliteStore) -> SqliteStore:
    store.put_policy("web", "127.0.0.1:8080", "wrr", expected_version=0)
    store.add_backend("web", "w1", "127.0.0.1:9001", 1, expected_version=0)
    return store


def test_every_mutation_advances_the_version(store):
    assert store.read().version == 0
    assert store.put_policy("web", "127.0.0.1:8080", "wrr", 0) == 1
    assert store.add_backend("web", "w1", "127.0.0.1:9001", 1, 0) == 2
    assert store.set_weight("web", "w1", 3, 1) == 3
    assert store.set_membership("web", "w1", Membership.DRAINING, 2) == 4
    state = store.read()
    assert state.version == 4
    (backend,) = state.backends
    assert (backend.weight, backend.state, backend.version) == (3, Membership.DRAINING, 3)


def test_add_with_expected_zero_only_if_absent(store):
    seeded(store)
    with pytest.raises(VersionConflictError) as info:
        store.add_backend("web", "w1", "127.0.0.1:9002", 1, expected_version=0)
    assert (info.value.expected, info.value.current) == (0, 1)
    assert "expected version 0, current version 1" in str(info.value)
    assert store.read().backends[0].address == "127.0.0.1:9001"


def test_one_record_per_service_and_backend(store):
    seeded(store)
    with pytest.raises(BadRequestError):
        store.add_backend("web", "w1", "127.0.0.1:9002", 1, expected_version=None)
    store.set_membership("web", "w1", Membership.REMOVED, None)
    store.add_backend("web", "w1", "127.0.0.1:9002", 2, expected_version=2)  # re-added: same record
    (backend,) = store.read().backends
    assert (backend.address, backend.state, backend.version) == ("127.0.0.1:9002", Membership.ACTIVE, 3)


def test_stale_membership_write_is_refused_and_changes_nothing(store):
    seeded(store)
    before = store.read()
    with pytest.raises(VersionConflictError):
        store.set_membership("web", "w1", Membership.DRAINING, expected_version=7)
    assert store.read() == before


def test_health_applies_only_newer_revisions(store):
    seeded(store)
    assert store.record_health("w1", False, 5)[0] is True
    version = store.read().version
    assert store.record_health("w1", True, 5) == (False, version)   # same revision
    assert store.record_health("w1", True, 4) == (False, version)   # older
    assert store.read().health[0].up is False
    assert store.record_health("w1", True, 6) == (True, version + 1)


def test_policy_versions_strictly_increase(store):
    store.put_policy("web", "127.0.0.1:8080", "wrr", 0)
    store.put_policy("web", "127.0.0.1:8080", "maglev", 1)
    with pytest.raises(VersionConflictError) as info:
        store.put_policy("web", "127.0.0.1:8080", "p2c", 1)
    assert info.value.current == 2
    (policy,) = store.read().policies
    assert (policy.algorithm, policy.version) == ("maglev", 2)


@pytest.mark.parametrize("call, error", [
    (lambda s: s.add_backend("nope", "b", "127.0.0.1:1", 1, None), NotFoundError),
    (lambda s: s.add_backend("web", "bad id", "127.0.0.1:1", 1, None), BadRequestError),
    (lambda s: s.add_backend("web", "b", "not-an-address", 1, None), BadRequestError),
    (lambda s: s.add_backend("web", "b", "127.0.0.1:1", -1, None), BadRequestError),
    (lambda s: s.add_backend("web", "b", "127.0.0.1:1", "1", None), BadRequestError),
    (lambda s: s.set_weight("web", "ghost", 1, None), NotFoundError),
    (lambda s: s.put_policy("web", "127.0.0.1:8080", "random", None), BadRequestError),
    (lambda s: s.put_policy("api", "127.0.0.1:8080", "wrr", 0), BadRequestError),  # listen taken
    (lambda s: s.record_health("w1", "yes", 1), BadRequestError),
    (lambda s: s.set_membership("web", "w1", Membership.ACTIVE, -3), BadRequestError),
])
def test_bad_requests_are_refused_and_change_nothing(store, call, error):
    seeded(store)
    before = store.read()
    with pytest.raises(error):
        call(store)
    assert store.read() == before


def test_acknowledged_writes_and_version_survive_a_reopen(tmp_path):
    path = tmp_path / "state.db"
    first = SqliteStore(path)
    seeded(first)
    acknowledged = first.set_weight("web", "w1", 9, None)
    first.close()
    again = SqliteStore(path)
    try:
        state = again.read()
        assert state.version == acknowledged
        assert state.backends[0].weight == 9
        assert again.add_backend("web", "w2", "127.0.0.1:9002", 1, 0) == acknowledged + 1
    finally:
        again.close()


def test_a_node_limit_is_refused_by_the_store(tmp_path):
    """A write the nodes could not apply is refused before it is acknowledged."""
    store = SqliteStore(tmp_path / "limits.db")
    try:
        for i in range(64):
            store.put_policy(f"s{i}", f"127.0.1.{i + 1}:80", "wrr", 0)
        with pytest.raises(BadRequestError, match="at most 64 services"):
            store.put_policy("s64", "127.0.2.1:80", "wrr", 0)
    finally:
        store.close()


def test_a_drained_backend_can_be_added_again(store):
    seeded(store)
    store.set_membership("web", "w1", Membership.DRAINING, None)
    store.add_backend("web", "w1", "127.0.0.1:9001", 2, expected_version=2)
    (backend,) = store.read().backends
    assert (backend.state, backend.weight) == (Membership.ACTIVE, 2)


def test_seeding_is_one_transaction_into_an_empty_store_only(store):
    from lbcore.config import Backend, Service

    web = Service("web", "127.0.0.1:8080", "wrr", (Backend("w1", "127.0.0.1:9001", 2),))
    clash = Service("web", "127.0.0.1:8081", "wrr", ())  # same name: the insert fails half-way
    with pytest.raises(Exception, match="UNIQUE"):
        store.seed([web, clash])
    assert (store.read().version, store.read().policies, store.read().backends) == (0, (), ())
    assert store.seed([web]) is True
    state = store.read()
    assert state.version == 1
    assert [(b.id, b.weight, b.state, b.version) for b in state.backends] == [("w1", 2, Membership.ACTIVE, 1)]
    assert store.seed([Service("api", "127.0.0.1:8082", "p2c", ())]) is False
    assert store.read() == state


def test_the_store_commits_durably(tmp_path):
    """I8 against power loss, not only kill -9 (the OS keeps a killed
    process's written pages, so kill -9 tests pass with synchronous=OFF):
    the store's own connection journals to a write-ahead log and syncs it
    to disk before a commit returns (synchronous=FULL), so an acknowledged
    write is on the disk, not in the page cache."""
    store = SqliteStore(tmp_path / "state.db")
    try:
        db = store._db  # the connection the store commits on, not a new one with default settings
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        store.close()
