"""Images: deterministic bytes, verified reads, slots stable across versions."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbcore.balance.wrr import build_schedule as wrr_schedule
from lbcore.config import parse_config
from lbcore.image import ImageError, read_image
from tests.conftest import config_text
from tests.lbcore import reference
from tests.support import image_bytes

SERVICES = [
    {"name": "web", "listen": "127.0.0.1:8080", "algorithm": "wrr",
     "backends": [("w1", "127.0.0.1:9001", 1), ("w2", "127.0.0.1:9002", 2)]},
    {"name": "api", "listen": "127.0.0.2:8080", "algorithm": "maglev",
     "backends": [("a1", "127.0.0.3:9001", 1), ("a2", "127.0.0.3:9002", 0), ("a3", "127.0.0.3:9003", 5)]},
]


def test_same_inputs_give_the_same_bytes(published):
    config = parse_config(config_text(SERVICES))
    first = image_bytes(published.publish(config))
    published.version -= 1  # rebuild the same version from the same inputs
    second = image_bytes(published.publish(config))
    assert first == second


def test_read_back_equals_what_was_published(published):
    image = published.publish_text(SERVICES)
    back = read_image(published.segment)
    assert image_bytes(back) == image_bytes(image)
    assert back.checksum == image.checksum


def test_read_refuses_a_corrupted_buffer(published):
    published.publish_text(SERVICES)
    buf = published.segment.buffer(published.segment.generation())
    buf.backends[0]["port"] ^= 1
    with pytest.raises(ImageError, match="checksum"):
        read_image(published.segment)


def test_eligibility_is_weight_above_zero(published):
    image = published.publish_text(SERVICES)
    eligible = {row["id"].decode(): bool(row["eligible"]) for row in image.backends}
    assert eligible == {"w1": True, "w2": True, "a1": True, "a2": False, "a3": True}
    api = image.services[1]
    table = image.table[int(api["maglev_offset"]):int(api["maglev_offset"]) + int(api["maglev_len"])]
    a2_row = int(api["backend_first"]) + 1
    assert a2_row not in set(table.tolist())


def test_generation_alternates_buffers_and_versions_increase(published):
    seen = []
    for _ in range(4):
        image = published.publish_text(SERVICES)
        seen.append((published.segment.generation(), read_image(published.segment).version))
        assert seen[-1][1] == image.version
    assert [g for g, _ in seen] == [1, 2, 3, 4]
    assert [v for _, v in seen] == [1, 2, 3, 4]


def test_backend_slots_survive_reordering_and_removal(published):
    first = published.publish_text(SERVICES)
    slot = {r["id"].decode(): int(r["slot"]) for r in first.backends}
    reordered = [dict(SERVICES[1]), dict(SERVICES[0])]
    reordered[1]["backends"] = [("w2", "127.0.0.1:9002", 2)]
    second = published.publish_text(reordered)
    again = {r["id"].decode(): int(r["slot"]) for r in second.backends}
    assert all(again[k] == slot[k] for k in again)


@pytest.mark.parametrize("weights", [[1], [1, 2, 3], [0, 4, 2], [100, 1, 50], list(range(1, 40))])
def test_wrr_schedule_matches_reference(weights):
    assert wrr_schedule(weights).tolist() == reference.wrr_schedule(weights)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 256), st.sampled_from([0, 1, 2, 3, 4, 6, 12, 256])), max_size=60))
def test_compiled_wrr_schedule_equals_the_exact_fraction_reference(weights):
    assert wrr_schedule(weights).tolist() == reference.wrr_schedule(weights)


def test_wrr_schedule_refuses_a_weight_it_cannot_count():
    assert wrr_schedule([2**40, 2**41]).tolist() == [1, 0, 1]  # divided by the gcd first
    with pytest.raises(ValueError, match="too large"):
        wrr_schedule([1, 70_000])


def test_wrr_schedule_for_ten_thousand_backends_is_round_robin():
    schedule = wrr_schedule([1] * 10_000)
    assert (schedule == np.arange(10_000)).all()


def test_the_image_checksum_is_crc32c_whichever_way_it_is_computed():
    from lbcore._layout import lib

    check = b"123456789"  # the CRC-32C check value of the standard test string
    assert lib.flc_crc32c(0xFFFFFFFF, check, len(check)) ^ 0xFFFFFFFF == 0xE3069283
    assert lib.flc_crc32c_portable(0xFFFFFFFF, check, len(check)) ^ 0xFFFFFFFF == 0xE3069283
    rng = np.random.default_rng(7)
    for n in (0, 1, 7, 8, 9, 63, 1001, 72_000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert lib.flc_crc32c(0x1234, data, n) == lib.flc_crc32c_portable(0x1234, data, n), n
