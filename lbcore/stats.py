"""The node's counters as data (``node_stats``) and as a table
(``format_stats``), read from shared memory without asking the workers."""
from __future__ import annotations

import socket
import time
from typing import Any

import numpy as np

from lbcore import layout
from lbcore.balance import ALGORITHMS
from lbcore.ejection import monotonic_ms
from lbcore.image import Image, read_image
from lbcore.layout import STATE_OF_DRAIN, ramp_elapsed_ms
from lbcore.segment import Segment
from lbcore.wire import MAX_DRAINING_REPORTED, QUEUE_FIELDS, REPORT_FIELDS, SUMMED, summed_counters

ALGORITHM_OF_CODE = {v: k for k, v in ALGORITHMS.items()}  # as the image holds it
COUNTER_FIELDS = ("active", "total", "failed", "bytes_to_backend", "bytes_to_client")


def _address(ip: int, port: int) -> str:
    return f"{socket.inet_ntoa(int(ip).to_bytes(4, 'little'))}:{int(port)}"


def _service_backends(segment: Segment, image: Image,
                      row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(backend rows, their counters) of one service, a column at a time."""
    first, count = int(row["backend_first"]), int(row["backend_count"])
    rows = image.backends[first:first + count]
    return rows, segment.counters[rows["slot"]]


def node_stats(segment: Segment) -> dict[str, Any]:
    image = read_image(segment)
    workers = [
        {"index": i, "pid": int(w["pid"]), "accepted": int(w["accepted"]), "active": int(w["active"]),
         "generation": int(w["generation"]), "accept_pauses": int(w["accept_pauses"])}
        for i, w in enumerate(segment.workers) if int(w["pid"]) != 0
    ]
    services = []
    now_ms = monotonic_ms()
    for slot, row in enumerate(image.services):
        if not row["active"]:
            continue
        rows, counters = _service_backends(segment, image, row)
        columns = [counters[name].tolist() for name in COUNTER_FIELDS]
        # passive ejection: ms of ejection left (0: not ejected), held down by this node's probes
        ejected_ms = np.maximum(counters["ejected_until_ms"].astype(np.int64) - now_ms, 0).tolist()
        local_down = (counters["local_down"] != 0).tolist()
        ramp_ms = ramp_ms_left(counters["ramp_start_ms"], int(row["slow_start_ms"]), now_ms).tolist()
        states = [STATE_OF_DRAIN.get(d, "?") for d in rows["drain"].tolist()]
        backends = [
            {"id": i.decode(), "address": _address(ip, port), "weight": weight, "eligible": bool(eligible),
             "slot": slot, **dict(zip(COUNTER_FIELDS, values, strict=True)),
             "ejected_ms": ejected, "local_down": down, "max_conns": max_conns, "state": state,
             "ramp_ms_left": ramp}
            for i, ip, port, weight, eligible, slot, ejected, down, max_conns, state, ramp, *values in zip(
                rows["id"].tolist(), rows["ip"].tolist(), rows["port"].tolist(), rows["weight"].tolist(),
                rows["eligible"].tolist(), rows["slot"].tolist(), ejected_ms, local_down,
                rows["max_conns"].tolist(), states, ramp_ms, *columns, strict=True)]
        state = segment.service_states[slot]
        services.append({
            "name": row["name"].decode(), "slot": slot,
            "listen": _address(row["listen_ip"], row["listen_port"]),
            "algorithm": ALGORITHM_OF_CODE.get(int(row["algorithm"]), "?"),
            "accepted": int(state["accepted"]),
            "panics": int(state["panics"]),
            **{name: int(state[name]) for name in QUEUE_FIELDS},
            "backends": backends,
        })
    return {
        "node": bytes(segment.control["node_id"]).decode(),
        "version": image.version,
        "snapshot_age_ms": max(0, time.monotonic_ns() - image.published_ns) // 1_000_000,
        "generation": segment.generation(),
        "draining": bool(segment.control["draining"]),
        "checksum": image.checksum,
        "workers": workers,
        "services": services,
        "layout_version": layout.LAYOUT_VERSION,
    }


def ramp_ms_left(stamps: np.ndarray, window_ms: int, now_ms: int) -> np.ndarray:
    """Per ramp_start_ms stamp: the ms of slow start left at ``now_ms``
    (0: not ramping), on the workers' reading of the 32-bit stamp."""
    if not window_ms:
        return np.zeros(len(stamps), dtype=np.int64)
    return np.where(stamps != 0, np.maximum(window_ms - ramp_elapsed_ms(stamps, now_ms), 0), 0)


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"node {stats['node']}  snapshot version {stats['version']} "
             f"(published {stats['snapshot_age_ms']} ms ago)  workers {len(stats['workers'])}"]
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
        lines.extend(_ejection_lines(s))
        lines.extend(_lifecycle_lines(s))
    return "\n".join(lines)


