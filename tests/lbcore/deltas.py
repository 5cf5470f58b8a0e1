"""Random deltas against the services "web" and "api" of a routing, for the
tests of what a node builds from them."""
from __future__ import annotations

from typing import Any

import hypothesis.strategies as st

from lbcore.routing import Routing
from lbcore.wire import Delta

ALGORITHMS = ["wrr", "least_conn", "p2c", "maglev"]
IDS = [f"b{i}" for i in range(8)]


@st.composite
def delta_rows(draw: Any, kinds: tuple[str, ...] = ("weight", "weight", "address", "add", "remove",
                                                     "algorithm")) -> dict[str, Any]:
    """One change: by default mostly weights and addresses of existing ids
    (rows only), sometimes an id that comes or goes, or an algorithm."""
    return {"kind": draw(st.sampled_from(kinds)), "service": draw(st.sampled_from(["web", "api"])),
            "id": draw(st.sampled_from(IDS)), "weight": draw(st.integers(0, 9)),
            "port": draw(st.integers(9000, 9009)), "algorithm": draw(st.sampled_from(ALGORITHMS))}


def delta_of(held: Routing, rows: list[dict[str, Any]]) -> Delta:
    """The delta to the next version of ``held`` that ``rows`` describe (a
    row naming a (service, id) already named is skipped)."""
    delta = Delta(held.version + 1, held.version)
    touched: set[tuple[str, str]] = set()
    for row in rows:
        service = held.services[row["service"]]
        if (row["service"], row["id"]) in touched:
            continue
        touched.add((row["service"], row["id"]))
        present = row["id"] in service.backends
        if row["kind"] == "remove" and present:
            delta.removed_backends.append({"service": row["service"], "id": row["id"]})
        elif row["kind"] == "algorithm" and row["service"] not in {s["name"] for s in delta.services}:
            delta.services.append({"name": service.name, "listen": service.listen,
                                   "algorithm": row["algorithm"]})
        elif row["kind"] == "add" or present:
            address = f"127.0.0.1:{row['port']}" if row["kind"] == "address" or not present \
                else service.backends[row["id"]].address
            delta.backends.append({"service": row["service"], "id": row["id"], "address": address,
                                   "weight": row["weight"]})
    return delta
