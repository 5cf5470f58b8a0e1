"""Routing: the snapshot a node holds for change. Its bytes are exactly
encode_snapshot's, a delta leads it to exactly the bytes of the new state,
and a delta that does not fit is refused by row, leaving the base as it was."""
from __future__ import annotations

import re
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from lbcore.config import MAX_BACKENDS, MAX_SERVICES, Backend, Service, parse_address
from lbcore.routing import Routing
from lbcore.wire import (
    Delta,
    WireError,
    decode_delta,
    decode_snapshot,
    diff_delta,
    snapshot_digest,
)
from tests.wire_reference import encode_delta, encode_snapshot

ALGORITHMS = ["wrr", "least_conn", "p2c", "maglev"]
FIRST = "ABCXYZabcxyz0189"
REST = FIRST + "_.:-"

# Small pools, so that two independent draws share services and backends:
# an old and a new state then differ by changes, additions and removals.
SERVICE_NAMES = ["web", "api", "db.1", "cache:2", "Z-z", "0_mail", "q", "a.b-c:d_e"]
BACKEND_IDS = ["b1", "b2", "b10", "B2", "x.y", "9:z", "k-1", "long_backend_id.0:1-2"]
HOSTS = ["127.0.0.1", "10.0.0.7", "192.168.1.20", "0.0.0.0", "255.255.255.255"]


def hosts() -> st.SearchStrategy[str]:
    octet = st.integers(0, 255)
    return st.one_of(st.sampled_from(HOSTS),
                     st.tuples(octet, octet, octet, octet).map(lambda t: ".".join(map(str, t))))


def addresses() -> st.SearchStrategy[str]:
    # a port with leading zeros is a valid address (1..65535 once read) and
    # must be carried as written
    port = st.one_of(st.integers(1, 65535).map(str), st.sampled_from(["080", "0443", "00001"]))
    return st.builds(lambda h, p: f"{h}:{p}", hosts(), port)


def weights() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([0, 1, 2, 256]), st.integers(0, 256))


def backends(ids: st.SearchStrategy[str], max_size: int = 5) -> st.SearchStrategy[tuple[Backend, ...]]:
    row = st.builds(Backend, ids, addresses(), weights())
    return st.lists(row, max_size=max_size, unique_by=lambda b: b.id).map(tuple)


def services(names: st.SearchStrategy[str], ids: st.SearchStrategy[str],
             max_size: int = 5) -> st.SearchStrategy[list[Service]]:
    one = st.builds(Service, names, addresses(), st.sampled_from(ALGORITHMS), backends(ids))
    # distinct names, and distinct listen addresses as a node reads them
    return st.lists(one, max_size=max_size,
                    unique_by=(lambda s: s.name, lambda s: parse_address(s.listen)))


# names as the row rules allow: ^[A-Za-z0-9][A-Za-z0-9_.:-]*$
names = st.builds(str.__add__, st.sampled_from(FIRST), st.text(REST, max_size=11))
random_services = services(names, names)
pooled_services = services(st.sampled_from(SERVICE_NAMES), st.sampled_from(BACKEND_IDS))
versions = st.integers(0, 2**40)


def state_of(routing: Routing) -> Any:
    """Everything a Routing holds, read from its dicts (not from the cached bytes)."""
    return routing.version, [
        (name, s.name, s.listen, s.algorithm, list(s.backends.items()), list(s.pieces.items()))
        for name, s in routing.services.items()]


# ------------------------------------------------------------ canonical bytes


@settings(max_examples=150, deadline=None)
@given(version=versions, state=random_services)
def test_encode_is_encode_snapshot(version: int, state: list[Service]) -> None:
    routing = Routing.of(version, state)
    expected = encode_snapshot(version, state)
    assert routing.encoded_size() == len(expected)  # known without encoding
    assert routing.encode() == expected
    assert routing.digest() == snapshot_digest(expected)
    # and a node reading those bytes holds the same routing
    assert Routing.of(*decode_snapshot(routing.encode())).encode() == expected


def test_encode_of_no_services() -> None:
    assert Routing.of(0, []).encode() == encode_snapshot(0, []) == b'{"epoch":0,"services":[],"version":0}'
    assert Routing(-1, {}).encode() == encode_snapshot(-1, [])
    assert Routing.of(3, [], epoch=77).encode() == encode_snapshot(3, [], 77) == \
        b'{"epoch":77,"services":[],"version":3}'


