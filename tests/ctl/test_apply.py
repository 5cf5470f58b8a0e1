"""lbctl apply against a real control plane and store: a conflict part-way
stops the apply and says what is applied and what is not."""
from __future__ import annotations

import json

import pytest

from ctl.apply import apply_file
from lbcore.config import parse_config
from orchestrator.control import ControlPlane
from orchestrator.store import SqliteStore

DESIRED = """
[node]
id = "x"

[[service]]
name = "web"
listen = "127.0.0.1:18080"

[[service.backend]]
id = "w1"
address = "127.0.0.1:9001"
weight = 3

[[service.backend]]
id = "w2"
address = "127.0.0.1:9002"
weight = 2
"""


def test_a_conflict_part_way_reports_what_was_applied(tmp_path):
    store = SqliteStore(tmp_path / "state.db")
    plane = ControlPlane(store)
    store.put_policy("web", "127.0.0.1:18080", "wrr", 0)
    store.add_backend("web", "w1", "127.0.0.1:9001", 1, 0)
    store.add_backend("web", "w2", "127.0.0.1:9002", 1, 0)
    writes = 0

    def call(verb: str, args: dict) -> object:
        nonlocal writes
        if verb.startswith("backend.set"):
            writes += 1
            if writes == 1:  # another operator changes w2 between the diff and its write
                store.set_weight("web", "w2", 5, None)
        reply = plane.answer(json.dumps({"verb": verb, "args": args}).encode())[1]
        if not reply["ok"]:
            raise RuntimeError(reply["error"]["message"])
        return reply["result"]

    out: list[str] = []
    try:
        with pytest.raises(RuntimeError, match="expected version 1, current version 2"):
            apply_file(parse_config(DESIRED).services, call, False, out.append)
        assert out[-1] == ("stopped at change 2 of 2 (~ backend web/w2 weight 1 -> 2); "
                           "the 1 before it are applied (version 5)")
        weights = {b.id: b.weight for b in store.read().backends}
        assert weights == {"w1": 3, "w2": 5}  # w1 applied; w2 keeps the other operator's write
    finally:
        store.close()
