"""``lborch -c FILE``: run the control plane on its own.

The [orchestrator] table names the store and the endpoints; the file's
services and backends seed the store on first start only: after that the
store is the truth (change it with lbctl). Exit status: 0 ok, 1 runtime
error, 2 bad configuration.
"""
from __future__ import annotations

import argparse
import sys

import zmq

from lbcore.config import ConfigError
from lbcore.wire import encode_endpoints
from orchestrator.server import Orchestrator
from orchestrator.settings import load_orchestrator_config
from orchestrator.store import SqliteStore, StoreError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lborch", description="Fulcrum control plane")
    parser.add_argument("-c", "--config", required=True, help="TOML config file")
    parser.add_argument("--check", action="store_true", help="validate the file and exit")
    parser.add_argument("--endpoints", action="store_true",
                        help="with --check: print the control and publish endpoints as JSON (for an "
                             "embedding lbproxy)")
    parser.add_argument("--parent-pid", type=int, default=0,
                        help="stop when this process is gone (set by an embedding lbproxy)")
    args = parser.parse_args(argv)
    try:
        settings = load_orchestrator_config(args.config, embedded=args.endpoints)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.check:
        if args.endpoints:
            endpoints = settings.endpoints
            print(encode_endpoints(endpoints.control, endpoints.publish))
        return 0
    metrics = None
    if settings.endpoints.metrics:
        # imported only here: a control plane without metrics loads none of it
        from orchestrator.metrics import OrchestratorMetrics
        try:  # first: an address in use starts nothing
            metrics = OrchestratorMetrics.bind(args.config, settings.endpoints.metrics)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
    try:
        store = SqliteStore(settings.store_path)
    except StoreError as exc:
        if metrics is not None:
            metrics.close()
        print(f"lborch: {exc}", file=sys.stderr)
        return 1
    try:
        try:
            seeded = store.seed(settings.services)
        except StoreError as exc:
            print(f"lborch: {exc}", file=sys.stderr)
            return 1
        if store.created:
            print(f"lborch: {settings.store_path}: a new store, epoch {store.read().epoch} "
                  "(no file, or an empty one)", file=sys.stderr)
        if seeded:
            print(f"lborch: seeded {settings.store_path} from {args.config}", file=sys.stderr)
        try:
            orchestrator = Orchestrator(store, settings.endpoints, parent_pid=args.parent_pid,
                                        metrics=metrics)
        except zmq.ZMQError as exc:
            print(f"lborch: cannot bind: {exc}", file=sys.stderr)
            return 1
        if metrics is not None:
            metrics.serve(orchestrator, settings.store_path)
            metrics = None  # the orchestrator's now: stopped by its close
        return orchestrator.run()
    finally:
        if metrics is not None:
            metrics.close()
        store.close()


if __name__ == "__main__":
    sys.exit(main())