def test_as_services_in_name_and_id_order() -> None:
    web = Service("web", "127.0.0.1:80", "wrr",
                  (Backend("b", "10.0.0.1:1", 1), Backend("a", "10.0.0.1:2", 2)))
    api = Service("api", "127.0.0.1:81", "p2c", ())
    routing = Routing.of(3, [web, api])
    assert [s.name for s in routing.as_services()] == ["api", "web"]
    assert [b.id for b in routing.as_services()[1].backends] == ["a", "b"]
    assert encode_snapshot(3, routing.as_services()) == routing.encode()


# ------------------------------------------------------------ deltas


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=versions, version=versions, old=pooled_services, new=pooled_services)
def test_a_delta_leads_to_the_new_state(base: int, version: int, old: list[Service],
                                        new: list[Service]) -> None:
    held = Routing.of(base, old)
    before = state_of(held)
    applied = held.apply(decode_delta(encode_delta(base, old, version, new)))
    assert applied.encoded_size() == len(encode_snapshot(version, new))  # kept up to date by the delta
    assert applied.encode() == encode_snapshot(version, new)
    assert applied.digest() == snapshot_digest(encode_snapshot(version, new))
    assert applied.version == version
    # the base is untouched, and its bytes (computed only now) are the old state's
    assert state_of(held) == before
    assert held.encode() == encode_snapshot(base, old)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(old=pooled_services, new=pooled_services, newer=pooled_services)
def test_deltas_chain(old: list[Service], new: list[Service], newer: list[Service]) -> None:
    held = Routing.of(1, old)
    second = held.apply(diff_delta(1, old, 2, new))
    third = second.apply(decode_delta(encode_delta(2, new, 3, newer)))
    assert third.encoded_size() == len(encode_snapshot(3, newer))
    assert third.encode() == encode_snapshot(3, newer)
    assert second.encode() == encode_snapshot(2, new)
    assert held.encode() == encode_snapshot(1, old)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(old=pooled_services, new=pooled_services)
def test_a_refused_delta_leaves_the_base_as_it_was(old: list[Service], new: list[Service]) -> None:
    held = Routing.of(4, old)
    before = state_of(held)
    delta = diff_delta(4, old, 5, new)
    # the same delta with one row that cannot fit, appended last: every row
    # before it has been worked on when it is refused
    broken = Delta(5, 4, delta.services, delta.removed_services,
                   [*delta.backends, {"service": "nope", "id": "b1", "address": "10.0.0.1:1", "weight": 1}],
                   delta.removed_backends)
    with pytest.raises(WireError, match=re.escape(f"backends[{len(delta.backends)}].service")):
        held.apply(broken)
    assert state_of(held) == before
    assert held.encode() == encode_snapshot(4, old)
    assert held.apply(delta).encode() == encode_snapshot(5, new)


# ------------------------------------------------------------ refusals

WEB = Service("web", "127.0.0.1:8080", "wrr",
              (Backend("w1", "10.0.0.1:9001", 1), Backend("w2", "10.0.0.2:9002", 2)))
API = Service("api", "127.0.0.1:8081", "maglev", (Backend("a1", "10.0.1.1:9001", 5),))


def backend_row(**changes: Any) -> dict[str, Any]:
    return {"service": "web", "id": "w3", "address": "10.0.0.3:9003", "weight": 1, **changes}


def service_row(**changes: Any) -> dict[str, Any]:
    return {"name": "new", "listen": "127.0.0.1:8082", "algorithm": "wrr", **changes}


def without(row: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != key}


