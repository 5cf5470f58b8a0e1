"""The snapshot and delta encodings written the obvious way, from services:
what lbcore.routing assembles piece by piece and orchestrator.derive diffs
must equal these bytes."""
from __future__ import annotations

from collections.abc import Sequence

from lbcore.config import Service
from lbcore.wire import canonical_json, diff_delta


def encode_snapshot(version: int, services: Sequence[Service], epoch: int = 0) -> bytes:
    return canonical_json({
        "epoch": epoch,
        "version": version,
        "services": [
            {"name": s.name, "listen": s.listen, "algorithm": s.algorithm,
             "backends": [{"id": b.id, "address": b.address, "weight": b.weight}
                          for b in sorted(s.backends, key=lambda b: b.id)]}
            for s in sorted(services, key=lambda s: s.name)
        ],
    })


def encode_delta(base: int, old: Sequence[Service], version: int, new: Sequence[Service],
                 epoch: int = 0) -> bytes:
    return diff_delta(base, old, version, new, epoch).encode()
