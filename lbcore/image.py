"""The image: a routing snapshot laid out in shared memory as the workers
read it (fixed-layout tables, fulcrum_layout.h). Build one from services,
publish it without tearing, read it back.

"Snapshot" is the versioned routing document on the wire (lbcore.wire,
lbcore.routing); an image holds one version of it, localized to this node
with its slots. An image is immutable once built; the same services, slots
and version always give the same tables, so any published image can be
rebuilt and compared. Publishing writes the buffer that is not current
under its seqlock, then stores the new generation.
"""
from __future__ import annotations

import dataclasses
import functools
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lbcore import layout
from lbcore._layout import ffi, lib
from lbcore.balance import ALGORITHMS
from lbcore.balance.maglev import build_table as build_maglev_table
from lbcore.balance.wrr import schedule_of_rows
from lbcore.config import RELAY_MODES, Backend, Config, ConfigError, Service, parse_address
from lbcore.layout import DRAIN_OF_STATE
from lbcore.segment import Segment
from lbcore.slots import SlotMap

DRAIN_ACTIVE, DRAIN_CLOSING = DRAIN_OF_STATE["active"], DRAIN_OF_STATE["closing"]


class ImageError(Exception):
    """An image that cannot be built or read; the message says why."""

    def __init__(self, message: str, service_index: int | None = None) -> None:
        super().__init__(message)
        self.service_index = service_index


@dataclass(frozen=True)
class Limits:
    """The node-wide settings an image header carries for the workers."""

    connect_timeout_ms: int
    idle_timeout_ms: int
    retries: int
    relay_mode: int = 0
    fin_timeout_ms: int = 30_000
    source_ip: int = 0  # node.address as the C side reads it (network order); 0: none


@dataclass(frozen=True)
class Image:
    version: int
    limits: Limits
    services: np.ndarray   # n_services, SERVICE (indexed by service slot)
    backends: np.ndarray   # n_backends, BACKEND
    table: np.ndarray      # table_used, uint32
    # per service, for building the next image (not part of the tables)
    parts: Mapping[str, ServiceTables] = dataclasses.field(default_factory=dict, compare=False)
    published_ns: int = dataclasses.field(default=0, compare=False)  # when read back: the node's stamp

    @property
    def checksum(self) -> int:
        return image_checksum(self.services, self.backends, self.table)


def copy_rows(rows: np.ndarray) -> np.ndarray:
    """A copy of structured rows, as bytes: numpy copies a structured dtype
    field by field (ten times slower for backend rows)."""
    return rows.view(np.uint8).copy().view(rows.dtype)


def image_checksum(services: np.ndarray, backends: np.ndarray, table: np.ndarray) -> int:
    """CRC-32C of the tables as the header holds it (fulcrum_publish.h)."""
    return int(lib.flc_image_checksum(
        ffi.from_buffer("flc_service[]", np.ascontiguousarray(services)), len(services),
        ffi.from_buffer("flc_backend[]", np.ascontiguousarray(backends)), len(backends),
        ffi.from_buffer("uint32_t[]", np.ascontiguousarray(table)), len(table)))


def source_ip_of(address: str) -> int:
    """node.address ("" or an IPv4 address) as the header's source_ip."""
    return int.from_bytes(socket.inet_aton(address), "little") if address else 0


@functools.lru_cache(maxsize=1 << 10)
def _ip_port(address: str) -> tuple[int, int]:
    """The address as the C side reads it: a uint32 in network byte order
    (on this little-endian layout, the address bytes read little-endian)."""
    host, port = parse_address(address)
    return int.from_bytes(socket.inet_aton(host), "little"), port


@dataclass(frozen=True)
class ServiceTables:
    """One service's part of an image, its tables counted from the
    service's first row: the node keeps them, so that the next image
    rebuilds only the services that changed, and of those only what changed."""

    backends: tuple[Backend, ...]  # a row's values may be older than ``rows`` (see patched_tables)
    algorithm: str
    slot: int
    rows: np.ndarray       # BACKEND, in the order of ``backends``
    schedule: np.ndarray   # uint32 row positions within the service (WRR, P2C)
    maglev: np.ndarray     # uint32 row positions within the service
    index: Mapping[str, int]  # backend id -> its row within the service
    eligible_count: int
    closing_count: int = 0  # rows whose drain timed out: the workers reset their connections


