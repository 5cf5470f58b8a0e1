"""The node's counters as data (``node_stats``) and as a table
(``format_stats``), read from shared memory without asking the workers."""
from __future__ import annotations

import ipaddress
from typing import Any

from lbcore import layout
from lbcore.balance import ALGORITHMS
from lbcore.segment import Segment
from lbcore.snapshot import read_snapshot

ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}
COUNTER_FIELDS = ("active", "total", "failed", "bytes_to_backend", "bytes_to_client")


def _address(ip: int, port: int) -> str:
    return f"{ipaddress.IPv4Address(int(ip).to_bytes(4, 'little'))}:{int(port)}"


def node_stats(segment: Segment) -> dict[str, Any]:
    image = read_snapshot(segment)
    workers = [
        {"index": i, "pid": int(w["pid"]), "accepted": int(w["accepted"]), "active": int(w["active"]),
         "generation": int(w["generation"]), "accept_pauses": int(w["accept_pauses"])}
        for i, w in enumerate(segment.workers) if int(w["pid"]) != 0
    ]
    services = []
    for slot, row in enumerate(image.services):
        if not row["active"]:
            continue
        first, count = int(row["backend_first"]), int(row["backend_count"])
        backends = []
        for b in image.backends[first:first + count]:
            counter = segment.counters[int(b["slot"])]
            backends.append({
                "id": b["id"].decode(), "address": _address(b["ip"], b["port"]),
                "weight": int(b["weight"]), "eligible": bool(b["eligible"]), "slot": int(b["slot"]),
                **{name: int(counter[name]) for name in COUNTER_FIELDS},
            })
        services.append({
            "name": row["name"].decode(), "slot": slot,
            "listen": _address(row["listen_ip"], row["listen_port"]),
            "algorithm": ALGORITHM_NAMES.get(int(row["algorithm"]), "?"),
            "accepted": int(segment.service_states[slot]["accepted"]),
            "backends": backends,
        })
    return {
        "node": bytes(segment.control["node_id"]).decode(),
        "version": image.version,
        "generation": segment.generation(),
        "draining": bool(segment.control["draining"]),
        "checksum": image.checksum,
        "workers": workers,
        "services": services,
        "layout_version": layout.LAYOUT_VERSION,
    }


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"node {stats['node']}  snapshot version {stats['version']}  "
             f"workers {len(stats['workers'])}"]
    for w in stats["workers"]:
        lines.append(f"  worker {w['index']}  pid {w['pid']}  accepted {w['accepted']}  "
                     f"active {w['active']}  accept pauses {w['accept_pauses']}")
    header = f"    {'backend':<20} {'address':<22} {'weight':>6} {'elig':>4} " + \
        " ".join(f"{name:>16}" for name in COUNTER_FIELDS)
    for s in stats["services"]:
        lines.append(f"service {s['name']}  listen {s['listen']}  algorithm {s['algorithm']}  "
                     f"accepted {s['accepted']}")
        lines.append(header)
        for b in s["backends"]:
            lines.append(f"    {b['id']:<20} {b['address']:<22} {b['weight']:>6} "
                         f"{'yes' if b['eligible'] else 'no':>4} "
                         + " ".join(f"{b[name]:>16}" for name in COUNTER_FIELDS))
    return "\n".join(lines)
