"""The snapshot and delta encodings written the obvious way, from services:
what lbcore.routing assembles piece by piece and orchestrator.derive diffs
must equal these bytes."""
from __future__ import annotations

from collections.abc import Sequence

from lbcore.config import DEFAULT_HEALTH, DEFAULT_LIFECYCLE, DEFAULT_OUTLIER, Service
from lbcore.wire import canonical_json, diff_delta


def _service(s: Service) -> dict:
    document = {"name": s.name, "listen": s.listen, "algorithm": s.algorithm,
                "backends": [{"id": b.id, "address": b.address, "weight": b.weight,
                              **({} if b.up else {"up": False}),
                              **({"max_conns": b.max_conns} if b.max_conns else {}),
                              **({} if b.state == "active" else {"state": b.state})}
                             for b in sorted(s.backends, key=lambda b: b.id)]}
    # the lifecycle keys sit in the service itself, as in a config file
    document.update({k: v for k, v in vars(s.lifecycle).items() if getattr(DEFAULT_LIFECYCLE, k) != v})
    tables = (("health", s.health, DEFAULT_HEALTH), ("outlier", s.outlier, DEFAULT_OUTLIER))
    for key, value, default in tables:
        changed = {k: v for k, v in vars(value).items() if getattr(default, k) != v}
        if changed:
            document[key] = changed
    return document


def encode_snapshot(version: int, services: Sequence[Service], epoch: int = 0) -> bytes:
    """The snapshot format written out plainly from its description in
    lbcore.wire: down rows say "up": false, draining ones their state,
    health and outlier tables and lifecycle keys carry only what differs
    from the defaults."""
    return canonical_json({
        "epoch": epoch,
        "version": version,
        "services": [_service(s) for s in sorted(services, key=lambda s: s.name)],
    })


def encode_delta(base: int, old: Sequence[Service], version: int, new: Sequence[Service],
                 epoch: int = 0) -> bytes:
    return diff_delta(base, old, version, new, epoch).encode()
