"""What a node publishes next: the plan of an image, and the state it is
planned against (the image and config published, the slot maps).

A plan changes nothing: it is built, checked (ConfigError when it cannot
be built; the node keeps what it has), then published, or dropped. The
node agent decides when; this module decides what. Slots are given to new
services and backends only once nothing refers to their old holder (see
``backend_slot_releasable``, ``service_slot_releasable``): that is what
keeps counters of open connections with the backend they belong to.

Slow start is the node's own: a publish stamps the counter of each backend
that becomes eligible with the time (``ramp_start_ms``: added, up again,
back from a drain), in services with a slow_start_ms, and the workers'
picks ramp it up from there (balance/context.pxd ``ramp_declines``). The
first image a node publishes ramps nothing (a node starting does not ramp
its whole pool), nor does a service new to the node (its backends would all
ramp alike: no share would change). ``end_ramps`` clears the stamps of
ramps that are over, so the 32-bit clock's wrap never starts one again.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from lbcore import layout
from lbcore._layout import ffi, lib
from lbcore.config import Config, ConfigError, Service, parse_address
from lbcore.image import Image, image_of_config, patched_tables, publish_image
from lbcore.routing import Routing, rows_changed
from lbcore.segment import Segment
from lbcore.slots import SlotMap


@dataclass(frozen=True)
class Plan:
    config: Config
    image: Image
    service_slots: SlotMap[str]
    backend_slots: SlotMap[tuple[str, str]]
    fresh_services: list[int]
    fresh_backends: list[int]


class Planner:
    """Plans and publishes images into ``segment``; ``workers`` gives the
    indices of the worker processes that may still read an older image."""

    def __init__(self, config: Config, segment: Segment, workers: Callable[[], Iterable[int]]) -> None:
        self.config = config  # the one published (before the first publish: the one to start from)
        self.segment = segment
        self._workers = workers
        self.image: Image | None = None  # the one published
        self.version = 0
        self.service_slots: SlotMap[str] = SlotMap(layout.MAX_SERVICES)
        self.backend_slots: SlotMap[tuple[str, str]] = SlotMap(layout.MAX_BACKENDS)
        self._service_retired_since: dict[int, float] = {}
        self._windows: np.ndarray = np.zeros(0, dtype=np.int64)
        self._windows_of: Image | None = None

    # ------------------------------------------------------------ slot release

    def workers_current(self) -> bool:
        """Every worker has noticed the current generation: none still picks
        from an older buffer."""
        current = self.segment.generation()
        return all(int(self.segment.workers[i]["generation"]) >= current for i in self._workers())

    def backend_slot_releasable(self, slot: int) -> bool:
        """A retired backend slot may be reused once nothing refers to it: no
        open connection, and every worker past the image that dropped it."""
        return int(self.segment.counters[slot]["active"]) == 0 and self.workers_current()

    def service_slot_releasable(self, slot: int) -> bool:
        """A removed service's slot may serve another service once every
        worker is past the image that removed it and no connection of the
        old service can still be between connect retries."""
        since = self._service_retired_since.setdefault(slot, time.monotonic())
        node = self.config.node
        setup_window = node.connect_timeout_ms * (node.retries + 1) / 1000 + 1.0
        if self.workers_current() and time.monotonic() - since >= setup_window:
            del self._service_retired_since[slot]
            return True
        return False

    # ------------------------------------------------------------ plans

    def plan(self, config: Config, version: int | None = None,
             changed: Mapping[str, frozenset[str]] | None = None) -> Plan:
        """Everything a publish of ``config`` needs, changing nothing yet:
        ConfigError when it cannot be built (the node keeps what it has).
        ``changed``: per service, the only backend rows that differ from
        the published image, ids and their order unchanged (from a delta)."""
        service_slots, backend_slots = self.service_slots, self.backend_slots
        fresh_services: list[int] = []
        fresh_backends: list[int] = []
        same_names = [s.name for s in self.config.services] == [s.name for s in config.services]
        try:
            if not same_names or self.image is None:
                service_slots = service_slots.copy()
                fresh_services = service_slots.assign((s.name for s in config.services),
                                                      self.service_slot_releasable)
            same_keys = changed is not None and same_names and len(changed) == len(config.services)
            if self.image is None or not (same_keys or _same_backends(self.config.services, config.services)):
                backend_slots = backend_slots.copy()
                fresh_backends = backend_slots.assign(
                    ((s.name, b.id) for s in config.services for b in s.backends),
                    self.backend_slot_releasable)
        except ValueError as exc:
            raise ConfigError(config.path, "service", str(exc)) from None
        version = self.version + 1 if version is None else version
        previous = self.image.parts if self.image is not None else None
        image = image_of_config(config, version, service_slots, backend_slots, previous, changed)
        return Plan(config, image, service_slots, backend_slots, fresh_services, fresh_backends)

    def plan_routing(self, routing: Routing, held: Routing) -> Plan:
        """The plan of a routing from the control plane; ``held`` is the one
        the published image was made from. A routing that only rewrote rows
        since ``held`` is patched into the published tables (and stays
        thin); any other is localized and built, reusing what it can."""
        rewritten = routing.rewritten_rows(held) if self.version == held.version else None
        if rewritten is not None:
            return self.plan_rows(routing, rewritten)
        return self.plan(localize(self.config, routing.as_services()), routing.version,
                         rows_changed(held, routing))

    def plan_rows(self, routing: Routing, rewritten: Mapping[str, frozenset[str]]) -> Plan:
        """The plan of ``routing`` when it rewrote only the rows ``rewritten``
        names since the published image (Routing.rewritten_rows): those
        rows patched into the published tables. The config is kept as it is:
        services, ids and order are unchanged; the values of its patched
        rows are then older than the image's, and nothing reads them (the
        next config built whole is compared with the tables by identity:
        see patched_tables)."""
        assert self.image is not None
        parts = dict(self.image.parts)
        for name, ids in rewritten.items():
            if ids:
                parts[name] = patched_tables(parts[name], {i: routing.backend(name, i) for i in ids})
        image = image_of_config(self.config, routing.version, self.service_slots, self.backend_slots, parts)
        return Plan(self.config, image, self.service_slots, self.backend_slots, [], [])

    def publish(self, plan: Plan) -> None:
        """Make ``plan`` the published image. A slot given to a new service
        or backend starts from zero: nothing refers to it any more. A
        backend that becomes eligible in a service with slow start is
        stamped before the image that lets workers pick it is published.
        Precondition: the caller is the segment's only publisher."""
        ramping = self._becoming_eligible(plan) if self.image is not None else []
        for slot in plan.fresh_backends:
            self.segment.counters[slot] = 0
        for slot in plan.fresh_services:
            self.segment.service_states[slot] = 0
        if ramping:
            start = ramp_clock()
            for slot in ramping:
                self._store_ramp(slot, start)
        publish_image(self.segment, plan.image)
        self.service_slots, self.backend_slots = plan.service_slots, plan.backend_slots
        self.image = plan.image
        self.version = plan.image.version
        self.config = plan.config


    # ------------------------------------------------------------ slow start

    def _becoming_eligible(self, plan: Plan) -> list[int]:
        """Slots of backends eligible in ``plan`` and not in the published
        image (absent, or not eligible there), in services with slow start
        that the published image had. Only those services are compared, and
        only when their rows changed: a publish without slow start costs
        nothing more."""
        assert self.image is not None
        before = self.image.parts
        slots: list[int] = []
        for service in plan.config.services:
            if not service.lifecycle.slow_start_ms:
                continue
            tables, old = plan.image.parts.get(service.name), before.get(service.name)
            if tables is None or old is None or tables.rows is old.rows:
                continue
            rows = tables.rows
            eligible = rows["eligible"] == 1
            was = old.rows["id"][old.rows["eligible"] == 1]
            fresh = eligible & ~np.isin(rows["id"], was)
            slots.extend(rows["slot"][fresh].tolist())
        return slots

    def end_ramps(self, now: int | None = None) -> int:
        """Clear the stamps of ramps that are over (or whose backend or
        service left slow start), ``now`` on ramp_clock (default: now).
        Called about once a second by the agent: the stamps are 32-bit ms,
        so one left would start a ramp again after 49 days. Returns how
        many it cleared. Precondition: the caller is the only writer of
        ramp_start_ms (the agent)."""
        stamps = self.segment.counters["ramp_start_ms"]
        slots = np.flatnonzero(stamps)
        if not slots.size or self.image is None:
            return 0
        now = ramp_clock() if now is None else now
        windows = self._ramp_windows()[slots]
        over = slots[layout.ramp_elapsed_ms(stamps[slots], now) >= windows]
        for slot in over.tolist():
            self._store_ramp(slot, 0)
        return int(over.size)

    def _ramp_windows(self) -> np.ndarray:
        """slow_start_ms of each slot's service in the published image (0:
        none, or not in the image), cached per image."""
        image = self.image
        assert image is not None
        if self._windows_of is not image:
            windows = np.zeros(layout.MAX_BACKENDS, dtype=np.int64)
            rows = image.backends
            if len(rows):
                windows[rows["slot"]] = image.services["slow_start_ms"][rows["service_slot"]]
            self._windows, self._windows_of = windows, image
        return self._windows

    def _store_ramp(self, slot: int, value: int) -> None:
        lib.flc_store_u32(ffi.addressof(self.segment.counter_ptr(slot), "ramp_start_ms"), value)


def ramp_clock() -> int:
    """Now as a ramp's stamp: the low 32 bits of CLOCK_MONOTONIC ms (the
    workers' clock), never 0 (0 is "not ramping")."""
    return (time.monotonic_ns() // 1_000_000) & 0xFFFFFFFF or 1


def _same_backends(old: tuple[Service, ...], new: tuple[Service, ...]) -> bool:
    """The same (service, backend) keys in the same order: the slots stand
    as they are (a weight or address change, the common update)."""
    return [s.name for s in old] == [s.name for s in new] and all(
        a.backends is b.backends or [x.id for x in a.backends] == [y.id for y in b.backends]
        for a, b in zip(old, new, strict=True))


def localize(config: Config, services: tuple[Service, ...]) -> Config:
    """The node's config with ``services``, listeners moved to node.address."""
    address = config.node.address
    if address:  # constructors, not dataclasses.replace: this runs once per version
        services = tuple(Service(s.name, f"{address}:{parse_address(s.listen)[1]}", s.algorithm, s.backends,
                                 s.health, s.outlier, s.lifecycle)
                         for s in services)
    return Config(config.path, config.node, services)