def _service_rows(name: str, backends: Sequence[Backend], slot: int, backend_slots: SlotMap) -> np.ndarray:
    """Backend rows filled a column at a time (a 10,000 backend service
    takes milliseconds, not a Python loop over rows)."""
    rows = np.zeros(len(backends), dtype=layout.BACKEND)
    if not backends:
        return rows
    hosts, ports = zip(*[parse_address(b.address) for b in backends], strict=True)
    rows["id"] = [b.id.encode() for b in backends]
    rows["ip"] = np.frombuffer(b"".join(map(socket.inet_aton, hosts)), dtype="<u4")
    rows["port"] = ports
    rows["weight"] = [b.weight for b in backends]
    slot_of = backend_slots.slot_of
    rows["slot"] = [slot_of((name, b.id)) for b in backends]
    rows["service_slot"] = slot
    drain = DRAIN_OF_STATE
    rows["drain"] = [drain[b.state] for b in backends]
    rows["max_conns"] = [b.max_conns for b in backends]
    rows["eligible"] = (rows["weight"] > 0) & np.array([b.up for b in backends], dtype=bool) \
        & (rows["drain"] == DRAIN_ACTIVE)
    return rows


def _patch_row(rows: np.ndarray, i: int, backend: Backend) -> None:
    """Row ``i`` becomes ``backend`` (same id, so same slot)."""
    host, port = parse_address(backend.address)
    rows["ip"][i] = int.from_bytes(socket.inet_aton(host), "little")
    rows["port"][i] = port
    rows["weight"][i] = backend.weight
    rows["drain"][i] = DRAIN_OF_STATE[backend.state]
    rows["max_conns"][i] = backend.max_conns
    rows["eligible"][i] = backend.weight > 0 and backend.up and backend.state == "active"


def _with_tables(service: Service, slot: int, rows: np.ndarray,
                 index: Mapping[str, int] | None = None) -> ServiceTables:
    if index is None:
        index = {b.id: i for i, b in enumerate(service.backends)}
    return _tables(service.backends, service.algorithm, slot, rows, index)


def _tables(backends: tuple[Backend, ...], algorithm: str, slot: int, rows: np.ndarray,
            index: Mapping[str, int]) -> ServiceTables:
    schedule, eligible_count = schedule_of_rows(rows)
    maglev = np.empty(0, dtype=np.uint32)
    if algorithm == "maglev" and eligible_count:
        eligible = rows["eligible"] == 1
        ids = [i.decode() for i in rows["id"][eligible]]
        maglev = build_maglev_table(ids, rows["weight"][eligible],
                                    np.flatnonzero(eligible).astype(np.uint32), layout.MAGLEV_SIZE)
    for shared in (rows, schedule, maglev):  # reused by later images: never written again
        shared.flags.writeable = False
    closing = int(np.count_nonzero(rows["drain"] == DRAIN_CLOSING))
    return ServiceTables(backends, algorithm, slot, rows, schedule, maglev, index, eligible_count, closing)


def patched_tables(tables: ServiceTables, rows: Mapping[str, Backend]) -> ServiceTables:
    """``tables`` with the rows of ``rows`` (ids it has) rewritten: what a
    delta that changed only those rows leads to, without the service's
    other rows as objects. ``backends`` is kept as it was: ids and order are
    still exact, and the old object of a rewritten row only makes the next
    build from a Service (service_tables) patch that row again."""
    patched = copy_rows(tables.rows)
    for backend_id, backend in rows.items():
        _patch_row(patched, tables.index[backend_id], backend)
    return _tables(tables.backends, tables.algorithm, tables.slot, patched, tables.index)


