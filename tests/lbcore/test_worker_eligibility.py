"""I1 in the worker itself: whatever row a pick gives (a picker bug, a torn
read, a row of another service, an index out of range), the worker connects
only to a row of the image it holds, of the connection's service, eligible
and of weight > 0 (backend_is_eligible). The pickers already skip
ineligible rows, so the image is tampered with here: the WRR schedule (which
its pick trusts) points only at rows the worker must refuse."""
from __future__ import annotations

import dataclasses
import socket

import pytest

from lbcore.config import parse_config
from lbcore.image import publish_image
from tests.conftest import config_text
from tests.lbcore.test_image_swap import start_workers, stop_workers
from tests.support import BackendPool, free_port, wait_for


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad_row", ["weight 0", "another service", "out of range", "stale, past the end"])
def test_the_worker_refuses_a_row_its_pick_should_never_give(published, bad_row):
    with BackendPool(4) as pool:
        good, zero, other, stale = pool.ports
        web, api = free_port(), free_port()
        if bad_row == "stale, past the end":
            # an earlier, bigger image leaves eligible rows of "web" past the
            # end of the next one written into the same buffer (two publishes on)
            big = [("good", f"127.0.0.1:{good}", 1), ("zero", f"127.0.0.1:{zero}", 0)] + \
                [(f"old{i}", f"127.0.0.1:{stale}", 1) for i in range(4)]
            published.publish(parse_config(config_text([
                {"name": "web", "listen": f"127.0.0.1:{web}", "algorithm": "wrr", "backends": big},
                {"name": "api", "listen": f"127.0.0.1:{api}", "algorithm": "wrr",
                 "backends": [("other", f"127.0.0.1:{other}", 1)]}])))
        image = published.publish(parse_config(config_text([
            {"name": "web", "listen": f"127.0.0.1:{web}", "algorithm": "wrr",
             "backends": [("good", f"127.0.0.1:{good}", 1), ("zero", f"127.0.0.1:{zero}", 0)]},
            {"name": "api", "listen": f"127.0.0.1:{api}", "algorithm": "wrr",
             "backends": [("other", f"127.0.0.1:{other}", 1)]}])))
        rows = {row["id"].decode(): i for i, row in enumerate(image.backends)}
        row = {"weight 0": rows["zero"], "another service": rows["other"],
               "out of range": len(image.backends) + 3, "stale, past the end": 4}[bad_row]
        web_slot = published.service_slots.slot_of("web")
        service = image.services[web_slot]
        assert int(service["schedule_len"]) == 1  # "good" alone
        table = image.table.copy()
        table[int(service["schedule_offset"])] = row
        published.version += 1
        publish_image(published.segment, dataclasses.replace(image, version=published.version, table=table))
        workers = start_workers(published.segment.path)
        try:
            wait_for(lambda: all(int(published.segment.workers[i]["listening"]) for i in range(len(workers))),
                     10, "workers listening")
            for _ in range(20):
                with socket.create_connection(("127.0.0.1", web), timeout=5) as client:
                    client.settimeout(5)
                    try:
                        assert client.recv(64) == b"", "a backend answered"
                    except ConnectionResetError:
                        pass
            with socket.create_connection(("127.0.0.1", api), timeout=5) as client:
                assert client.makefile().readline() == f"{other}\n"  # the other service is served
        finally:
            stop_workers(workers)
        assert (pool.accepted(zero), pool.accepted(other), pool.accepted(good), pool.accepted(stale)) == \
            (0, 1, 0, 0)