REFUSALS = [
    # (delta fields, what the message must say)
    ({"base": 6}, "base 6 is not the version held (7)"),
    ({"backends": [backend_row(service="nope")]}, "backends[0].service: no service 'nope'"),
    ({"backends": [backend_row(), backend_row(service=7)]}, "backends[1].service: no service 7"),
    ({"backends": [without(backend_row(), "service")]}, "backends[0].service: no service None"),
    ({"backends": [["web", "w3"]]}, "backends[0]: must be an object"),
    ({"backends": [backend_row(weight=-1)]}, "backends[0].weight: must be 0..256"),
    ({"backends": [backend_row(weight=257)]}, "backends[0].weight: must be 0..256"),
    ({"backends": [backend_row(weight=True)]}, "backends[0].weight: must be int"),
    ({"backends": [backend_row(weight="1")]}, "backends[0].weight: must be int"),
    ({"backends": [backend_row(address="10.0.0.3")]}, "backends[0].address"),
    ({"backends": [backend_row(address="10.0.0.256:80")]}, "backends[0].address"),
    ({"backends": [backend_row(address="10.0.0.3:0")]}, "backends[0].address"),
    ({"backends": [backend_row(address="localhost:80")]}, "backends[0].address"),
    ({"backends": [backend_row(id="-w3")]}, "backends[0].id"),
    ({"backends": [backend_row(id="w" * 48)]}, "backends[0].id"),
    ({"backends": [backend_row(extra=1)]}, "backends[0]: must have exactly id, address, weight"),
    ({"backends": [without(backend_row(), "weight")]}, "backends[0]: must have exactly"),
    ({"removed_backends": [{"service": "web", "id": "w9"}]}, "removed_backends[0]: no backend web/w9"),
    ({"removed_backends": [{"service": "web", "id": "w1"}, {"service": "web", "id": "w1"}]},
     "removed_backends[1]: no backend web/w1"),
    ({"removed_backends": [{"service": "nope", "id": "w1"}]}, "removed_backends[0].service: no service"),
    ({"removed_backends": [{"service": "web", "id": "w1", "weight": 1}]}, "removed_backends[0]: must be"),
    ({"removed_backends": [{"service": "web", "id": 1}]}, "removed_backends[0]: must be"),
    ({"removed_backends": ["web/w1"]}, "removed_backends[0]: must be"),
    ({"removed_services": ["nope"]}, "removed_services[0]: no service 'nope'"),
    ({"removed_services": ["web", "web"]}, "removed_services[1]: no service 'web'"),
    ({"removed_services": [["web"]]}, "removed_services[0]: no service"),
    # a removed service takes its backends with it
    ({"removed_services": ["web"], "backends": [backend_row()]}, "backends[0].service: no service 'web'"),
    ({"removed_services": ["web"], "removed_backends": [{"service": "web", "id": "w1"}]},
     "removed_backends[0].service: no service 'web'"),
    ({"services": [service_row(algorithm="random")]}, "services[0].algorithm: unknown algorithm 'random'"),
    ({"services": [service_row(listen="127.0.0.1")]}, "services[0].listen"),
    ({"services": [service_row(listen="127.0.0.1:65536")]}, "services[0].listen"),
    ({"services": [service_row(name="new service")]}, "services[0].name"),
    ({"services": [service_row(name="")]}, "services[0].name"),
    ({"services": [service_row(), service_row(name="n2", port=1)]},
     "services[1]: must have exactly name, listen, algorithm"),
    ({"services": [without(service_row(), "algorithm")]}, "services[0]: must have exactly"),
    ({"services": ["new"]}, "services[0]: must have exactly"),
]


@pytest.mark.parametrize(("fields", "message"), REFUSALS, ids=[m for _, m in REFUSALS])
def test_refusals_say_which_row(fields: dict[str, Any], message: str) -> None:
    held = Routing.of(7, [WEB, API])
    held.encode()
    before = state_of(held)
    delta = Delta(**{"version": 8, "base": 7, **fields})
    with pytest.raises(WireError, match=re.escape(message)):
        held.apply(delta)
    # also when the delta came off the wire
    with pytest.raises(WireError, match=re.escape(message)):
        held.apply(decode_delta(delta.encode()))
    assert state_of(held) == before
    assert held.encode() == encode_snapshot(7, [WEB, API])


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "127.0.0.1:08080"])
def test_two_services_on_one_listen_address_are_refused(listen: str) -> None:
    held = Routing.of(7, [WEB, API])
    with pytest.raises(WireError, match=r"'new'.*'web'.*both listen on|'web'.*'new'.*both listen on"):
        held.apply(Delta(8, 7, services=[service_row(listen=listen)]))
    # an existing service moved onto another's address
    with pytest.raises(WireError, match="'api' and 'web' both listen on 127.0.0.1:8081"):
        held.apply(Delta(8, 7, services=[{"name": "web", "listen": "127.0.0.1:8081", "algorithm": "wrr"}]))
    # moving one away in the same delta makes room
    swapped = held.apply(Delta(8, 7, services=[
        {"name": "web", "listen": "127.0.0.1:8081", "algorithm": "wrr"},
        {"name": "api", "listen": "127.0.0.1:8080", "algorithm": "maglev"}]))
    assert {s.name: s.listen for s in swapped.as_services()} == {"web": "127.0.0.1:8081",
                                                                "api": "127.0.0.1:8080"}
    assert held.encode() == encode_snapshot(7, [WEB, API])


