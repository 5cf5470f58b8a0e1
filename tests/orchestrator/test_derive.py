"""The single writer's audit: a published routing that differs from a full
derivation from the store is corrected, as a new version."""
from __future__ import annotations

import json

import pytest

from lbcore.config import Backend, Service
from lbcore.routing import Routing
from lbcore.wire import decode_delta
from orchestrator.derive import Deriver, InconsistentSnapshotError, derive_in_full
from orchestrator.store import SqliteStore

WEB = Service("web", "127.0.0.1:8080", "wrr", (Backend("w1", "127.0.0.1:9001", 2),))


def test_an_audit_that_finds_a_difference_republishes_the_derivation(tmp_path):
    store = SqliteStore(tmp_path / "state.db")
    try:
        store.seed([WEB])
        deriver = Deriver(store)
        deriver.next()
        deriver.audit()  # as derived: nothing to say
        held = deriver.routing
        # what a routing that drifted from the store looks like (held and served)
        drifted = Routing.of(held.version, [Service("web", "127.0.0.1:8080", "wrr",
                                                    (Backend("w9", "127.0.0.1:9009", 1),))], held.epoch)
        deriver.routing = drifted
        with pytest.raises(InconsistentSnapshotError, match="differs from a full derivation"):
            deriver.audit()
        routing, delta = deriver.next()
        assert routing.version == held.version + 1 == store.read().version
        assert routing.encode() == derive_in_full(store.read()).encode()
        # a node holding the drifted routing reaches the derivation with the delta
        assert drifted.apply(decode_delta(delta.encode())).encode() == routing.encode()
        assert json.loads(routing.encode())["services"][0]["backends"][0]["id"] == "w1"
    finally:
        store.close()