def service_tables(service: Service, slot: int, backend_slots: SlotMap, previous: ServiceTables | None = None,
                   changed: frozenset[str] | None = None) -> ServiceTables:
    """The tables of ``service``, reusing ``previous`` (its tables in the
    image before): rows of backends that are still there are kept (a
    backend keeps its slot), changed ones patched, only new ones built.
    ``changed``, when known, names the only rows that differ (same ids in
    the same order): then nothing else is compared."""
    new = service.backends
    if previous is None or previous.slot != slot:
        return _with_tables(service, slot, _service_rows(service.name, new, slot, backend_slots))
    old = previous.backends
    if old is new and previous.algorithm == service.algorithm:
        return previous
    # Rows are compared by identity (``is``), never by value: a row patched
    # in by patched_tables keeps its old object in ``old``, which must count
    # as changed (equal by value it would not be patched again).
    if changed is not None and len(old) == len(new):
        rows = copy_rows(previous.rows)
        for backend_id in changed:
            i = previous.index[backend_id]
            _patch_row(rows, i, new[i])
        return _with_tables(service, slot, rows, previous.index)
    if len(old) == len(new):
        differing = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a is not b]
        if all(old[i].id == new[i].id for i in differing):  # the common update: a weight or an address
            if not differing and previous.algorithm == service.algorithm:
                return dataclasses.replace(previous, backends=new)
            rows = copy_rows(previous.rows)
            for i in differing:
                _patch_row(rows, i, new[i])
            return _with_tables(service, slot, rows, previous.index)
    # backends came or went: keep the rows of those still here
    where = previous.index
    take = np.fromiter((where.get(b.id, -1) for b in new), dtype=np.int64, count=len(new))
    rows = previous.rows[np.maximum(take, 0)] if len(old) else np.zeros(len(new), dtype=layout.BACKEND)
    fresh = np.flatnonzero(take < 0)
    if fresh.size:
        rows[fresh] = _service_rows(service.name, [new[i] for i in fresh.tolist()], slot, backend_slots)
    for i in np.flatnonzero(take >= 0).tolist():
        if old[take[i]] is not new[i]:
            _patch_row(rows, i, new[i])
    return _with_tables(service, slot, rows)


def build_image(services: Iterable[Service], limits: Limits, version: int,
                   service_slots: SlotMap, backend_slots: SlotMap,
                   previous: Mapping[str, ServiceTables] | None = None,
                   changed: Mapping[str, frozenset[str]] | None = None) -> Image:
    """The image of ``services``. Slots must already be assigned;
    ``previous`` (the ``parts`` of the image before) is reused where it
    can be; ``changed`` names, per service, the only rows that changed since."""
    services = list(services)
    previous = previous or {}
    n_services = max((service_slots.slot_of(s.name) for s in services), default=-1) + 1
    service_rows = np.zeros(n_services, dtype=layout.SERVICE)
    parts: dict[str, ServiceTables] = {}
    backend_parts: list[np.ndarray] = []
    table_parts: list[np.ndarray] = []
    next_row = table_used = 0
    for index, service in enumerate(services):
        slot = service_slots.slot_of(service.name)
        tables = parts[service.name] = service_tables(service, slot, backend_slots,
                                                      previous.get(service.name),
                                                      changed.get(service.name) if changed else None)
        schedule_offset, maglev_offset = table_used, table_used + len(tables.schedule)
        table_used = maglev_offset + len(tables.maglev)
        if table_used > layout.TABLE_POOL:
            raise ImageError(f"its tables take the node past {layout.TABLE_POOL} entries "
                                f"(each maglev service takes {layout.MAGLEV_SIZE}, each service the sum "
                                "of its weights): lower the weights or use fewer maglev services", index)
        ip, port = _ip_port(service.listen)
        n_rows = len(tables.rows)
        outlier, lifecycle = service.outlier, service.lifecycle
        service_rows[slot] = (
            service.name.encode(), ip, port, ALGORITHMS[service.algorithm], 1,
            next_row, n_rows, schedule_offset, len(tables.schedule), maglev_offset, len(tables.maglev),
            tables.eligible_count, outlier.consecutive_failures, outlier.base_ejection_ms,
            outlier.max_ejection_ms, outlier.max_ejection_percent,
            lifecycle.slow_start_ms, lifecycle.slow_start_min_weight_percent * 10, lifecycle.max_queue,
            1.0 / lifecycle.slow_start_aggression, lifecycle.queue_timeout_ms, tables.closing_count,
        )
        backend_parts.append(tables.rows)
        table_parts.extend((_shifted(tables.schedule, next_row), _shifted(tables.maglev, next_row)))
        next_row += n_rows
    return Image(version, limits, service_rows, _joined(backend_parts, layout.BACKEND),
                         _joined(table_parts, np.dtype(np.uint32)), parts)


def _shifted(positions: np.ndarray, first_row: int) -> np.ndarray:
    """Row positions within a service, made positions in the image."""
    return positions + np.uint32(first_row) if first_row else positions