def many_backends(count: int) -> tuple[Backend, ...]:
    return tuple(Backend(f"b{i:05d}", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:{1 + i % 65535}", 1)
                 for i in range(count))


def test_the_backend_limit() -> None:
    half = MAX_BACKENDS // 2
    full = [Service("one", "127.0.0.1:1", "wrr", many_backends(half)),
            Service("two", "127.0.0.1:2", "p2c", many_backends(MAX_BACKENDS - half))]
    held = Routing.of(1, full)
    extra = {"service": "two", "id": "extra", "address": "10.0.0.1:1", "weight": 1}
    with pytest.raises(WireError, match=f"more than {MAX_BACKENDS} backends"):
        held.apply(Delta(2, 1, backends=[extra]))
    with pytest.raises(WireError, match=f"more than {MAX_BACKENDS} backends"):
        held.apply(Delta(2, 1, services=[service_row()],
                         backends=[{**extra, "service": "new"}]))
    # one out, one in: still at the limit, and accepted
    swapped = held.apply(Delta(2, 1, backends=[extra], removed_backends=[{"service": "one", "id": "b00000"}]))
    assert sum(len(s.backends) for s in swapped.as_services()) == MAX_BACKENDS
    assert held.encode() == encode_snapshot(1, full)


def test_the_service_limit() -> None:
    full = [Service(f"s{i}", f"127.0.0.1:{1000 + i}", "wrr", ()) for i in range(MAX_SERVICES)]
    held = Routing.of(1, full)
    with pytest.raises(WireError, match=f"more than {MAX_SERVICES} services"):
        held.apply(Delta(2, 1, services=[service_row(listen="127.0.0.2:1")]))
    replaced = held.apply(Delta(2, 1, services=[service_row(listen="127.0.0.2:1")], removed_services=["s0"]))
    assert len(replaced.services) == MAX_SERVICES


# ------------------------------------------------------------ sharing


def test_one_weight_change_in_ten_thousand_shares_everything_else() -> None:
    big = Service("big", "127.0.0.1:9000", "wrr", many_backends(10_000))
    others = [WEB, API, Service("empty", "127.0.0.1:9001", "least_conn", ())]
    held = Routing.of(1, [big, *others])
    held.encode()
    target = big.backends[4321]
    changed = Backend(target.id, target.address, 7)
    new_big = Service("big", big.listen, big.algorithm,
                      tuple(changed if b.id == target.id else b for b in big.backends))
    row = {"service": "big", "id": target.id, "address": target.address, "weight": 7}
    delta = Delta(2, 1, backends=[row])
    assert delta == diff_delta(1, [big, *others], 2, [new_big, *others])
    applied = held.apply(decode_delta(delta.encode()))
    assert applied.encode() == encode_snapshot(2, [new_big, *others])
    for s in others:
        assert applied.services[s.name] is held.services[s.name]
    # within the changed service, every other backend's row is the one held
    after, before = applied.services["big"], held.services["big"]
    assert after is not before
    assert after.backends[target.id] == changed and before.backends[target.id] == target
    assert all(after.backends[i] is b and after.pieces[i] is before.pieces[i]
               for i, b in before.backends.items() if i != target.id)
    assert held.encode() == encode_snapshot(1, [big, *others])


def test_an_empty_delta_shares_every_service() -> None:
    held = Routing.of(1, [WEB, API])
    applied = held.apply(Delta(2, 1))
    assert all(applied.services[n] is s for n, s in held.services.items())
    assert applied.encode() == encode_snapshot(2, [WEB, API])


# ------------------------------------------------------------ deltas written by hand


def test_a_backend_removed_and_added_back_in_one_delta_keeps_id_order() -> None:
    held = Routing.of(1, [WEB])
    applied = held.apply(Delta(2, 1, backends=[backend_row(id="w1", weight=9), backend_row(id="a0")],
                               removed_backends=[{"service": "web", "id": "w1"}]))
    expected = Service("web", WEB.listen, WEB.algorithm, (Backend("a0", "10.0.0.3:9003", 1),
                       Backend("w1", "10.0.0.3:9003", 9), WEB.backends[1]))
    assert applied.encode() == encode_snapshot(2, [expected])
    assert [b.id for b in applied.as_services()[0].backends] == ["a0", "w1", "w2"]


def test_a_service_removed_and_added_back_in_one_delta_starts_empty() -> None:
    held = Routing.of(1, [WEB, API])
    applied = held.apply(Delta(2, 1, services=[{"name": "web", "listen": "127.0.0.1:7", "algorithm": "p2c"}],
                               removed_services=["web"], backends=[backend_row()]))
    web = Service("web", "127.0.0.1:7", "p2c", (Backend("w3", "10.0.0.3:9003", 1),))
    assert applied.encode() == encode_snapshot(2, [web, API])
    assert applied.services["api"] is held.services["api"]


def test_text_that_json_escapes_is_encoded_as_json_does_and_refused_by_the_row_rules() -> None:
    # A name with a trailing newline or a port in non-ASCII digits passes no
    # row rule; should such text reach Routing.of anyway, its bytes are still
    # encode_snapshot's, which escapes them.
    odd = [Service("a\n", "1.2.3.4:\u0668\u0660", "wrr", (Backend("b\n", "1.2.3.4:\u0668\u0661", 1),))]
    held = Routing.of(1, odd)
    assert held.encode() == encode_snapshot(1, odd)
    with pytest.raises(WireError, match="is not a name"):
        decode_snapshot(held.encode())
    plain = Routing.of(1, [WEB])
    for row, where in [({"service": "web", "id": "c", "address": "1.2.3.4:\u0968", "weight": 2}, "address"),
                       ({"service": "web", "id": "c\n", "address": "1.2.3.4:80", "weight": 2}, "id")]:
        with pytest.raises(WireError, match=f"backends\\[0\\]\\.{where}"):
            plain.apply(decode_delta(Delta(2, 1, backends=[row]).encode()))


# ------------------------------------------------------------ thin routings (with_rows)


@st.composite
def row_rewrites(draw: Any, routing: Routing) -> Delta:
    """A delta against ``routing`` that only rewrites rows it has (weights,
    addresses), or None when it holds no backend."""
    rows = [(name, backend_id) for name, s in routing.services.items() for backend_id in s.backends]
    picked = draw(st.lists(st.sampled_from(rows), max_size=4, unique=True)) if rows else []
    return Delta(routing.version + 1, routing.version, backends=[
        {"service": name, "id": backend_id, "address": draw(addresses()), "weight": draw(weights())}
        for name, backend_id in picked])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), old=pooled_services)
