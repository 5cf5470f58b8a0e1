"""Images built from the one before: after any sequence of changes, a
build that reuses the previous image's parts gives the very bytes of a build
from scratch, and a service that did not change keeps its tables (the same
arrays, not equal copies)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import hypothesis.strategies as st
import numpy as np
from hypothesis import HealthCheck, event, given, settings

from lbcore.config import Backend, Config, Service, parse_document
from lbcore.image import Image, Limits, ServiceTables, build_image, read_image
from lbcore.planner import Planner
from lbcore.segment import Segment
from tests.conftest import unique_node_id
from tests.lbcore.deltas import IDS, delta_of, delta_rows
from tests.support import image_bytes

LIMITS = Limits(connect_timeout_ms=2000, idle_timeout_ms=300_000, retries=3, relay_mode=1)
ALGORITHMS = ["wrr", "least_conn", "p2c", "maglev"]


def tables_of(part: ServiceTables) -> tuple[bytes, bytes, bytes]:
    return part.rows.tobytes(), part.schedule.tobytes(), part.maglev.tobytes()


class HeldPlanner(Planner):
    """The node's planner, with whether a slot left behind may be given away
    drawn by the test (the node asks its counters and workers)."""

    releasable = True

    def backend_slot_releasable(self, slot: int) -> bool:
        return self.releasable

    def service_slot_releasable(self, slot: int) -> bool:
        return self.releasable


class Node:
    """The node's planner over a real segment: each publish is checked
    against a build from scratch with the same slots."""

    def __init__(self) -> None:
        self.segment = Segment.create(unique_node_id("reuse"))
        self.node = parse_document({"node": {"id": "reuse", "relay": "splice"}}, "test").node
        self.planner = HeldPlanner(Config("test", self.node), self.segment, lambda: ())

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.segment.unlink()
        self.segment.close()

    @property
    def image(self) -> Image | None:
        return self.planner.image

    def publish(self, services: Sequence[Service], releasable: bool = True, version: int | None = None,
                changed: Mapping[str, frozenset[str]] | None = None) -> Image:
        """Plan ``services`` reusing the last image, check the plan against
        a build from scratch with the same slots, and publish it."""
        self.planner.releasable = releasable
        previous = self.image.parts if self.image is not None else None
        held = {name: tables_of(part) for name, part in (previous or {}).items()}
        last_bytes = image_bytes(self.image) if self.image is not None else b""

        plan = self.planner.plan(Config("test", self.node, tuple(services)), version, changed)
        incremental = plan.image
        fresh = build_image(services, LIMITS, incremental.version, plan.service_slots, plan.backend_slots)

        assert image_bytes(incremental) == image_bytes(fresh)
        assert incremental.checksum == fresh.checksum
        assert incremental.parts.keys() == fresh.parts.keys() == {s.name for s in services}
        for name, part in incremental.parts.items():
            assert tables_of(part) == tables_of(fresh.parts[name]), name
            other = fresh.parts[name]
            assert (part.backends, part.algorithm) == (other.backends, other.algorithm)
            assert part.slot == fresh.parts[name].slot == plan.service_slots.slot_of(name)
        # what was reused was not written to: the last image is as it was
        assert {name: tables_of(part) for name, part in (previous or {}).items()} == held
        if self.image is not None:
            assert image_bytes(self.image) == last_bytes

        self.planner.publish(plan)
        assert image_bytes(read_image(self.segment)) == image_bytes(fresh)
        return incremental


# ------------------------------------------------------------ random changes

octets = st.integers(0, 255)
addresses = st.builds(lambda a, b, p: f"10.{a}.{b}.1:{p}", octets, octets, st.integers(1, 65535))
weights = st.one_of(st.sampled_from([0, 1, 2, 3, 256]), st.integers(0, 256))
BACKEND_IDS = [f"b{n}" for n in range(41)]
SERVICE_NAMES = ["web", "api", "db", "cache", "mail", "dns", "ntp", "ldap"]
backend_ids = st.sampled_from(BACKEND_IDS)
service_names = st.sampled_from(SERVICE_NAMES)


def other_than(choices: list[str], taken: set[str]) -> st.SearchStrategy[str]:
    return st.sampled_from([c for c in choices if c not in taken])


def new_backends(max_size: int = 6) -> st.SearchStrategy[tuple[Backend, ...]]:
    row = st.builds(Backend, backend_ids, addresses, weights)
    return st.lists(row, max_size=max_size, unique_by=lambda b: b.id).map(tuple)


def new_service(name: str, port: int) -> st.SearchStrategy[Service]:
    return st.builds(Service, st.just(name), st.just(f"127.0.0.1:{port}"),
                     st.sampled_from(ALGORITHMS), new_backends())


def replace_backend(service: Service, i: int, backend: Backend | None) -> Service:
    """``service`` with backend ``i`` replaced (or removed): every other
    Backend object is kept, as a node keeps them from one routing to the next."""
    rows = list(service.backends)
    if backend is None:
        del rows[i]
    else:
        rows[i] = backend
    return dataclasses.replace(service, backends=tuple(rows))


class Step:
    """One random change to the services; ``touched`` names the services it
    replaced (every other Service object is kept as it was)."""

    def __init__(self, data: st.DataObject, services: list[Service]) -> None:
        self.data, self.services = data, list(services)
        self.touched: set[str] = set()
        self.kind = ""

    def draw(self, strategy: st.SearchStrategy[Any], label: str) -> Any:
        return self.data.draw(strategy, label=label)

    def service_index(self, with_backends: bool = False) -> int | None:
        choices = [i for i, s in enumerate(self.services) if s.backends or not with_backends]
        return self.draw(st.sampled_from(choices), "service") if choices else None

    def set(self, i: int, service: Service) -> None:
        self.services[i] = service
        self.touched.add(service.name)

    def run(self) -> list[Service]:
        kinds = ["weight", "weight", "address", "add_backend", "remove_backend", "rename_backend",
                 "algorithm", "add_service", "remove_service", "listen", "copies", "reorder", "nothing"]
        self.kind = self.draw(st.sampled_from(kinds), "change")
        getattr(self, self.kind)()
        return self.services

    def weight(self) -> None:
        i = self.service_index(with_backends=True)
        if i is not None:
            s = self.services[i]
            j = self.draw(st.integers(0, len(s.backends) - 1), "backend")
            w = self.draw(weights, "weight")
            self.set(i, replace_backend(s, j, dataclasses.replace(s.backends[j], weight=w)))

    def address(self) -> None:
        i = self.service_index(with_backends=True)
        if i is not None:
            s = self.services[i]
            j = self.draw(st.integers(0, len(s.backends) - 1), "backend")
            a = self.draw(addresses, "address")
            self.set(i, replace_backend(s, j, dataclasses.replace(s.backends[j], address=a)))

    def add_backend(self) -> None:
        i = self.service_index()
        if i is not None:
            s = self.services[i]
            ids = {b.id for b in s.backends}
            backend = self.draw(st.builds(Backend, other_than(BACKEND_IDS, ids), addresses, weights),
                                "new backend")
            at = self.draw(st.integers(0, len(s.backends)), "at")
            self.set(i, dataclasses.replace(s, backends=(*s.backends[:at], backend, *s.backends[at:])))

    def remove_backend(self) -> None:
        i = self.service_index(with_backends=True)
        if i is not None:
            s = self.services[i]
            self.set(i, replace_backend(s, self.draw(st.integers(0, len(s.backends) - 1), "backend"), None))

    def rename_backend(self) -> None:
        # one out and another in at its place: the same count, not the same ids
        i = self.service_index(with_backends=True)
        if i is not None:
            s = self.services[i]
            j = self.draw(st.integers(0, len(s.backends) - 1), "backend")
            ids = {b.id for b in s.backends}
            new_id = self.draw(other_than(BACKEND_IDS, ids), "new id")
            self.set(i, replace_backend(s, j, dataclasses.replace(s.backends[j], id=new_id)))

    def algorithm(self) -> None:
        i = self.service_index()
        if i is not None:
            s = self.services[i]
            # to or from maglev most of the time: the tables that differ most
            other = "maglev" if s.algorithm != "maglev" else self.draw(st.sampled_from(ALGORITHMS), "to")
            algorithm = self.draw(st.sampled_from([other, other, *ALGORITHMS]), "algorithm")
            self.set(i, dataclasses.replace(s, algorithm=algorithm))

    def add_service(self) -> None:
        names = {s.name for s in self.services}
        if names.issuperset(SERVICE_NAMES):
            return
        name = self.draw(other_than(SERVICE_NAMES, names), "name")
        port = max((int(s.listen.rpartition(":")[2]) for s in self.services), default=8000) + 1
        service = self.draw(new_service(name, port), "new service")
        at = self.draw(st.integers(0, len(self.services)), "at")
        self.services.insert(at, service)
        self.touched.add(name)

    def remove_service(self) -> None:
        i = self.service_index()
        if i is not None:
            self.touched.add(self.services.pop(i).name)

    def listen(self) -> None:
        i = self.service_index()
        if i is not None:
            s = self.services[i]
            port = max(int(x.listen.rpartition(":")[2]) for x in self.services) + 1
            self.set(i, dataclasses.replace(s, listen=f"127.0.0.2:{port}"))

    def copies(self) -> None:
        # equal services in new objects, as a config file read again gives them
        for i, s in enumerate(list(self.services)):
            self.set(i, Service(s.name, s.listen, s.algorithm,
                                tuple(Backend(b.id, b.address, b.weight) for b in s.backends)))

    def reorder(self) -> None:
        self.services = self.draw(st.permutations(self.services), "order")

    def nothing(self) -> None:
        pass


def initial_services() -> st.SearchStrategy[list[Service]]:
    names = st.lists(service_names, min_size=1, max_size=4, unique=True)
    return names.flatmap(
        lambda ns: st.tuples(*(new_service(n, 8000 + i) for i, n in enumerate(ns))).map(list))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), services=initial_services(), steps=st.integers(1, 12))
def test_reusing_the_last_image_gives_the_bytes_of_a_fresh_build(data: st.DataObject, services: list[Service],
                                                                 steps: int) -> None:
    with Node() as node:
        node.publish(services)
        for _ in range(steps):
            before = {s.name: s for s in services}
            step = Step(data, services)
            services = step.run()
            event(step.kind)
            parts = node.image.parts if node.image is not None else {}
            # a slot left behind is given away now, or only later
            releasable = data.draw(st.booleans(), label="releasable")
            image = node.publish(services, releasable)
            for s in services:
                if s.name not in step.touched:
                    assert before[s.name] is s
                    assert image.parts[s.name].rows is parts[s.name].rows, (step.kind, s.name)
                    assert image.parts[s.name].schedule is parts[s.name].schedule
                    assert image.parts[s.name].maglev is parts[s.name].maglev


# ------------------------------------------------------------ examples

def pool(name: str, port: int, algorithm: str, size: int) -> Service:
    return Service(name, f"127.0.0.1:{port}", algorithm,
                   tuple(Backend(f"b{i}", f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}:{1 + i % 65535}", 1 + i % 3)
                         for i in range(size)))


def test_a_weight_change_rebuilds_only_its_service() -> None:
    with Node() as node:
        services = [pool("web", 8000, "wrr", 5), pool("api", 8001, "maglev", 7), pool("db", 8002, "p2c", 3),
                    pool("none", 8003, "least_conn", 0)]
        first = node.publish(services)
        api = services[1]
        services[1] = replace_backend(api, 3, dataclasses.replace(api.backends[3], weight=0))
        second = node.publish(services)
        for name in ("web", "db", "none"):
            assert second.parts[name].rows is first.parts[name].rows
            assert second.parts[name].schedule is first.parts[name].schedule
            assert second.parts[name].maglev is first.parts[name].maglev
        changed = second.parts["api"]
        assert changed.rows is not first.parts["api"].rows
        assert changed.rows["weight"].tolist() == [1, 2, 3, 0, 2, 3, 1]
        assert first.parts["api"].rows["weight"].tolist() == [1, 2, 3, 1, 2, 3, 1]
        assert not np.array_equal(changed.maglev, first.parts["api"].maglev)
        assert 3 not in set(changed.maglev.tolist())


def test_a_weight_change_among_ten_thousand_backends() -> None:
    with Node() as node:
        services = [pool("big", 8000, "wrr", 10_000), pool("small", 8001, "maglev", 4)]
        first = node.publish(services)
        big = services[0]
        services[0] = replace_backend(big, 5_000, dataclasses.replace(big.backends[5_000], weight=200,
                                                                        address="10.9.9.9:99"))
        second = node.publish(services)
        assert second.parts["small"].rows is first.parts["small"].rows
        row = second.parts["big"].rows[5_000]
        assert (int(row["weight"]), int(row["port"]), bool(row["eligible"])) == (200, 99, True)
        assert int(first.parts["big"].rows[5_000]["weight"]) == 1 + 5_000 % 3
        # and back to weight 0: out of the schedule
        big = services[0]
        services[0] = replace_backend(big, 5_000, dataclasses.replace(big.backends[5_000], weight=0))
        third = node.publish(services)
        assert 5_000 not in set(third.parts["big"].schedule.tolist())


def test_a_service_that_comes_back_is_built_afresh() -> None:
    with Node() as node:
        web, api = pool("web", 8000, "wrr", 3), pool("api", 8001, "maglev", 3)
        node.publish([web, api])
        node.publish([web], releasable=True)
        node.publish([pool("x", 8002, "p2c", 2), web])  # may take api's slots
        node.publish([api, web])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.lists(delta_rows(), min_size=0, max_size=3), min_size=1, max_size=10))
def test_a_build_told_which_rows_a_delta_changed_equals_a_build_from_scratch(steps):
    from lbcore.routing import Routing, rows_changed

    held = Routing.of(1, [Service("web", "127.0.0.1:80", "wrr",
                                  tuple(Backend(i, "127.0.0.1:9000", 1) for i in IDS[:4])),
                          Service("api", "127.0.0.1:81", "maglev", (Backend("b0", "127.0.0.1:9000", 2),))])
    with Node() as node:
        node.publish(held.as_services())
        for rows in steps:
            delta = delta_of(held, rows)
            routing = held.apply(delta)
            hints = rows_changed(held, routing)
            event("hinted" if hints is not None else "compared")
            node.publish(routing.as_services(), version=routing.version, changed=hints)
            held = routing