def _joined(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """One array of ``parts`` (shared, not copied, when there is one: a
    image's arrays are never written once built)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return np.zeros(0, dtype)
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p.view(np.uint8) for p in parts]).view(dtype)


def image_of_config(config: Config, version: int, service_slots: SlotMap, backend_slots: SlotMap,
                         previous: Mapping[str, ServiceTables] | None = None,
                         changed: Mapping[str, frozenset[str]] | None = None) -> Image:
    node = config.node
    limits = Limits(node.connect_timeout_ms, node.idle_timeout_ms, node.retries, RELAY_MODES[node.relay],
                    node.fin_timeout_ms, source_ip_of(node.address))
    try:
        return build_image(config.services, limits, version, service_slots, backend_slots, previous,
                              changed)
    except ImageError as exc:
        raise ConfigError(config.path, f"service[{exc.service_index}]", str(exc)) from None


def check_buildable(config: Config) -> None:
    """ConfigError if ``config`` is valid but its image cannot be built."""
    service_slots: SlotMap[str] = SlotMap(layout.MAX_SERVICES)
    backend_slots: SlotMap[tuple[str, str]] = SlotMap(layout.MAX_BACKENDS)
    service_slots.assign((s.name for s in config.services), lambda slot: True)
    backend_slots.assign(((s.name, b.id) for s in config.services for b in s.backends), lambda slot: True)
    image_of_config(config, 1, service_slots, backend_slots)


def publish_image(segment: Segment, image: Image) -> int:
    """Write ``image`` into the buffer that is not current and make it current
    (one compiled call: the seqlock write, the copies, the checksum).

    Precondition: the caller is the segment's only publisher (the node agent).
    Returns the new generation.
    """
    if len(image.services) > layout.MAX_SERVICES or len(image.backends) > layout.MAX_BACKENDS \
            or len(image.table) > layout.TABLE_POOL:
        raise ImageError("image exceeds the segment's limits")
    generation = segment.generation() + 1
    fields: Any = _HEADER_FIELDS  # the agent is the only publisher: one scratch header will do
    fields.snapshot_version = image.version
    fields.n_services, fields.n_backends, fields.table_used = \
        len(image.services), len(image.backends), len(image.table)
    limits = image.limits
    fields.connect_timeout_ms, fields.idle_timeout_ms = limits.connect_timeout_ms, limits.idle_timeout_ms
    fields.retries, fields.relay_mode = limits.retries, limits.relay_mode
    fields.fin_timeout_ms, fields.source_ip = limits.fin_timeout_ms, limits.source_ip
    lib.flc_publish_image(segment.base_pointer, generation, fields,
                             ffi.from_buffer("flc_service[]", image.services),
                             ffi.from_buffer("flc_backend[]", image.backends),
                             ffi.from_buffer("uint32_t[]", image.table))
    return generation


_HEADER_FIELDS = ffi.new("flc_image_header *")


def read_image(segment: Segment, attempts: int = 100) -> Image:
    """Copy the current image out of shared memory, verified (seqlock,
    magic, layout version, checksum)."""
    for _ in range(attempts):
        buf = segment.buffer(segment.generation())
        seq = lib.flc_read_begin(buf.header_ptr)
        header = buf.header[0].copy()
        n_s, n_b, used = int(header["n_services"]), int(header["n_backends"]), int(header["table_used"])
        if n_s > layout.MAX_SERVICES or n_b > layout.MAX_BACKENDS or used > layout.TABLE_POOL:
            continue
        services = copy_rows(buf.services[:n_s])
        backends = copy_rows(buf.backends[:n_b])
        table = buf.table[:used].copy()
        if not lib.flc_read_validate(buf.header_ptr, seq):
            continue
        if int(header["magic"]) != layout.MAGIC or int(header["layout_version"]) != layout.LAYOUT_VERSION:
            raise ImageError("image buffer has a bad magic or layout version")
        if image_checksum(services, backends, table) != int(header["checksum"]):
            raise ImageError("image checksum mismatch")
        limits = Limits(int(header["connect_timeout_ms"]), int(header["idle_timeout_ms"]),
                        int(header["retries"]), int(header["relay_mode"]), int(header["fin_timeout_ms"]),
                        int(header["source_ip"]))
        return Image(int(header["snapshot_version"]), limits, services, backends, table,
                             published_ns=int(header["published_ns"]))
    raise ImageError("no stable image after repeated reads (publisher too busy?)")
