"""``lbproxy``: run a data-plane node, check a config, print its counters.

    lbproxy -c FILE                 run the node (same as ``lbproxy run -c FILE``)
    lbproxy check -c FILE           validate FILE and exit
    lbproxy stats -c FILE [--json]  counters of the running node named in FILE
    lbproxy quickstart              demo backends and a node on 127.0.0.1:8080

Exit status: 0 ok, 1 runtime error, 2 bad config or usage.
"""
from __future__ import annotations

import argparse
import json
import sys

from lbcore.config import ConfigError, load_config, read_node_id
from lbcore.image import ImageError
from lbcore.segment import Segment, SegmentError

EXIT_ERROR, EXIT_CONFIG = 1, 2
COMMANDS = ("run", "check", "stats", "quickstart")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lbproxy", description="Fulcrum data-plane node")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the node"), ("check", "validate the config and exit"),
                       ("stats", "print the running node's counters")):
        command = sub.add_parser(name, help=text)
        command.add_argument("-c", "--config", required=True, help="TOML config file")
        if name == "stats":
            command.add_argument("--json", action="store_true", help="machine-readable output")
    quick = sub.add_parser("quickstart", help="demo backends and a node on 127.0.0.1:8080")
    quick.add_argument("--port", type=int, default=8080, help="listener port (default 8080)")
    quick.add_argument("--workers", type=int, default=None, help="workers (default: cores)")
    return parser


def _run(path: str) -> int:
    from lbcore.agent import serve

    config = load_config(path)
    try:
        return serve(config)
    except SegmentError as exc:
        print(f"lbproxy: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _stats(path: str, as_json: bool) -> int:
    from lbcore.stats import format_stats, node_stats

    try:
        segment = Segment.attach(read_node_id(path))
    except SegmentError as exc:
        print(f"lbproxy: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        stats = node_stats(segment)
    except ImageError as exc:
        print(f"lbproxy: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        segment.close()
    print(json.dumps(stats, indent=2) if as_json else format_stats(stats))
    return 0


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in and args_in[0] not in COMMANDS and args_in[0] not in ("-h", "--help"):
        args_in = ["run", *args_in]
    args = _parser().parse_args(args_in)
    try:
        if args.command == "run":
            return _run(args.config)
        if args.command == "check":
            from lbcore.agent import check_descriptors
            from lbcore.image import check_buildable

            config = load_config(args.config)
            check_buildable(config)
            check_descriptors(config)
            print(f"{args.config}: ok ({len(config.services)} services)")
            return 0
        if args.command == "stats":
            return _stats(args.config, args.json)
        from lbcore.quickstart import quickstart
        return quickstart(args.port, args.workers)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except RuntimeError as exc:
        print(f"lbproxy: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
