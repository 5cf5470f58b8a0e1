"""The snapshot wire format: canonical bytes, and refusals that name the fault."""
from __future__ import annotations

import json

import pytest

from lbcore.config import Backend, Service
from lbcore.routing import Routing
from lbcore.wire import WireError, decode_delta, decode_snapshot
from tests.wire_reference import encode_delta, encode_snapshot

SERVICES = (
    Service("web", "127.0.0.1:8080", "wrr",
            (Backend("w2", "127.0.0.1:9002", 2), Backend("w1", "127.0.0.1:9001", 1))),
    Service("api", "127.0.0.2:8080", "maglev", ()),
)


def test_equal_states_give_equal_bytes_whatever_the_order():
    shuffled = (SERVICES[1], Service("web", "127.0.0.1:8080", "wrr", tuple(reversed(SERVICES[0].backends))))
    assert encode_snapshot(3, SERVICES) == encode_snapshot(3, shuffled)


def test_round_trip():
    version, services, epoch = decode_snapshot(encode_snapshot(7, SERVICES, 123))
    assert (version, epoch) == (7, 123)
    assert {s.name: {b.id for b in s.backends} for s in services} == {"web": {"w1", "w2"}, "api": set()}


@pytest.mark.parametrize("data, where", [
    (b"not json", "not JSON"),
    (b"[]", "exactly 'epoch', 'version' and 'services'"),
    (json.dumps({"version": 1, "services": []}).encode(), "exactly 'epoch', 'version' and 'services'"),
    (json.dumps({"epoch": 0, "version": -1, "services": []}).encode(), "snapshot.version"),
    (json.dumps({"epoch": -3, "version": 1, "services": []}).encode(), "snapshot.epoch"),
    (json.dumps({"epoch": 0, "version": 1, "services": [{"name": "x", "listen": "nowhere"}]}).encode(),
     "service[0].listen"),
    (json.dumps({"epoch": 0, "version": 1, "services": [{"name": "x", "listen": "127.0.0.1:1", "backends": [
        {"id": "a", "address": "127.0.0.1:2", "weight": -5}]}]}).encode(), "service[0].backend[0].weight"),
    (json.dumps({"epoch": 0, "version": 1, "services": [{"name": "x", "listen": "127.0.0.1:1",
                                                          "colour": 1}]}).encode(),
     "service[0].colour"),
])
def test_malformed_snapshots_are_refused_with_where(data, where):
    with pytest.raises(WireError, match=None) as info:
        decode_snapshot(data)
    assert where in str(info.value)


def svc(name: str, listen: str, algorithm: str, **weights: int) -> Service:
    rows = enumerate(sorted(weights.items()))
    backends = tuple(Backend(i, f"127.0.0.1:{9000 + n}", w) for n, (i, w) in rows)
    return Service(name, listen, algorithm, backends)


@pytest.mark.parametrize("old, new", [
    ((), (svc("web", "127.0.0.1:80", "wrr", a=1),)),
    ((svc("web", "127.0.0.1:80", "wrr", a=1, b=2),), (svc("web", "127.0.0.1:80", "wrr", a=1, b=3),)),
    ((svc("web", "127.0.0.1:80", "wrr", a=1, b=2),), (svc("web", "127.0.0.1:80", "maglev", b=2),)),
    ((svc("web", "127.0.0.1:80", "wrr", a=1), svc("api", "127.0.0.2:80", "p2c", x=1)),
     (svc("api", "127.0.0.2:80", "p2c", x=1, y=4),)),
    ((svc("web", "127.0.0.1:80", "wrr", a=1),), ()),
])
def test_a_delta_applied_to_its_base_gives_the_new_snapshot(old, new):
    delta = encode_delta(4, old, 5, new)
    routing = Routing.of(4, old).apply(decode_delta(delta))
    assert routing.version == 5
    assert routing.encode() == encode_snapshot(5, routing.as_services()) == encode_snapshot(5, new)
    assert len(delta) <= len(encode_snapshot(5, new)) + 120


