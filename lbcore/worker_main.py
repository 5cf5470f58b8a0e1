"""Entry point of a worker process (started by the node agent):
``python -m lbcore.worker_main SEGMENT_PATH INDEX MAX_CONNECTIONS DRAIN_MS AGENT_PID``."""
from __future__ import annotations

import sys

from lbcore.worker import run


def main(argv: list[str]) -> int:
    path, index, max_connections, drain_ms, parent = argv
    return run(path, int(index), int(max_connections), int(drain_ms), int(parent))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
