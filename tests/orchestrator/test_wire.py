"""The snapshot wire format: canonical bytes, and refusals that name the fault."""
from __future__ import annotations

import json

import pytest

from lbcore.config import Backend, Service
from lbcore.wire import WireError, decode_snapshot, encode_snapshot

SERVICES = (
    Service("web", "127.0.0.1:8080", "wrr",
            (Backend("w2", "127.0.0.1:9002", 2), Backend("w1", "127.0.0.1:9001", 1))),
    Service("api", "127.0.0.2:8080", "maglev", ()),
)


def test_equal_states_give_equal_bytes_whatever_the_order():
    shuffled = (SERVICES[1], Service("web", "127.0.0.1:8080", "wrr", tuple(reversed(SERVICES[0].backends))))
    assert encode_snapshot(3, SERVICES) == encode_snapshot(3, shuffled)


def test_round_trip():
    version, services = decode_snapshot(encode_snapshot(7, SERVICES))
    assert version == 7
    assert {s.name: {b.id for b in s.backends} for s in services} == {"web": {"w1", "w2"}, "api": set()}


@pytest.mark.parametrize("data, where", [
    (b"not json", "not JSON"),
    (b"[]", "exactly 'version' and 'services'"),
    (json.dumps({"version": -1, "services": []}).encode(), "snapshot.version"),
    (json.dumps({"version": 1, "services": [{"name": "x", "listen": "nowhere"}]}).encode(),
     "service[0].listen"),
    (json.dumps({"version": 1, "services": [{"name": "x", "listen": "127.0.0.1:1", "backends": [
        {"id": "a", "address": "127.0.0.1:2", "weight": -5}]}]}).encode(), "service[0].backend[0].weight"),
    (json.dumps({"version": 1, "services": [{"name": "x", "listen": "127.0.0.1:1", "colour": 1}]}).encode(),
     "service[0].colour"),
])
def test_malformed_snapshots_are_refused_with_where(data, where):
    with pytest.raises(WireError, match=None) as info:
        decode_snapshot(data)
    assert where in str(info.value)