def test_a_one_weight_change_delta_is_small_whatever_the_pool():
    many = svc("web", "127.0.0.1:80", "wrr", **{f"b{i}": 1 for i in range(1000)})
    changed = Service(many.name, many.listen, many.algorithm,
                      (Backend("b0", many.backends[0].address, 2), *many.backends[1:]))
    delta = encode_delta(1, (many,), 2, (changed,))
    assert len(delta) < 300 < len(encode_snapshot(2, (changed,)))


@pytest.mark.parametrize("data", [
    b"{}", b"not json",
    b'{"epoch": 0, "version": 2, "base": 1, "services": [], "removed_services": [], "backends": '
    b'[{"service": "ghost", "id": "a", "address": "127.0.0.1:1", "weight": 1}], "removed_backends": []}',
    b'{"epoch": 0, "version": 2, "base": 1, "services": [], "removed_services": [], "backends": '
    b'[{"service": "web", "id": "a", "address": "nowhere", "weight": 1}], "removed_backends": []}',
])
def test_malformed_deltas_are_refused(data):
    base = Routing.of(1, (svc("web", "127.0.0.1:80", "wrr", a=1),))
    with pytest.raises(WireError):
        base.apply(decode_delta(data))
    assert base.encode() == encode_snapshot(1, (svc("web", "127.0.0.1:80", "wrr", a=1),))


def _report(**changes):
    from lbcore.wire import report_request

    args = json.loads(report_request("n1", 7, 3, 5, {"web": {"w1": {"active": 1, "total": 9, "failed": 0}}},
                                     "ab" * 32))["args"]
    args.update(changes)
    return args


def test_a_report_as_a_node_writes_it_is_read_back():
    from lbcore.wire import decode_report, report_request

    report = decode_report(_report())
    assert (report.node, report.epoch, report.version, report.staleness_ms) == ("n1", 7, 3, 5)
    assert report.counters == {"web": {"w1": {"active": 1, "total": 9, "failed": 0}}}
    many = {"web": {f"b{i}": {"active": 1, "total": 2, "failed": 0} for i in range(2000)}}
    summed = json.loads(report_request("n1", 7, 3, 5, many, ""))["args"]  # past MAX_REPORT_BYTES: summed
    assert decode_report(summed).counters == {"web": {"(all)": {"active": 2000, "total": 4000, "failed": 0}}}


@pytest.mark.parametrize("changes, where", [
    ({"counters": {"web": 1}}, "counters.web: must be an object"),        # once crashed lbctl status
    ({"counters": []}, "counters must be an object"),
    ({"counters": {"web": {"w1": {"active": 1}}}}, "counters.web.w1: must be"),
    ({"counters": {"web": {"w1": {"active": "1", "total": 0, "failed": 0}}}}, "counters.web.w1"),
    ({"counters": {"web": {"w1": {"active": True, "total": 0, "failed": 0}}}}, "counters.web.w1"),
    ({"counters": {"web": {"w1": {"active": 0, "total": 0, "failed": 0, "x": 1}}}}, "counters.web.w1"),
    ({"counters": {"web": {"w1": {"active": 1 << 63, "total": 0, "failed": 0}}}}, "counters.web.w1"),
    ({"counters": {"we b": {}}}, "is not a service name"),
    ({"counters": {"web": {"w 1": {"active": 0, "total": 0, "failed": 0}}}}, "is not a backend id"),
    ({"counters": {"web": {f"b{i}": {"active": 0, "total": 0, "failed": 0} for i in range(501)}}},
     "more than 500 rows"),
    ({"node": "a node"}, "node: "),
    ({"node": 7}, "node: must be a string"),
    ({"version": True}, "version"),
    ({"version": -2}, "version"),
    ({"epoch": "7"}, "epoch"),
    ({"staleness_ms": -1}, "staleness_ms"),
    ({"digest": "d1"}, "digest"),
    ({"digest": 5}, "digest"),
])
def test_a_malformed_report_is_refused_with_what_is_wrong(changes, where):
    from lbcore.wire import decode_report

    with pytest.raises(WireError) as info:
        decode_report(_report(**changes))
    assert where in str(info.value)
