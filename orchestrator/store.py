"""The authoritative store: one interface, SQLite by default.

Every mutation is one transaction that also advances the global config
version; a caller learns the new version only after the commit, so an
acknowledged write survives a crash (WAL, synchronous=FULL: I8). The
compare-and-swap rules live here and only here:

- membership (I3): one record per service + backend; a write names the
  record version it expects (``0`` on add: only if no record exists);
- health (I4): an observation applies only with a revision newer than the
  stored one, else it changes nothing;
- policy (I5): versions strictly increase; a stale expected version is
  refused with the current one in the error.
"""
from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from lbcore.balance import ALGORITHMS
from lbcore.config import (
    MAX_BACKEND_CONNS,
    MAX_MS,
    MAX_WEIGHT,
    HealthCheck,
    Lifecycle,
    Outlier,
    Service,
    check_name,
    parse_address,
)
from lbcore.layout import MAX_BACKENDS, MAX_SERVICES
from orchestrator.errors import BadRequestError, NotFoundError, VersionConflictError
from orchestrator.model import DRAIN_THEN, TRANSITIONS, Backend, Drain, Health, Membership, Policy, State
from orchestrator.policy import lifecycle_of, settings_text

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('config_version', 0);
-- the store's identity, made with it (or, for a store made before epochs, at
-- its first open): versions compare only within one epoch
INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', abs(random() % 4611686018427387903) + 1);
CREATE TABLE IF NOT EXISTS policy (
    service TEXT PRIMARY KEY, listen TEXT NOT NULL, algorithm TEXT NOT NULL,
    version INTEGER NOT NULL, health TEXT NOT NULL DEFAULT '{}', outlier TEXT NOT NULL DEFAULT '{}',
    lifecycle TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS backend (
    service TEXT NOT NULL, id TEXT NOT NULL, address TEXT NOT NULL,
    weight INTEGER NOT NULL, state TEXT NOT NULL, version INTEGER NOT NULL,
    max_conns INTEGER NOT NULL DEFAULT 0, drain TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (service, id));
CREATE INDEX IF NOT EXISTS backend_by_id ON backend (id);
CREATE TABLE IF NOT EXISTS health (
    backend_id TEXT PRIMARY KEY, up INTEGER NOT NULL, revision INTEGER NOT NULL,
    source TEXT NOT NULL DEFAULT 'report', since REAL NOT NULL DEFAULT 0);
"""
# Columns added since the first stores were made: added to an older store
# when it is opened (a default each, so its rows read as before).
ADDED_COLUMNS = {
    "policy": ("health TEXT NOT NULL DEFAULT '{}'", "outlier TEXT NOT NULL DEFAULT '{}'",
               "lifecycle TEXT NOT NULL DEFAULT '{}'"),
    "health": ("source TEXT NOT NULL DEFAULT 'report'", "since REAL NOT NULL DEFAULT 0"),
    "backend": ("max_conns INTEGER NOT NULL DEFAULT 0", "drain TEXT NOT NULL DEFAULT ''"),
}
POLICY_COLUMNS = "service, listen, algorithm, version, health, outlier, lifecycle"
BACKEND_COLUMNS = "service, id, address, weight, state, version, max_conns, drain"
HEALTH_SOURCES = ("report", "checks")


class Store(Protocol):
    """What the control plane needs of a store; every write returns the
    global config version after its commit."""

    def read(self) -> State: ...
    def read_rows(self, services: set[str], backends: set[tuple[str, str]],
                  backend_ids: set[str]) -> State: ...
    def put_policy(self, service: str, listen: str, algorithm: str, expected_version: int | None,
                   health: HealthCheck | None = None, outlier: Outlier | None = None,
                   lifecycle: Lifecycle | None = None) -> int: ...
    def add_backend(self, service: str, backend_id: str, address: str, weight: int,
                    expected_version: int | None, max_conns: int = 0) -> int: ...
    def set_membership(self, service: str, backend_id: str, state: Membership,
                       expected_version: int | None) -> int: ...
    def set_weight(self, service: str, backend_id: str, weight: int, expected_version: int | None) -> int: ...
    def set_backend(self, service: str, backend_id: str, weight: int | None, max_conns: int | None,
                    expected_version: int | None) -> int: ...
    def drain_backend(self, service: str, backend_id: str, timeout_ms: int | None, then: str | None,
                      expected_version: int | None) -> int: ...
    def set_drain(self, service: str, backend_id: str, drain: Drain, state: Membership,
                  expected_version: int) -> int: ...
    def record_health(self, backend_id: str, up: bool, revision: int | None,
                      source: str = "report") -> tuple[bool, int]: ...
    def seed(self, services: Sequence[Service]) -> bool: ...
    def advance_version(self) -> int: ...
    def new_epoch(self) -> int: ...
    def close(self) -> None: ...


def _why(exc: sqlite3.Error) -> str:
    """What a failure to open or write the store means to its operator."""
    text = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
        return f"not a Fulcrum store, or damaged ({text}); restore a good copy, or move it away to start anew"
    if "readonly" in text or "read-only" in text or "unable to open" in text:
        return f"cannot be written ({text}): the store's file and directory must be writable"
    return text


MEMBERSHIP = {m.value: m for m in Membership}  # a dict lookup, not an Enum call per row
MAX_INTEGER = (1 << 62)  # versions and revisions: SQLite stores signed 64-bit


def _check_integer(what: str, value: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise BadRequestError(f"{what} must be an integer 0..{high} (got {value!r})")


def _check_weight(weight: int) -> None:
    _check_integer("weight", weight, MAX_WEIGHT)


def drain_text(drain: Drain | None) -> str:
    return "" if drain is None else json.dumps(dataclasses.asdict(drain), sort_keys=True)


def drain_of(text: str) -> Drain | None:
    return Drain(**json.loads(text)) if text else None


def _backend_record(s: str, i: str, a: str, w: int, st: str, v: int, m: int, d: str) -> Backend:
    return Backend(s, i, a, w, MEMBERSHIP[st], v, m, drain_of(d))


def _check_name(what: str, value: str) -> None:
    problem = check_name(value) if isinstance(value, str) else "must be a string"
    if problem:
        raise BadRequestError(f"{what}: {problem}")


def _canonical_address(value: str) -> str:
    """One spelling per address, so that equal addresses compare equal."""
    try:
        host, port = parse_address(value)
    except (ValueError, AttributeError, TypeError) as exc:
        raise BadRequestError(f"address: {exc}") from None
    return f"{host}:{port}"


def _check_expected(expected: int | None) -> None:
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)
                                 or not 0 <= expected < MAX_INTEGER):
        raise BadRequestError(f"expected version must be an integer >= 0 (got {expected!r})")


class StoreError(Exception):
    """The store cannot be opened or written: ``FILE: reason``."""


class SqliteStore:
    """The embedded store: one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        # a store that is made now: no file, or an empty one (said so, never a silent start afresh)
        self.created = not Path(self.path).exists() or Path(self.path).stat().st_size == 0
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {_why(exc)}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            self._add_columns()
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"{self.path}: {_why(exc)}") from None

    def close(self) -> None:
        self._db.close()

    def _add_columns(self) -> None:
        for table, columns in ADDED_COLUMNS.items():
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for column in columns:
                if column.split()[0] not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")

    # ------------------------------------------------------------ reads

    def read(self) -> State:
        db = self._db
        db.execute("BEGIN")
        try:
            version = db.execute("SELECT value FROM meta WHERE key = 'config_version'").fetchone()[0]
            epoch = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
            policies = tuple(Policy(*row) for row in db.execute(
                f"SELECT {POLICY_COLUMNS} FROM policy ORDER BY service"))
            backends = tuple(_backend_record(*row) for row in db.execute(
                f"SELECT {BACKEND_COLUMNS} FROM backend ORDER BY service, id"))
            health = tuple(Health(b, bool(up), r, source, since) for b, up, r, source, since in db.execute(
                "SELECT backend_id, up, revision, source, since FROM health ORDER BY backend_id"))
        finally:
            db.execute("COMMIT")
        return State(version, policies, backends, health, epoch)

    def read_rows(self, services: set[str], backends: set[tuple[str, str]], backend_ids: set[str]) -> State:
        """Part of the state, in one transaction: the policies of
        ``services``, the membership records ``backends`` and every record
        of a backend id in ``backend_ids``, with the health of all of them."""
        db = self._db
        db.execute("BEGIN")
        try:
            version = db.execute("SELECT value FROM meta WHERE key = 'config_version'").fetchone()[0]
            epoch = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
            policies = tuple(Policy(*row) for name in sorted(services) for row in db.execute(
                f"SELECT {POLICY_COLUMNS} FROM policy WHERE service = ?", (name,)))
            query = f"SELECT {BACKEND_COLUMNS} FROM backend WHERE "
            rows = {(r[0], r[1]): r for key in backends
                    for r in db.execute(query + "service = ? AND id = ?", key)}
            rows.update({(r[0], r[1]): r for i in backend_ids for r in db.execute(query + "id = ?", (i,))})
            records = tuple(_backend_record(*rows[key]) for key in sorted(rows))
            health_query = "SELECT backend_id, up, revision, source, since FROM health WHERE backend_id = ?"
            health = tuple(Health(b, bool(up), r, source, since) for i in sorted({b.id for b in records})
                           for b, up, r, source, since in db.execute(health_query, (i,)))
        finally:
            db.execute("COMMIT")
        return State(version, policies, records, health, epoch)

    # ------------------------------------------------------------ writes

    def _mutate(self, change: Callable[[sqlite3.Connection], bool | None]) -> tuple[bool, int]:
        """Run ``change(db)`` and, unless it returns False (nothing to do),
        advance the config version, in one transaction. Returns (changed,
        the version after the commit)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            changed = change(db) is not False
            if changed:
                db.execute("UPDATE meta SET value = value + 1 WHERE key = 'config_version'")
            version = db.execute("SELECT value FROM meta WHERE key = 'config_version'").fetchone()[0]
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return changed, int(version)

    def put_policy(self, service: str, listen: str, algorithm: str, expected_version: int | None,
                   health: HealthCheck | None = None, outlier: Outlier | None = None,
                   lifecycle: Lifecycle | None = None) -> int:
        """``health``, ``outlier``, ``lifecycle``: None keeps the service's
        (the defaults for a new one); the caller checked ``lifecycle``
        against ``algorithm`` (policy.merged_lifecycle)."""
        _check_name("service", service)
        listen = _canonical_address(listen)
        _check_expected(expected_version)
        if algorithm not in ALGORITHMS:
            raise BadRequestError(f"unknown algorithm {algorithm!r} (one of: {', '.join(ALGORITHMS)})")

        def change(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT version FROM policy WHERE service = ?", (service,)).fetchone()
            current = row[0] if row else 0
            if expected_version is not None and expected_version != current:
                raise VersionConflictError(f"policy of {service!r}", expected_version, current)
            if current == 0 and db.execute("SELECT COUNT(*) FROM policy").fetchone()[0] >= MAX_SERVICES:
                raise BadRequestError(f"at most {MAX_SERVICES} services (a node's limit)")
            clash = db.execute("SELECT service FROM policy WHERE listen = ? AND service != ?",
                               (listen, service)).fetchone()
            if clash:
                raise BadRequestError(f"listen {listen} is already used by service {clash[0]!r}")
            db.execute("INSERT INTO policy (service, listen, algorithm, version) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (service) DO UPDATE SET listen = excluded.listen, "
                       "algorithm = excluded.algorithm, version = excluded.version",
                       (service, listen, algorithm, current + 1))
            for column, value in (("health", health), ("outlier", outlier), ("lifecycle", lifecycle)):
                if value is not None:
                    db.execute(f"UPDATE policy SET {column} = ? WHERE service = ?",
                               (settings_text(value), service))

        return self._mutate(change)[1]

    def _backend(self, db: sqlite3.Connection, service: str, backend_id: str) -> tuple[str, int] | None:
        row = db.execute("SELECT state, version FROM backend WHERE service = ? AND id = ?",
                         (service, backend_id)).fetchone()
        return (row[0], row[1]) if row else None

    @staticmethod
    def _record_to_write(db: sqlite3.Connection, service: str, backend_id: str,
                         expected_version: int | None) -> tuple[str, int, Drain | None]:
        """(state, version, drain) of the record a write changes, at the
        version it expects (None: any): NotFoundError or VersionConflictError."""
        row = db.execute("SELECT state, version, drain FROM backend WHERE service = ? AND id = ?",
                         (service, backend_id)).fetchone()
        if row is None:
            raise NotFoundError(f"no backend {service}/{backend_id}")
        if expected_version is not None and expected_version != row[1]:
            raise VersionConflictError(f"backend {service}/{backend_id}", expected_version, row[1])
        return row[0], row[1], drain_of(row[2])

    def add_backend(self, service: str, backend_id: str, address: str, weight: int,
                    expected_version: int | None, max_conns: int = 0) -> int:
        _check_name("backend", backend_id)
        address = _canonical_address(address)
        _check_weight(weight)
        _check_integer("max_conns", max_conns, MAX_BACKEND_CONNS)
        _check_expected(expected_version)

        def change(db: sqlite3.Connection) -> None:
            if not db.execute("SELECT 1 FROM policy WHERE service = ?", (service,)).fetchone():
                raise NotFoundError(f"no service {service!r}")
            record = self._backend(db, service, backend_id)
            if record is None and db.execute("SELECT COUNT(*) FROM backend").fetchone()[0] >= MAX_BACKENDS:
                raise BadRequestError(f"at most {MAX_BACKENDS} backends (a node's limit)")
            current = record[1] if record else 0
            if expected_version is not None and expected_version != current:
                raise VersionConflictError(f"backend {service}/{backend_id}", expected_version, current)
            if record and record[0] == Membership.ACTIVE.value:
                raise BadRequestError(f"backend {service}/{backend_id} is active; use set-weight, "
                                      "or remove it first")
            db.execute("INSERT INTO backend (service, id, address, weight, state, version, max_conns, drain) "
                       "VALUES (?, ?, ?, ?, 'active', ?, ?, '') ON CONFLICT (service, id) DO UPDATE SET "
                       "address = excluded.address, weight = excluded.weight, state = 'active', "
                       "version = excluded.version, max_conns = excluded.max_conns, drain = ''",
                       (service, backend_id, address, weight, current + 1, max_conns))

        return self._mutate(change)[1]

    def set_membership(self, service: str, backend_id: str, state: Membership,
                       expected_version: int | None) -> int:
        """Any allowed transition; draining is a drain (drain_backend, the
        service's timeout). A running drain that this ends says so: ended
        by the state it led to (removed at once, say); back to active, it
        is gone."""
        _check_expected(expected_version)
        state = Membership(state)
        if state is Membership.DRAINING:
            return self.drain_backend(service, backend_id, None, None, expected_version)

        def change(db: sqlite3.Connection) -> None:
            current, _, drain = self._record_to_write(db, service, backend_id, expected_version)
            if state not in TRANSITIONS[Membership(current)]:
                raise BadRequestError(f"backend {service}/{backend_id} is {current}; "
                                      f"cannot become {state.value}")
            if drain is not None and not drain.ended:
                drain = None if state is Membership.ACTIVE else dataclasses.replace(drain, ended=state.value)
            db.execute("UPDATE backend SET state = ?, drain = ?, version = version + 1 "
                       "WHERE service = ? AND id = ?", (state.value, drain_text(drain), service, backend_id))

        return self._mutate(change)[1]

    def set_weight(self, service: str, backend_id: str, weight: int, expected_version: int | None) -> int:
        return self.set_backend(service, backend_id, weight, None, expected_version)

    def set_backend(self, service: str, backend_id: str, weight: int | None, max_conns: int | None,
                    expected_version: int | None) -> int:
        """A backend's settings (None: unchanged), in any state but removed."""
        if weight is None and max_conns is None:
            raise BadRequestError("nothing to set: give a weight, a max_conns or both")
        if weight is not None:
            _check_weight(weight)
        if max_conns is not None:
            _check_integer("max_conns", max_conns, MAX_BACKEND_CONNS)
        _check_expected(expected_version)

        def change(db: sqlite3.Connection) -> None:
            record = self._backend(db, service, backend_id)
            if record is None or record[0] == Membership.REMOVED.value:
                raise NotFoundError(f"no backend {service}/{backend_id}")
            if expected_version is not None and expected_version != record[1]:
                raise VersionConflictError(f"backend {service}/{backend_id}", expected_version, record[1])
            db.execute("UPDATE backend SET weight = coalesce(?, weight), max_conns = coalesce(?, max_conns), "
                       "version = version + 1 WHERE service = ? AND id = ?",
                       (weight, max_conns, service, backend_id))

        return self._mutate(change)[1]

    def drain_backend(self, service: str, backend_id: str, timeout_ms: int | None, then: str | None,
                      expected_version: int | None) -> int:
        """Start a drain of an active backend: ``timeout_ms`` None is the
        service's drain_timeout_ms, ``then`` None is keep. Of a backend
        draining already, what is given replaces what it had (a drain made
        a removal, a timeout moved); the same again changes nothing."""
        if timeout_ms is not None:
            _check_integer("timeout_ms", timeout_ms, MAX_MS)
        if then is not None and then not in DRAIN_THEN:
            raise BadRequestError(f"then must be one of {', '.join(DRAIN_THEN)} (got {then!r})")
        _check_expected(expected_version)

        def change(db: sqlite3.Connection) -> bool:
            state, _, drain = self._record_to_write(db, service, backend_id, expected_version)
            if state == Membership.DRAINING.value and drain is not None:
                new = dataclasses.replace(drain, then=then or drain.then,
                                          timeout_ms=drain.timeout_ms if timeout_ms is None else timeout_ms)
                if new == drain:
                    return False
            elif state != Membership.ACTIVE.value:
                raise BadRequestError(f"backend {service}/{backend_id} is {state}: only an active backend "
                                      "can be drained")
            else:
                timeout = timeout_ms
                if timeout is None:
                    policy = db.execute("SELECT lifecycle, algorithm FROM policy WHERE service = ?",
                                        (service,)).fetchone()
                    timeout = lifecycle_of(*policy).drain_timeout_ms
                # the version this write makes (_mutate adds one): nodes confirm from there
                made = db.execute("SELECT value FROM meta WHERE key = 'config_version'").fetchone()[0] + 1
                new = Drain(time.time(), made, timeout, then or "keep")
            db.execute("UPDATE backend SET state = 'draining', drain = ?, version = version + 1 "
                       "WHERE service = ? AND id = ?", (drain_text(new), service, backend_id))
            return True

        return self._mutate(change)[1]

    def set_drain(self, service: str, backend_id: str, drain: Drain, state: Membership,
                  expected_version: int) -> int:
        """The drain's progress (closing, its end) and the state it leads
        to, on the record at ``expected_version`` (the drain's watcher read
        it: an operator's change meanwhile wins, and is read again)."""

        def change(db: sqlite3.Connection) -> None:
            current, _, _ = self._record_to_write(db, service, backend_id, expected_version)
            if state.value != current and state not in TRANSITIONS[Membership(current)]:
                raise BadRequestError(f"backend {service}/{backend_id} is {current}; "
                                      f"cannot become {state.value}")
            db.execute("UPDATE backend SET state = ?, drain = ?, version = version + 1 "
                       "WHERE service = ? AND id = ?", (state.value, drain_text(drain), service, backend_id))

        return self._mutate(change)[1]

    def record_health(self, backend_id: str, up: bool, revision: int | None,
                      source: str = "report") -> tuple[bool, int]:
        """(applied, config version). An observation not newer than the
        stored one is ignored and the version does not move (I4).
        ``revision`` None: the stored one + 1 (the health checks' verdict,
        whose writes are in order by construction). ``source``: who
        observed it (HEALTH_SOURCES)."""
        _check_name("backend", backend_id)
        if revision is not None and (isinstance(revision, bool) or not isinstance(revision, int)
                                     or not 0 <= revision < MAX_INTEGER):
            raise BadRequestError(f"revision must be an integer 0..2**62 (got {revision!r})")
        if source not in HEALTH_SOURCES:
            raise BadRequestError(f"source must be one of {', '.join(HEALTH_SOURCES)} (got {source!r})")
        if not isinstance(up, bool):
            raise BadRequestError(f"up must be a boolean (got {up!r})")

        def change(db: sqlite3.Connection) -> bool:
            if not db.execute("SELECT 1 FROM backend WHERE id = ? LIMIT 1", (backend_id,)).fetchone():
                raise NotFoundError(f"no backend {backend_id!r} in any service")
            row = db.execute("SELECT revision FROM health WHERE backend_id = ?", (backend_id,)).fetchone()
            new = (row[0] + 1 if row else 1) if revision is None else revision
            if row and row[0] >= new:
                return False
            db.execute("INSERT INTO health (backend_id, up, revision, source, since) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT (backend_id) DO UPDATE SET up = excluded.up, "
                       "revision = excluded.revision, source = excluded.source, since = excluded.since",
                       (backend_id, int(up), new, source, time.time()))
            return True

        return self._mutate(change)

    def seed(self, services: Sequence[Service]) -> bool:
        """Write ``services`` (a config file's, already validated) into an
        empty store as one transaction and one version: a crash half-way
        leaves the store empty, to be seeded again. False if not empty."""
        limits = (len(services) <= MAX_SERVICES, sum(len(s.backends) for s in services) <= MAX_BACKENDS)
        if not all(limits):
            raise BadRequestError(f"at most {MAX_SERVICES} services and {MAX_BACKENDS} backends")

        def change(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT value FROM meta WHERE key = 'config_version'").fetchone()[0] != 0:
                return False
            db.executemany(f"INSERT INTO policy ({POLICY_COLUMNS}) VALUES (?, ?, ?, 1, ?, ?, ?)",
                           [(s.name, _canonical_address(s.listen), s.algorithm, settings_text(s.health),
                             settings_text(s.outlier), settings_text(s.lifecycle)) for s in services])
            db.executemany("INSERT INTO backend (service, id, address, weight, state, version, max_conns) "
                           "VALUES (?, ?, ?, ?, 'active', 1, ?)",
                           [(s.name, b.id, _canonical_address(b.address), b.weight, b.max_conns)
                            for s in services for b in s.backends])
            return True

        try:
            return self._mutate(change)[0]
        except sqlite3.Error as exc:  # at start: the file opened, but cannot be written
            raise StoreError(f"{self.path}: {_why(exc)}") from None

    def advance_version(self) -> int:
        """A new version that changes nothing: how the control plane
        republishes a routing it had to correct (see Deriver.audit)."""
        return self._mutate(lambda db: None)[1]

    def new_epoch(self) -> int:
        """Give the store a new identity: its versions no longer compare with
        those published before. For a store found behind what its nodes
        applied (a restored copy): nodes re-base on its next snapshot."""

        def change(db: sqlite3.Connection) -> None:
            db.execute("UPDATE meta SET value = abs(random() % 4611686018427387903) + 1 WHERE key = 'epoch'")

        self._mutate(change)
        return self.read().epoch
