"""The numpy dtypes must have exactly the sizes and offsets of the C header."""
from __future__ import annotations

import pytest

from lbcore import layout
from lbcore._layout import ffi


@pytest.mark.parametrize("struct", sorted(layout.STRUCTS))
def test_dtype_matches_c_struct(struct):
    dtype = layout.STRUCTS[struct]
    assert dtype.itemsize == ffi.sizeof(struct)
    c_fields = {name for name, _ in ffi.typeof(struct).fields}
    assert c_fields == set(dtype.names)
    for name in dtype.names:
        assert dtype.fields[name][1] == ffi.offsetof(struct, name), name
        assert dtype.fields[name][0].itemsize == ffi.sizeof(ffi.typeof(struct).fields[
            [f for f, _ in ffi.typeof(struct).fields].index(name)][1].type), name


def test_region_offsets_match_c():
    active_size = layout.MAX_WORKERS * layout.MAX_BACKENDS * 4
    assert layout.OFF_WORKER_WAITING == layout.OFF_WORKER_ACTIVE + active_size
    assert layout.OFF_BUFFERS == ffi.sizeof("flc_control") + layout.MAX_BACKENDS * 64 \
        + layout.MAX_SERVICES * 64 + layout.MAX_WORKERS * 64 + layout.MAX_WORKERS * layout.MAX_BACKENDS * 4 \
        + layout.MAX_WORKERS * layout.MAX_SERVICES * 4
    assert layout.BUFFER_SIZE == layout.BUF_OFF_TABLE + layout.TABLE_POOL * 4
    assert layout.SEGMENT_SIZE == layout.OFF_BUFFERS + 2 * layout.BUFFER_SIZE


def test_counters_do_not_share_cache_lines():
    # workers on different cores update different backends' counters
    assert layout.COUNTER.itemsize == 64
    assert layout.OFF_COUNTERS % 64 == 0
    assert layout.WORKER_STATE.itemsize == 64


def test_maglev_size_is_prime():
    n = layout.MAGLEV_SIZE
    assert n >= 65537 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def test_ejection_state_fits_the_same_lines():
    # passive ejection took the counters' and service states' padding: one
    # cache line each still, and a layout version of its own
    assert layout.LAYOUT_VERSION >= 4
    assert layout.SERVICE_STATE.itemsize == 64
    assert {"consecutive_failures", "ejections", "ejected_until_ms",
            "local_down"} <= set(layout.COUNTER.names)
    assert {"panics", "eject_lock"} <= set(layout.SERVICE_STATE.names)
    assert {"consecutive_failures", "base_ejection_ms", "max_ejection_ms",
            "max_ejection_percent"} <= set(layout.SERVICE.names)
    assert "source_ip" in layout.IMAGE_HEADER.names


def test_lifecycle_state_fits_the_same_lines():
    # the backend lifecycle took the padding again: the counter (read by
    # every pick) and the service state stay one cache line each
    assert layout.LAYOUT_VERSION == 5
    assert layout.COUNTER.itemsize == 64 and layout.SERVICE_STATE.itemsize == 64
    assert "ramp_start_ms" in layout.COUNTER.names
    assert {"waiting", "queued", "queue_timeouts", "rejected"} <= set(layout.SERVICE_STATE.names)
    assert layout.SERVICE_STATE.fields["waiting"][1] % 8 == 0
    assert {"slow_start_ms", "slow_start_min_permille", "slow_start_exponent", "max_queue",
            "queue_timeout_ms", "closing_count"} <= set(layout.SERVICE.names)
    assert layout.SERVICE.itemsize % 8 == 0 and layout.SERVICE.fields["slow_start_exponent"][1] % 8 == 0
    assert {"drain", "max_conns"} <= set(layout.BACKEND.names) and layout.BACKEND.itemsize == 72
    assert layout.DRAIN_OF_STATE == {"active": 0, "draining": 1, "closing": 2}
