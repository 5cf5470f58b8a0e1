"""A routing snapshot held for change: the control plane derives one per
version, a node applies one per version, and either costs what the version
changed rather than the size of the pool.

``Routing`` is immutable once built and shares every unchanged service with
the version before it. ``apply(delta)`` checks the delta against it, row by
row with the config file's own rules, and returns the next version: the
control plane runs that same step on what it derived before publishing, so
what it checks is what every node will compute. A node takes a delta that
only rewrites rows with ``with_rows``, which accepts and refuses exactly as
``apply`` does but builds the services only when they are read (the
periodic digest, a delta that does more). ``encode()`` gives exactly
the canonical snapshot bytes (lbcore.wire: ``canonical_json`` of the
document), assembled from the canonical JSON of each backend, kept since
it last changed.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from lbcore.config import (
    BACKEND_SETTINGS,
    DEFAULT_HEALTH,
    DEFAULT_LIFECYCLE,
    DEFAULT_OUTLIER,
    LIFECYCLE_KEYS,
    MAX_BACKENDS,
    MAX_SERVICES,
    SERVICE_SETTINGS,
    Backend,
    ConfigError,
    HealthCheck,
    Lifecycle,
    Outlier,
    Service,
    changed_settings,
    parse_address,
    read_health,
    read_lifecycle,
    read_outlier,
    read_table,
)
from lbcore.wire import Delta, WireError, backend_row, canonical_json, snapshot_digest

# Rows a thin Routing (with_rows) holds over its root before the next delta
# builds it whole: a bound on what a digest or a larger delta has to build.
OVERLAY_ROWS = 256

# What json.dumps writes unchanged between quotes: ids (NAME_PATTERN) and
# canonical IPv4 addresses always are; anything else goes through json.
_PLAIN = re.compile(r"[A-Za-z0-9_.:-]*")


def _quote(text: str) -> bytes:
    return f'"{text}"'.encode() if _PLAIN.fullmatch(text) else json.dumps(text).encode()


def backend_json(b: Backend) -> bytes:
    """One backend as canonical_json writes it (sorted keys, no spaces);
    ``max_conns`` only when set, ``state`` only when not active (a
    draining backend), ``up`` only when false (held out by its health
    verdict)."""
    head = b'{"address":%s,"id":%s' % (_quote(b.address), _quote(b.id))
    if b.max_conns:
        head += b',"max_conns":%d' % b.max_conns
    if b.state != "active":
        head += b',"state":%s' % _quote(b.state)
    if not b.up:
        head += b',"up":false'
    return head + b',"weight":%d}' % b.weight


def settings_json(key: bytes, value: HealthCheck | Outlier) -> bytes:
    """A service's health or outlier table as the snapshot writes it: the
    settings that differ from their defaults, none at all when none do."""
    changed = changed_settings(value)
    return b',"%s":%s' % (key, canonical_json(changed)) if changed else b""


def lifecycle_items(value: Lifecycle) -> dict[bytes, bytes]:
    """A service's lifecycle keys as the snapshot writes them (in the
    service itself, as in a config file): those that differ from the
    defaults, each key with its canonical value."""
    return {b'"%s"' % k.encode(): canonical_json(v) for k, v in changed_settings(value).items()}


class ServiceRoutes:
    """One service of a routing snapshot: backends in id order, each with
    its canonical JSON. Never changed once built.

    ``keys`` (the ids in order) is the very object of the version before
    when a delta changed no id, and ``changed`` names the ids whose row the
    delta rewrote (built from a thin routing: every row rewritten since its
    root, more than the last delta's, which only makes a node patch rows
    that are right already): what lets a node patch its tables without
    comparing the whole pool."""

    __slots__ = ("name", "listen", "algorithm", "backends", "pieces", "pieces_size", "service", "keys",
                 "changed", "health", "outlier", "lifecycle", "_json")

    def __init__(self, name: str, listen: str, algorithm: str, backends: dict[str, Backend],
                 pieces: dict[str, bytes], keys: tuple[str, ...] | None = None,
                 changed: frozenset[str] = frozenset(), pieces_size: int | None = None,
                 health: HealthCheck = DEFAULT_HEALTH, outlier: Outlier = DEFAULT_OUTLIER,
                 lifecycle: Lifecycle = DEFAULT_LIFECYCLE) -> None:
        self.name, self.listen, self.algorithm = name, listen, algorithm
        self.health, self.outlier, self.lifecycle = health, outlier, lifecycle
        self.backends, self.pieces = backends, pieces
        # the bytes of all pieces: kept up to date by each delta, so that the
        # size of the snapshot is known without encoding it
        self.pieces_size = sum(map(len, pieces.values())) if pieces_size is None else pieces_size
        self.service = Service(name, listen, algorithm, tuple(backends.values()), health, outlier, lifecycle)
        self.keys = keys if keys is not None else tuple(backends)
        self.changed = changed
        self._json: bytes | None = None

    @classmethod
    def of(cls, service: Service) -> ServiceRoutes:
        ordered = sorted(service.backends, key=lambda b: b.id)
        return cls(service.name, service.listen, service.algorithm, {b.id: b for b in ordered},
                   {b.id: backend_json(b) for b in ordered}, health=service.health, outlier=service.outlier,
                   lifecycle=service.lifecycle)

    def _frame(self) -> tuple[bytes, bytes]:
        """What encode() puts before and after the pieces: every key but
        "algorithm" sorts after "backends"."""
        items = {b'"listen"': _quote(self.listen), b'"name"': _quote(self.name),
                 **lifecycle_items(self.lifecycle)}
        for key, value in ((b"health", self.health), (b"outlier", self.outlier)):
            if changed_settings(value):
                items[b'"%s"' % key] = canonical_json(changed_settings(value))
        tail = b"".join(b",%s:%s" % (k, items[k]) for k in sorted(items))
        return (b'{"algorithm":' + _quote(self.algorithm) + b',"backends":[', b"]" + tail + b"}")

    def encode(self) -> bytes:
        if self._json is None:
            head, tail = self._frame()
            self._json = b"".join((head, b",".join(self.pieces.values()), tail))
        return self._json

    def encoded_size(self) -> int:
        """len(encode()), without encoding."""
        if self._json is not None:
            return len(self._json)
        head, tail = self._frame()
        return len(head) + self.pieces_size + max(0, len(self.pieces) - 1) + len(tail)


class Routing:
    """A routing snapshot: its epoch (the store it was derived from), its
    version and its services in name order; ``base`` is the version one
    delta made it from (-2: built whole).

    One made by ``with_rows`` is thin until something reads its services:
    a root (built) and the backend rows rewritten since, checked already."""

    __slots__ = ("version", "base", "epoch", "_services", "_root", "_overlay", "_rewritten", "_encoded",
                 "_digest", "_tuple", "__weakref__")

    def __init__(self, version: int, services: Mapping[str, ServiceRoutes], base: int = -2,
                 epoch: int = 0) -> None:
        self.version, self.base, self.epoch = version, base, epoch
        self._services: dict[str, ServiceRoutes] | None = dict(sorted(services.items()))
        self._root: Routing | None = None
        self._overlay: dict[str, dict[str, Backend]] = {}  # thin: service -> id -> row, since the root
        self._rewritten: dict[str, frozenset[str]] = {}  # thin: the ids the last delta rewrote
        self._encoded: bytes | None = None
        self._digest: str | None = None
        self._tuple: tuple[Service, ...] | None = None

    @classmethod
    def of(cls, version: int, services: Iterable[Service], epoch: int = 0) -> Routing:
        return cls(version, {s.name: ServiceRoutes.of(s) for s in services}, epoch=epoch)

    @property
    def services(self) -> dict[str, ServiceRoutes]:
        services = self._services
        if services is None:  # thin: built now, from the root and the rows checked already
            assert self._root is not None
            rows = [backend_row(name, b) for name, changed in self._overlay.items() for b in changed.values()]
            services = self._services = self._root.apply(Delta(self.version, self._root.version,
                                                                backends=rows, epoch=self.epoch)).services
            # built, it is the root of the next ones: holding its own root
            # would keep every version built since the last full one
            self._root, self._overlay = None, {}
        return services

    def with_rows(self, delta: Delta) -> Routing | None:
        """What ``apply`` gives, when ``delta`` only rewrites backend rows
        this routing has (a weight or an address: the common update), but
        thin: the rows are checked now, by the same rules and with the same
        messages as ``apply``; the services are built when something reads
        them (a digest, a delta that does more), at most OVERLAY_ROWS rows
        later. None when the delta does more: then ``apply``."""
        if delta.base != self.version or delta.epoch != self.epoch or delta.services \
                or delta.removed_services or delta.removed_backends or len(delta.backends) > OVERLAY_ROWS:
            return None
        root = self if self._services is not None else self._root
        assert root is not None
        held = root.services  # along thin routings the ids are the root's
        last: dict[str, dict[str, Backend]] = {}
        for i, row in enumerate(delta.backends):
            if not isinstance(row, dict):
                return None
            name, backend_id = row.get("service"), row.get("id")
            if type(name) is not str or type(backend_id) is not str or name not in held \
                    or backend_id not in held[name].backends:
                return None  # an id that comes, or a row apply refuses and says why
            last.setdefault(name, {})[backend_id] = _backend_row(f"backends[{i}]", row)
        overlay = {} if root is self else dict(self._overlay)
        for name, rows in last.items():
            overlay[name] = {**overlay.get(name, {}), **rows}
        if sum(map(len, overlay.values())) > OVERLAY_ROWS:
            return None
        thin = Routing(delta.version, {}, base=self.version, epoch=self.epoch)
        thin._services, thin._root, thin._overlay = None, root, overlay
        thin._rewritten = {name: frozenset(rows) for name, rows in last.items()}
        return thin

    def rewritten_rows(self, held: Routing) -> dict[str, frozenset[str]] | None:
        """The ids, per service, of the only rows that differ from ``held``
        when this routing is still thin and is ``held`` after one
        ``with_rows``; else None (then compare: see rows_changed)."""
        root = self._root
        if root is None or self.base != held.version or self.epoch != held.epoch \
                or (held is not root and held._root is not root):
            return None
        return self._rewritten

    def backend(self, service: str, backend_id: str) -> Backend:
        """One row, without building a thin routing."""
        if self._services is None:
            assert self._root is not None
            row = self._overlay.get(service, {}).get(backend_id)
            return row if row is not None else self._root.services[service].backends[backend_id]
        return self._services[service].backends[backend_id]

    def as_services(self) -> tuple[Service, ...]:
        if self._tuple is None:
            self._tuple = tuple(s.service for s in self.services.values())
        return self._tuple

    def encode(self) -> bytes:
        """The canonical snapshot: canonical_json of the snapshot document."""
        if self._encoded is None:
            self._encoded = b'{"epoch":%d,"services":[%s],"version":%d}' % (
                self.epoch, b",".join(s.encode() for s in self.services.values()), self.version)
        return self._encoded

    def encoded_size(self) -> int:
        """len(encode()), at the cost of what changed since the version before."""
        if self._encoded is not None:
            return len(self._encoded)
        services = self.services.values()
        return len(b'{"epoch":%d,"services":[],"version":%d}' % (self.epoch, self.version)) \
            + max(0, len(services) - 1) + \
            sum(s.encoded_size() for s in services)

    def digest(self) -> str:
        """What a node reports of what it applied (see wire.snapshot_digest)."""
        if self._digest is None:
            self._digest = snapshot_digest(self.encode())
        return self._digest

    def apply(self, delta: Delta) -> Routing:
        """The version ``delta`` leads to from this one, or WireError saying
        which row does not fit (nothing is changed either way)."""
        if delta.epoch != self.epoch:
            raise WireError(f"delta: epoch {delta.epoch} is not the epoch held ({self.epoch})")
        if delta.base != self.version:
            raise WireError(f"delta: base {delta.base} is not the version held ({self.version})")
        services = dict(self.services)
        edits: dict[str, _Edit] = {}

        def edit(name: Any, where: str) -> _Edit:
            if not isinstance(name, str) or name not in services and name not in edits:
                raise WireError(f"delta: {where}.service: no service {name!r}")
            if name not in edits:
                edits[name] = _Edit.of(services[name])
            return edits[name]

        for i, name in enumerate(delta.removed_services):
            if not isinstance(name, str) or name not in services:
                raise WireError(f"delta: removed_services[{i}]: no service {name!r}")
            del services[name]
        for i, row in enumerate(delta.services):
            values, health, outlier, lifecycle = _service_row(f"services[{i}]", row)
            name = values["name"]
            current = edits.get(name) or (_Edit.of(services[name]) if name in services else _Edit.empty())
            current.listen, current.algorithm = values["listen"], values["algorithm"]
            current.health, current.outlier, current.lifecycle = health, outlier, lifecycle
            edits[name] = current
        for i, row in enumerate(delta.removed_backends):
            if not isinstance(row, dict) or set(row) != {"service", "id"} or not isinstance(row["id"], str):
                raise WireError(f"delta: removed_backends[{i}]: must be {{service, id}}, strings")
            target = edit(row["service"], f"removed_backends[{i}]")
            if target.backends.pop(row["id"], None) is None:
                raise WireError(f"delta: removed_backends[{i}]: no backend {row['service']}/{row['id']}")
            target.pieces_size -= len(target.pieces.pop(row["id"]))
            target.keys = None
        for i, row in enumerate(delta.backends):
            if not isinstance(row, dict):
                raise WireError(f"delta: backends[{i}]: must be an object")
            target = edit(row.get("service"), f"backends[{i}]")
            backend = _backend_row(f"backends[{i}]", row)
            target.reorder |= backend.id not in target.backends
            target.changed.add(backend.id)
            target.backends[backend.id] = backend
            piece = backend_json(backend)
            target.pieces_size += len(piece) - len(target.pieces.get(backend.id, b""))
            target.pieces[backend.id] = piece
        for name, target in edits.items():
            services[name] = target.build(name)
        _check_fits(services, listens_changed=bool(delta.services))
        return Routing(delta.version, services, base=self.version, epoch=self.epoch)


def rows_changed(held: Routing, routing: Routing) -> dict[str, frozenset[str]] | None:
    """Per service, the ids of the backend rows ``routing`` rewrote from
    ``held`` (or more: see ServiceRoutes.changed), when one delta made it
    from ``held`` and no id came or went; else None (then whoever builds
    from it compares for itself). For a thin routing not yet built,
    ``routing.rewritten_rows(held)`` answers without building it."""
    if routing.base != held.version or routing.epoch != held.epoch \
            or routing.services.keys() != held.services.keys():
        return None
    changed = {}
    for name, service in routing.services.items():
        before = held.services[name]
        if service.keys is not before.keys:
            return None
        changed[name] = frozenset() if service is before else service.changed
    return changed


class _Edit:
    """A service being changed by a delta: copies, never the shared dicts."""

    def __init__(self, listen: str, algorithm: str, backends: dict[str, Backend],
                 pieces: dict[str, bytes], keys: tuple[str, ...] | None, pieces_size: int,
                 health: HealthCheck = DEFAULT_HEALTH, outlier: Outlier = DEFAULT_OUTLIER,
                 lifecycle: Lifecycle = DEFAULT_LIFECYCLE) -> None:
        self.listen, self.algorithm, self.backends, self.pieces = listen, algorithm, backends, pieces
        self.health, self.outlier, self.lifecycle = health, outlier, lifecycle
        self.pieces_size = pieces_size
        self.keys = keys  # None once an id comes or goes
        self.changed: set[str] = set()
        self.reorder = False

    @classmethod
    def of(cls, service: ServiceRoutes) -> _Edit:
        return cls(service.listen, service.algorithm, dict(service.backends), dict(service.pieces),
                   service.keys, service.pieces_size, service.health, service.outlier, service.lifecycle)

    @classmethod
    def empty(cls) -> _Edit:
        return cls("", "", {}, {}, None, 0)

    def build(self, name: str) -> ServiceRoutes:
        if self.reorder:
            self.backends = dict(sorted(self.backends.items()))
            self.pieces = {i: self.pieces[i] for i in self.backends}
        keys = None if self.reorder else self.keys
        return ServiceRoutes(name, self.listen, self.algorithm, self.backends, self.pieces, keys,
                             frozenset(self.changed), self.pieces_size, self.health, self.outlier,
                             self.lifecycle)


_SETTING = {s.name: s for s in BACKEND_SETTINGS}
_ID, _ADDRESS, _WEIGHT = _SETTING["id"], _SETTING["address"], _SETTING["weight"]
# the usual rows of a delta: the required keys, with "up" (false) or not
_USUAL_KEYS = (frozenset({"service", "id", "address", "weight"}),
               frozenset({"service", "id", "address", "weight", "up"}))
_OPTIONAL = {"up": True, "max_conns": 0, "state": "active"}  # may be left out: their defaults


def _backend_row(where: str, row: dict[str, Any]) -> Backend:
    """A delta's backend row, checked by the config file's rules: the usual
    row in line (a delta may carry thousands), anything else through
    read_table, which says what is wrong (and accepts no less)."""
    backend_id, address, weight = row.get("id"), row.get("address"), row.get("weight")
    up = row.get("up", True)
    keys = row.keys()
    if (keys == _USUAL_KEYS[0] or keys == _USUAL_KEYS[1]) and type(backend_id) is str \
            and type(address) is str and type(weight) is int and type(up) is bool and not (
                _ID.check(backend_id) or _ADDRESS.check(address) or _WEIGHT.check(weight)):
        return Backend(backend_id, address, weight, up)
    return Backend(**_read_row(where, {**_OPTIONAL, **{k: v for k, v in row.items() if k != "service"}},
                               BACKEND_SETTINGS, optional=", ".join(_OPTIONAL)))


def _service_row(where: str, row: Any) -> tuple[dict[str, Any], HealthCheck, Outlier, Lifecycle]:
    """A delta's service row: its settings, health and outlier tables and
    lifecycle keys (the changed settings only; absent: the defaults),
    checked by the config file's rules."""
    extra = LIFECYCLE_KEYS | {"health", "outlier"}
    plain = {k: v for k, v in row.items() if k not in extra} if isinstance(row, dict) else row
    values = _read_row(where, plain, SERVICE_SETTINGS, optional="health, outlier, the lifecycle keys")
    try:
        return (values, read_health("delta", f"{where}.health", row.get("health", {})),
                read_outlier("delta", f"{where}.outlier", row.get("outlier", {})),
                read_lifecycle("delta", where, row, values["algorithm"]))
    except ConfigError as exc:
        raise WireError(f"delta: {exc.key}: {exc.reason}") from None


