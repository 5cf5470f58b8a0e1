"""A node's shared-memory segment: create, attach, typed views.

The agent creates ``/dev/shm/fulcrum-<node id>`` and unlinks it when it stops;
workers and ``lbproxy stats`` attach to it by name. The file is opened
directly rather than through ``multiprocessing.shared_memory`` so that no
resource tracker in any attaching process can unlink it behind the agent.
"""
from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass

import numpy as np

from lbcore import layout
from lbcore._layout import ffi, lib

SHM_DIR = "/dev/shm"


class SegmentError(Exception):
    """The segment cannot be created or attached; the message says why."""


def segment_name(node_id: str) -> str:
    return f"fulcrum-{node_id}"


def segment_path(node_id: str) -> str:
    return os.path.join(SHM_DIR, segment_name(node_id))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class BufferViews:
    """One image buffer as numpy arrays over the shared memory."""

    header: np.ndarray     # shape (), IMAGE_HEADER
    services: np.ndarray   # MAX_SERVICES, SERVICE
    backends: np.ndarray   # MAX_BACKENDS, BACKEND
    table: np.ndarray      # TABLE_POOL, uint32
    header_ptr: object     # cffi flc_image_header *


class Segment:
    """The mapped segment with numpy views of every region."""

    def __init__(self, path: str, mm: mmap.mmap, owner: bool) -> None:
        self.path = path
        self.owner = owner
        self._mm = mm
        self._base = ffi.from_buffer(mm)
        self.control_ptr = ffi.cast("flc_control *", self._base)
        self.control = self._array(0, layout.CONTROL, None)
        self.counters = self._array(layout.OFF_COUNTERS, layout.COUNTER, layout.MAX_BACKENDS)
        self.service_states = self._array(
            layout.OFF_SERVICE_STATE, layout.SERVICE_STATE, layout.MAX_SERVICES)
        self.workers = self._array(layout.OFF_WORKERS, layout.WORKER_STATE, layout.MAX_WORKERS)
        self.worker_active = self._array(
            layout.OFF_WORKER_ACTIVE, np.dtype("<i4"), layout.MAX_WORKERS * layout.MAX_BACKENDS,
        ).reshape(layout.MAX_WORKERS, layout.MAX_BACKENDS)
        self._buffers = [self._buffer_views(i) for i in (0, 1)]

    def _array(self, offset: int, dtype: np.dtype, count: int | None) -> np.ndarray:
        n = 1 if count is None else count
        array = np.frombuffer(self._mm, dtype=dtype, count=n, offset=offset)
        return array[0] if count is None else array

    def _buffer_views(self, index: int) -> BufferViews:
        base = layout.OFF_BUFFERS + index * layout.BUFFER_SIZE
        return BufferViews(
            header=self._array(base, layout.IMAGE_HEADER, 1),
            services=self._array(base + layout.BUF_OFF_SERVICES, layout.SERVICE, layout.MAX_SERVICES),
            backends=self._array(base + layout.BUF_OFF_BACKENDS, layout.BACKEND, layout.MAX_BACKENDS),
            table=self._array(base + layout.BUF_OFF_TABLE, np.dtype("<u4"), layout.TABLE_POOL),
            header_ptr=ffi.cast("flc_image_header *", self._base + base),
        )

    @property
    def base_pointer(self) -> object:
        """The segment's first byte (cffi), for the compiled accessors."""
        return self._base

    @property
    def base_address(self) -> int:
        return int(ffi.cast("uintptr_t", self._base))

    def generation(self) -> int:
        return lib.flc_load_acquire_u64(ffi.addressof(self.control_ptr, "generation"))

    def buffer(self, generation: int) -> BufferViews:
        return self._buffers[generation & 1]

    def counter_ptr(self, slot: int) -> object:
        return ffi.cast("flc_counter *", self._base + layout.OFF_COUNTERS) + slot

    def close(self) -> None:
        # numpy views keep exports of the mmap alive; drop ours before closing
        self.control = self.counters = self.service_states = None  # type: ignore[assignment]
        self.workers = self.worker_active = None  # type: ignore[assignment]
        self._buffers = []
        self.control_ptr = self._base = None
        try:
            self._mm.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes with the process

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    @classmethod
    def create(cls, node_id: str) -> Segment:
        """Create the node's segment; refuse if a live agent owns the name."""
        path = segment_path(node_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            owner = cls.owner_of(path)
            if _pid_alive(owner):
                raise SegmentError(f"node {node_id!r} is already running (agent pid {owner})") from None
            os.unlink(path)  # left by an agent that was killed
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, layout.SEGMENT_SIZE)
            mm = mmap.mmap(fd, layout.SEGMENT_SIZE)
        finally:
            os.close(fd)
        segment = cls(path, mm, owner=True)
        segment.control["magic"] = layout.MAGIC
        segment.control["layout_version"] = layout.LAYOUT_VERSION
        segment.control["owner_pid"] = os.getpid()
        segment.control["node_id"] = node_id.encode()
        return segment

    @staticmethod
    def owner_of(path: str) -> int:
        try:
            with open(path, "rb") as f:
                head = f.read(layout.CONTROL.itemsize)
        except OSError:
            return 0
        if len(head) < layout.CONTROL.itemsize:
            return 0
        control = np.frombuffer(head, dtype=layout.CONTROL)[0]
        if int(control["magic"]) != layout.MAGIC:
            return 0  # not a segment of ours (garbage, or another program's): owned by no agent
        return int(control["owner_pid"])

    @classmethod
    def attach(cls, node_id: str) -> Segment:
        """Map an existing segment (for status tools and tests)."""
        path = segment_path(node_id)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise SegmentError(f"node {node_id!r} is not running (no {path})") from None
            raise SegmentError(f"{path}: {exc.strerror}") from None
        try:
            mm = mmap.mmap(fd, layout.SEGMENT_SIZE)
        finally:
            os.close(fd)
        segment = cls(path, mm, owner=False)
        if int(segment.control["magic"]) != layout.MAGIC:
            segment.close()
            raise SegmentError(f"{path}: not a Fulcrum segment (bad magic)")
        if int(segment.control["layout_version"]) != layout.LAYOUT_VERSION:
            version = int(segment.control["layout_version"])
            segment.close()
            raise SegmentError(f"{path}: layout version {version}, this build reads {layout.LAYOUT_VERSION}")
        return segment
