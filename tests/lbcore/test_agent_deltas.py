"""A node applying deltas: whether a delta only rewrote rows (patched into
the published tables, the routing kept thin) or did more (the config built
whole), what the node publishes is exactly a build from scratch of the
routing the control plane derived."""
from __future__ import annotations

import io
import os
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, given, settings

from lbcore.agent import NodeAgent
from lbcore.config import parse_document
from lbcore.image import image_of_config, read_image
from lbcore.link import ControlLink
from lbcore.planner import Planner, localize
from lbcore.routing import Routing
from lbcore.segment import Segment
from tests.lbcore.deltas import IDS, delta_of, delta_rows
from tests.support import free_port, image_bytes

# how the link hands a version to the agent: one delta; two drained at once
# (one routing, two deltas past what the agent holds); a full snapshot (fetch)
ARRIVALS = ["one", "one", "one", "two", "fetch"]
ROWS_MOSTLY = ("weight", "weight", "weight", "address", "add", "remove", "algorithm")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.lists(delta_rows(ROWS_MOSTLY), max_size=3), st.sampled_from(ARRIVALS),
                                st.booleans()), min_size=1, max_size=12))
def test_what_a_node_publishes_after_each_delta_is_a_build_from_scratch(steps: list[Any]) -> None:
    node_id = f"deltas-{os.getpid()}"
    ports = [free_port("127.0.0.7") for _ in range(2)]
    config = parse_document({
        "node": {"id": node_id, "control": f"tcp://127.0.0.1:{free_port()}",
                 "subscribe": f"tcp://127.0.0.1:{free_port()}", "address": "127.0.0.7"}}, "test")
    held = Routing.of(1, [
        *parse_document({"node": {"id": "x"}, "service": [
            {"name": "web", "listen": f"127.0.0.1:{ports[0]}", "algorithm": "wrr",
             "backend": [{"id": i, "address": "127.0.0.1:9000"} for i in IDS[:5]]},
            {"name": "api", "listen": f"127.0.0.1:{ports[1]}", "algorithm": "maglev",
             "backend": [{"id": "b0", "address": "127.0.0.1:9000", "weight": 2}]}]}, "test").services])
    # a node that applied ``held`` (as start() and apply_remote leave it; no workers here)
    agent = NodeAgent(localize(config, held.as_services()), log=io.StringIO())
    agent.segment = Segment.create(node_id)
    try:
        agent.planner = Planner(agent.config, agent.segment, agent.workers.keys)
        agent.planner.publish(agent.planner.plan(agent.config, held.version))
        node = agent.config.node
        agent.link = ControlLink(node.id, node.max_staleness_ms, node.control, node.subscribe, agent.log)
        agent.link.routing = held
        reference = held  # the same deltas, applied whole: the control plane's view
        for rows, arrival, audit in steps:
            held = routing = agent.link.routing
            config_before = agent.config
            if arrival == "fetch":
                reference = Routing.of(reference.version + 1, reference.as_services())
                routing = Routing.of(reference.version, reference.as_services())
            for _ in range(2 if arrival == "two" else 1 if arrival == "one" else 0):
                delta = delta_of(reference, rows)
                routing = routing.with_rows(delta) or routing.apply(delta)  # as ControlLink.receive
                reference = reference.apply(delta)
            rewritten = routing.rewritten_rows(held)
            event(f"{arrival}: {'rows patched' if rewritten is not None else 'built whole'}")
            agent.apply_remote(routing)
            assert agent.version == routing.version and agent.link.routing is routing
            assert (agent.config is config_before) == (rewritten is not None)  # the path taken
            fresh = image_of_config(localize(agent.config, reference.as_services()), routing.version,
                                    agent.planner.service_slots, agent.planner.backend_slots)
            assert image_bytes(read_image(agent.segment)) == image_bytes(fresh)
            assert [(s.name, [b.id for b in s.backends]) for s in agent.config.services] == \
                [(s.name, [b.id for b in s.backends]) for s in reference.as_services()]
            if audit:  # the periodic report's digest builds the routing: the next delta chains from it
                assert agent.link.routing.digest() == reference.digest()
    finally:
        agent.shutdown(drain=False)