def _read_row(where: str, row: Any, settings: list[Any], optional: str = "") -> dict[str, Any]:
    """One row checked by the rules a config file's row meets, all present
    (besides those ``optional`` names, which have their defaults)."""
    if not isinstance(row, dict) or set(row) != {s.name for s in settings}:
        also = f" ({optional} optional)" if optional else ""
        raise WireError(f"delta: {where}: must have exactly {', '.join(s.name for s in settings)}{also}")
    try:
        return read_table("delta", where, row, settings)
    except ConfigError as exc:
        raise WireError(f"delta: {exc.key}: {exc.reason}") from None


def _check_fits(services: Mapping[str, ServiceRoutes], listens_changed: bool) -> None:
    """What a node can hold: the limits, and one service per listen address."""
    if len(services) > MAX_SERVICES:
        raise WireError(f"delta: more than {MAX_SERVICES} services")
    if sum(len(s.backends) for s in services.values()) > MAX_BACKENDS:
        raise WireError(f"delta: more than {MAX_BACKENDS} backends")
    if listens_changed:
        seen: dict[tuple[str, int], str] = {}
        for s in services.values():
            other = seen.setdefault(parse_address(s.listen), s.name)
            if other != s.name:
                raise WireError(f"delta: services {other!r} and {s.name!r} both listen on {s.listen}")
