"""cffi (API mode) build of ``lbcore._layout``: the shared-memory structs and
their atomic accessors for the Python side, from the same C headers the
workers compile against. Run by setup.py through ``cffi_modules``."""
from __future__ import annotations

import re
from pathlib import Path

from cffi import FFI

INCLUDES = Path(__file__).resolve().parent / "includes"

# The accessors the agent and `lbproxy stats` call; bodies in fulcrum_atomic.h
# and (the agent's image write) fulcrum_publish.h.
ACCESSORS = """
uint64_t flc_load_acquire_u64(const uint64_t *p);
int64_t flc_load_i64(const int64_t *p);
uint64_t flc_load_u64(const uint64_t *p);
void flc_add_i64(int64_t *p, int64_t v);
int64_t flc_add_fetch_i64(int64_t *p, int64_t v);
uint32_t flc_load_u32(const uint32_t *p);
void flc_store_u32(uint32_t *p, uint32_t v);
int flc_cas_u32(uint32_t *p, uint32_t expected, uint32_t desired);
void flc_write_begin(flc_image_header *h);
void flc_write_end(flc_image_header *h);
void flc_publish_generation(flc_control *c, uint64_t generation);
uint64_t flc_read_begin(const flc_image_header *h);
int flc_read_validate(const flc_image_header *h, uint64_t seq);
uint64_t flc_segment_size(void);
uint64_t flc_off_buffers(void);
uint64_t flc_buffer_size(void);
uint64_t flc_off_worker_active(void);
uint64_t flc_off_worker_waiting(void);
uint32_t flc_crc32c(uint32_t crc, const void *data, size_t n);
uint32_t flc_crc32c_portable(uint32_t crc, const uint8_t *p, size_t n);
uint32_t flc_image_checksum(const flc_service *services, uint32_t n_services,
                               const flc_backend *backends, uint32_t n_backends,
                               const uint32_t *table, uint32_t table_used);
uint32_t flc_publish_image(void *base, uint64_t generation, const flc_image_header *fields,
                              const flc_service *services, const flc_backend *backends,
                              const uint32_t *table);
"""


def layout_declarations() -> str:
    """The part of fulcrum_layout.h between its LAYOUT markers."""
    text = (INCLUDES / "fulcrum_layout.h").read_text()
    match = re.search(r"/\* LAYOUT BEGIN \*/(.*)/\* LAYOUT END \*/", text, re.S)
    if match is None:
        raise RuntimeError("fulcrum_layout.h has no LAYOUT markers")
    return re.sub(r"/\*.*?\*/", "", match.group(1), flags=re.S)


ffi = FFI()
ffi.cdef(layout_declarations() + ACCESSORS)
ffi.set_source(
    "lbcore._layout",
    '#include "fulcrum_atomic.h"\n#include "fulcrum_publish.h"',
    include_dirs=[str(INCLUDES)],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
