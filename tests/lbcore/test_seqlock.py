"""The image seqlock: a reader that is lapped by the publisher notices,
and every read it accepts is exactly one published image, never a mix."""
from __future__ import annotations

import threading

import numpy as np

from lbcore import layout
from lbcore.balance.probe import read_backends_under_seqlock
from lbcore.config import Backend, Service
from lbcore.image import Limits, build_image, publish_image
from lbcore.slots import SlotMap

BACKENDS = 4000
LIMITS = Limits(2000, 300_000, 3)


def images(count: int) -> list:
    """Snapshots of the same backends whose every row differs by port."""
    service_slots: SlotMap[str] = SlotMap(layout.MAX_SERVICES)
    backend_slots: SlotMap[tuple[str, str]] = SlotMap(layout.MAX_BACKENDS)
    service_slots.assign(["svc"], lambda slot: True)
    backend_slots.assign((("svc", f"b{i}") for i in range(BACKENDS)), lambda slot: True)
    out = []
    for k in range(count):
        backends = tuple(Backend(f"b{i}", f"127.0.0.1:{1000 + k * 7 + i % 5}", 1) for i in range(BACKENDS))
        out.append(build_image([Service("svc", "127.0.0.1:9", "wrr", backends)], LIMITS, k + 1,
                                  service_slots, backend_slots))
    return out


def test_reads_that_validate_are_never_torn(published):
    candidates = images(6)
    width = BACKENDS * layout.BACKEND.itemsize
    known = {image.backends.tobytes() for image in candidates}
    publish_image(published.segment, candidates[0])
    stop = threading.Event()

    def publisher() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            publish_image(published.segment, candidates[k % len(candidates)])

    thread = threading.Thread(target=publisher)
    thread.start()
    out = np.zeros((400, width), dtype=np.uint8)
    try:
        validated, torn = 0, 0
        for _ in range(50):  # bounded: until both outcomes were seen
            v, t = read_backends_under_seqlock(published.segment.base_address, 2000, out)
            validated, torn = validated + v, torn + t
            assert all(out[i].tobytes() in known for i in range(v)), "a validated read was torn"
            if validated >= 100 and torn >= 10:
                break
    finally:
        stop.set()
        thread.join(timeout=30)
    # the race was really run: readers were lapped, and noticed it
    assert torn >= 10, f"only {torn} torn reads seen: the test did not exercise the race"
    assert validated >= 100