def test_a_chain_of_row_rewrites_held_thin_is_what_apply_gives(data: st.DataObject,
                                                               old: list[Service]) -> None:
    """with_rows gives, once its services are read, exactly apply's routing;
    along a chain its root is kept, the base is never touched, and
    rewritten_rows names the last delta's rows."""
    first = built = thin = Routing.of(1, old)
    before = state_of(first)
    for step in range(data.draw(st.integers(1, 6), label="steps")):
        delta = data.draw(row_rewrites(built), label=f"delta {step}")
        held, thin = thin, thin.with_rows(delta)
        built = built.apply(delta)
        assert thin is not None and thin.version == built.version and thin.base == held.version
        assert thin.rewritten_rows(held) == {
            name: frozenset(r["id"] for r in delta.backends if r["service"] == name)
            for name in {r["service"] for r in delta.backends}}
        # only from the routing it was made from: not from an equal one built apart, nor an older one
        assert thin.rewritten_rows(Routing.of(held.version, held.as_services())) is None
        assert thin.rewritten_rows(thin) is None
        for row in delta.backends:  # read without building it
            expected = Backend(row["id"], row["address"], row["weight"])
            assert thin.backend(row["service"], row["id"]) == expected
        if data.draw(st.booleans(), label=f"read {step}"):  # a digest builds it: the next chains from it
            assert thin.digest() == built.digest()
    assert thin.encode() == built.encode() and thin.as_services() == built.as_services()
    assert state_of(thin) == state_of(built)
    assert state_of(first) == before


