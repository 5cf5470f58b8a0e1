"""numpy views of the shared-memory layout declared in
``includes/fulcrum_layout.h``.

The dtypes below must have exactly the C sizes and offsets; a test compares
them field by field with the compiled cffi module (``lbcore._layout``), which
is also how Python reaches the atomic accessors.
"""
from __future__ import annotations

import numpy as np

from lbcore._layout import lib

MAGIC = lib.FLC_MAGIC
LAYOUT_VERSION = lib.FLC_LAYOUT_VERSION
MAX_SERVICES = lib.FLC_MAX_SERVICES
MAX_BACKENDS = lib.FLC_MAX_BACKENDS
MAX_WORKERS = lib.FLC_MAX_WORKERS
TABLE_POOL = lib.FLC_TABLE_POOL
MAGLEV_SIZE = lib.FLC_MAGLEV_SIZE
NAME_LEN = lib.FLC_NAME_LEN

SEGMENT_SIZE = lib.flc_segment_size()
OFF_BUFFERS = lib.flc_off_buffers()
BUFFER_SIZE = lib.flc_buffer_size()
OFF_WORKER_ACTIVE = lib.flc_off_worker_active()
OFF_WORKER_WAITING = lib.flc_off_worker_waiting()

CONTROL = np.dtype([
    ("magic", "<u4"), ("layout_version", "<u4"), ("generation", "<u8"),
    ("owner_pid", "<i4"), ("draining", "<u4"),
    ("node_id", "S48"), ("pad", "u1", (56,)),
])

COUNTER = np.dtype([
    ("active", "<i8"), ("total", "<u8"), ("failed", "<u8"),
    ("bytes_to_backend", "<u8"), ("bytes_to_client", "<u8"),
    ("consecutive_failures", "<u4"), ("ejections", "<u4"), ("ejected_until_ms", "<u8"),
    ("local_down", "<u4"), ("ramp_start_ms", "<u4"),
])

SERVICE_STATE = np.dtype([
    ("rr_cursor", "<u8"), ("accepted", "<u8"), ("panics", "<u8"),
    ("eject_lock", "<u4"), ("pad", "<u4"),
    ("waiting", "<i8"), ("queued", "<u8"), ("queue_timeouts", "<u8"), ("rejected", "<u8"),
])

WORKER_STATE = np.dtype([
    ("pid", "<i4"), ("listening", "<u4"), ("generation", "<u8"),
    ("accepted", "<u8"), ("active", "<i8"), ("accept_pauses", "<u8"),
    ("pad", "<u8", (3,)),
])

IMAGE_HEADER = np.dtype([
    ("magic", "<u4"), ("layout_version", "<u4"), ("seq", "<u8"),
    ("snapshot_version", "<u8"), ("checksum", "<u4"),
    ("n_services", "<u4"), ("n_backends", "<u4"), ("table_used", "<u4"),
    ("connect_timeout_ms", "<u4"), ("idle_timeout_ms", "<u4"),
    ("retries", "<u4"), ("relay_mode", "<u4"), ("fin_timeout_ms", "<u4"), ("source_ip", "<u4"),
    ("published_ns", "<u8"),
])

SERVICE = np.dtype([
    ("name", "S48"), ("listen_ip", "<u4"), ("listen_port", "<u2"),
    ("algorithm", "u1"), ("active", "u1"),
    ("backend_first", "<u4"), ("backend_count", "<u4"),
    ("schedule_offset", "<u4"), ("schedule_len", "<u4"),
    ("maglev_offset", "<u4"), ("maglev_len", "<u4"),
    ("eligible_count", "<u4"),
    ("consecutive_failures", "<u4"), ("base_ejection_ms", "<u4"), ("max_ejection_ms", "<u4"),
    ("max_ejection_percent", "<u4"),
    ("slow_start_ms", "<u4"), ("slow_start_min_permille", "<u4"), ("max_queue", "<u4"),
    ("slow_start_exponent", "<f8"), ("queue_timeout_ms", "<u4"), ("closing_count", "<u4"),
])

BACKEND = np.dtype([
    ("id", "S48"), ("ip", "<u4"), ("port", "<u2"), ("weight", "<u2"),
    ("slot", "<u4"), ("service_slot", "<u4"),
    ("eligible", "u1"), ("drain", "u1"), ("pad", "u1", (2,)), ("max_conns", "<u4"),
])

# flc_backend.drain, from a backend's state in a snapshot
DRAIN_OF_STATE = {"active": lib.FLC_DRAIN_ACTIVE, "draining": lib.FLC_DRAIN_DRAINING,
                  "closing": lib.FLC_DRAIN_CLOSING}
STATE_OF_DRAIN = {v: k for k, v in DRAIN_OF_STATE.items()}

# numpy dtype name -> C struct name, for the layout test and for cffi casts
STRUCTS = {
    "flc_control": CONTROL,
    "flc_counter": COUNTER,
    "flc_service_state": SERVICE_STATE,
    "flc_worker_state": WORKER_STATE,
    "flc_image_header": IMAGE_HEADER,
    "flc_service": SERVICE,
    "flc_backend": BACKEND,
}

OFF_COUNTERS = CONTROL.itemsize
OFF_SERVICE_STATE = OFF_COUNTERS + MAX_BACKENDS * COUNTER.itemsize
OFF_WORKERS = OFF_SERVICE_STATE + MAX_SERVICES * SERVICE_STATE.itemsize
BUF_OFF_SERVICES = IMAGE_HEADER.itemsize
BUF_OFF_BACKENDS = BUF_OFF_SERVICES + MAX_SERVICES * SERVICE.itemsize
BUF_OFF_TABLE = BUF_OFF_BACKENDS + MAX_BACKENDS * BACKEND.itemsize



def ramp_elapsed_ms(stamps: np.ndarray, now_ms: int) -> np.ndarray:
    """Per ramp_start_ms stamp (flc_counter): the ms since it, as the
    workers read the 32-bit stamp (wrapping; one ahead of ``now_ms``, on
    ramp_clock, has just begun: 0)."""
    elapsed = (np.int64(now_ms) - stamps.astype(np.int64)) % (1 << 32)
    elapsed[elapsed >= 1 << 31] = 0
    return elapsed