def _lifecycle_lines(service: dict[str, Any]) -> list[str]:
    """A service's backends in drain or slow start and its queue, when it
    has any of them."""
    lines = []
    backends = service["backends"]
    draining = [f"{b['id']} ({b['active']} open)" for b in backends if b.get("state") == "draining"]
    closing = [f"{b['id']} ({b['active']} open)" for b in backends if b.get("state") == "closing"]
    ramping = [f"{b['id']} ({b['ramp_ms_left']} ms left)" for b in backends if b.get("ramp_ms_left")]
    full = [f"{b['id']} ({b['active']}/{b['max_conns']})" for b in backends
            if b.get("max_conns") and b["active"] >= b["max_conns"]]
    if draining:
        lines.append(f"    draining: {', '.join(draining)}")
    if closing:
        lines.append(f"    closing (drain timed out, connections reset): {', '.join(closing)}")
    if ramping:
        lines.append(f"    slow start: {', '.join(ramping)}")
    if full:
        lines.append(f"    at max_conns: {', '.join(full)}")
    if any(service.get(name) for name in QUEUE_FIELDS):
        lines.append(f"    queue: {service['waiting']} waiting, {service['queued']} queued, "
                     f"{service['queue_timeouts']} timed out, {service['rejected']} rejected")
    return lines


def service_counters(segment: Segment, image: Image | None = None) -> dict[str, dict[str, int]]:
    """Per active service of ``image`` (default: read back, checked): its
    queue's counters on this node (waiting now, queued, timed out,
    rejected)."""
    if image is None:
        image = read_image(segment)
    return {row["name"].decode(): {name: int(segment.service_states[slot][name]) for name in QUEUE_FIELDS}
            for slot, row in enumerate(image.services) if row["active"]}


def _ejection_lines(service: dict[str, Any]) -> list[str]:
    """What passive ejection does to a service here, when it does anything:
    the backends ejected (time left), held down by this node's probes, and
    the connections routed in panic."""
    lines = []
    ejected = [f"{b['id']} ({b['ejected_ms']} ms left)" for b in service["backends"] if b.get("ejected_ms")]
    down = [b["id"] for b in service["backends"] if b.get("local_down")]
    if ejected:
        lines.append(f"    ejected: {', '.join(ejected)}")
    if down:
        lines.append(f"    down here: {', '.join(down)}")
    if service.get("panics"):
        lines.append(f"    panics: {service['panics']} connections routed while every backend left "
                     "was ejected or down here")
    return lines



def report_counters(segment: Segment, max_backends: int,
                    image: Image | None = None) -> dict[str, dict[str, dict[str, int]]]:
    """What a node reports to the control plane: per service and backend,
    or per service only (as backend "(all)") past ``max_backends``, so that
    a report stays one small message whatever the pool; a summed report
    still carries the own rows of backends in drain (draining or closing),
    up to MAX_DRAINING_REPORTED in all: their open connections are how the
    control plane sees a drain end. ``image``: the image published (the
    agent's own; else it is read back, checked)."""
    if image is None:
        image = read_image(segment)
    active = [row for row in image.services if row["active"]]
    summed = sum(int(row["backend_count"]) for row in active) > max_backends
    report = {}
    draining_left = MAX_DRAINING_REPORTED
    for row in active:
        rows, counters = _service_backends(segment, image, row)
        if summed:
            per_backend = {SUMMED: summed_counters({k: counters[k].tolist() for k in REPORT_FIELDS})}
            in_drain = np.flatnonzero(rows["drain"] != 0)[:draining_left]
            draining_left -= len(in_drain)
            for i in in_drain.tolist():
                per_backend[rows["id"][i].decode()] = {k: int(counters[k][i]) for k in REPORT_FIELDS}
        else:
            columns = [counters[k].tolist() for k in REPORT_FIELDS]
            per_backend = {i.decode(): dict(zip(REPORT_FIELDS, values, strict=True))
                           for i, *values in zip(rows["id"].tolist(), *columns, strict=True)}
        report[row["name"].decode()] = per_backend
    return report