def test_with_rows_leaves_to_apply_what_is_more_than_a_row_rewrite() -> None:
    rows = (Backend("a", "10.0.0.1:1", 1), Backend("b", "10.0.0.1:2", 2))
    held = Routing.of(3, [Service("web", "127.0.0.1:80", "wrr", rows)])
    row = {"service": "web", "id": "a", "address": "10.0.0.1:1", "weight": 5}
    for delta in [
        Delta(4, 3, backends=[{**row, "id": "c"}]),                                   # an id comes
        Delta(4, 3, removed_backends=[{"service": "web", "id": "a"}]),              # ... or goes
        Delta(4, 3, services=[{"name": "web", "listen": "127.0.0.1:81", "algorithm": "wrr"}]),
        Delta(4, 3, removed_services=["web"]),
        Delta(4, 2, backends=[row]),                                                  # not our base
        Delta(4, 3, backends=[{**row, "service": "nope"}]),                           # apply says why
        Delta(4, 3, backends=[{**row, "service": ["web"]}]),
        Delta(4, 3, backends=[row, "not a row"]),
    ]:
        assert held.with_rows(delta) is None, delta
    # a row apply refuses is refused here too, with apply's words
    bad = Delta(4, 3, backends=[row, {**row, "id": "b", "address": "10.0.0.1:0"}])
    with pytest.raises(WireError) as by_apply:
        held.apply(bad)
    with pytest.raises(WireError) as thin:
        held.with_rows(bad)
    assert str(thin.value) == str(by_apply.value) and "backends[1].address" in str(thin.value)


def test_a_thin_routing_is_built_before_its_rows_pass_the_bound() -> None:
    from lbcore.routing import OVERLAY_ROWS

    web = Service("web", "127.0.0.1:80", "wrr", tuple(Backend(f"b{i}", "10.0.0.1:1", 1)
                                                      for i in range(OVERLAY_ROWS + 1)))
    routing = Routing.of(1, [web])
    for i in range(OVERLAY_ROWS):
        thin = routing.with_rows(Delta(i + 2, i + 1, backends=[
            {"service": "web", "id": f"b{i}", "address": "10.0.0.1:1", "weight": 2}]))
        assert thin is not None and thin.rewritten_rows(routing) is not None
        routing = thin
    last = Delta(OVERLAY_ROWS + 2, OVERLAY_ROWS + 1, backends=[
        {"service": "web", "id": f"b{OVERLAY_ROWS}", "address": "10.0.0.1:1", "weight": 2}])
    assert routing.with_rows(last) is None  # past the bound: apply, which builds it
    assert [b.weight for b in routing.apply(last).as_services()[0].backends] == [2] * (OVERLAY_ROWS + 1)


def test_a_built_thin_routing_lets_go_of_its_root() -> None:
    """Built (by a digest), a thin routing is the root of the next ones and
    holds no root of its own: a long run of row rewrites keeps one root."""
    import gc
    import weakref

    web = Service("web", "127.0.0.1:80", "wrr", (Backend("a", "10.0.0.1:1", 1),))
    routing = Routing.of(1, [web])
    first = weakref.ref(routing)
    for version in range(2, 6):
        thin = routing.with_rows(Delta(version, version - 1, backends=[
            {"service": "web", "id": "a", "address": "10.0.0.1:1", "weight": version}]))
        assert thin is not None and thin.rewritten_rows(routing) == {"web": frozenset({"a"})}
        thin.digest()
        assert thin.rewritten_rows(routing) is None  # built: compared, not told
        routing = thin
    gc.collect()
    assert first() is None
    assert routing.as_services()[0].backends == (Backend("a", "10.0.0.1:1", 5),)
