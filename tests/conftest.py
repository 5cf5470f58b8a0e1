"""Fixtures shared by the unit tests: a real shared-memory segment with a
published image, built through the same code the node agent uses."""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from lbcore import layout
from lbcore.config import Config, parse_config
from lbcore.image import Image, image_of_config, publish_image
from lbcore.segment import Segment
from lbcore.slots import SlotMap

_names = itertools.count()


def unique_node_id(prefix: str = "test") -> str:
    return f"{prefix}-{os.getpid()}-{next(_names)}"


def config_text(services: list[dict], node_extra: str = "") -> str:
    """A TOML document: services as dicts with name/listen/algorithm and a
    'backends' list of (id, address, weight)."""
    lines = ["[node]", f'id = "{unique_node_id()}"', "workers = 1", node_extra]
    for s in services:
        lines += ["[[service]]", f'name = "{s["name"]}"', f'listen = "{s["listen"]}"',
                  f'algorithm = "{s.get("algorithm", "wrr")}"']
        for backend_id, address, weight in s["backends"]:
            lines += ["[[service.backend]]", f'id = "{backend_id}"', f'address = "{address}"',
                      f"weight = {weight}"]
    return "\n".join(lines) + "\n"


class Published:
    """A segment plus the slot maps and the last image published into it."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.service_slots: SlotMap[str] = SlotMap(layout.MAX_SERVICES)
        self.backend_slots: SlotMap[tuple[str, str]] = SlotMap(layout.MAX_BACKENDS)
        self.version = 0
        self.image: Image | None = None

    def publish(self, config: Config) -> Image:
        self.service_slots.assign((s.name for s in config.services), lambda slot: True)
        self.backend_slots.assign(((s.name, b.id) for s in config.services for b in s.backends),
                                  lambda slot: int(self.segment.counters[slot]["active"]) == 0)
        self.version += 1
        self.image = image_of_config(config, self.version, self.service_slots, self.backend_slots)
        publish_image(self.segment, self.image)
        return self.image

    def publish_text(self, services: list[dict]) -> Image:
        return self.publish(parse_config(config_text(services)))


@pytest.fixture
def published() -> Iterator[Published]:
    segment = Segment.create(unique_node_id())
    try:
        yield Published(segment)
    finally:
        segment.unlink()
        segment.close()
