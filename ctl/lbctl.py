"""``lbctl``: talk to the control plane over ZeroMQ (the admin API of
orchestrator.control).

    lbctl [--control tcp://HOST:PORT] [--timeout S] [-c FILE] GROUP VERB ...

The endpoint comes from --control, else $LBCTL_CONTROL, else -c FILE (its
[orchestrator] table, or a node file's tcp:// node.control), else
tcp://127.0.0.1:7700. Every write takes
--expected-version and answers the new version; every read takes --json.
Exit status: 0 ok, 1 error (including no answer within --timeout, and
``verify`` finding the fleet inconsistent), 2 usage, 3 version conflict
(the message names expected and current).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import zmq

from orchestrator.control import WireError, decode_reply, encode_request
from orchestrator.settings import (
    ALGORITHM_NAMES,
    DEFAULT_CONTROL,
    HEALTH_SETTINGS,
    LIFECYCLE_SETTINGS,
    OUTLIER_SETTINGS,
    ConfigError,
    control_endpoint,
    load_services,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFLICT = 0, 1, 2, 3


class CtlError(Exception):
    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


def request(endpoint: str, verb: str, args: dict[str, Any], timeout: float) -> Any:
    """One request, one reply; CtlError on refusal or silence."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(encode_request(verb, args))
        if not sock.poll(int(timeout * 1000)):
            raise CtlError(f"no answer from {endpoint} within {timeout:g} s (is the control plane running?)")
        reply = decode_reply(sock.recv())
    except zmq.ZMQError as exc:
        raise CtlError(f"{endpoint}: {exc}") from None
    except WireError as exc:
        raise CtlError(f"{endpoint} did not answer as a control plane: {exc}") from None
    finally:
        sock.close(0)
    if reply["ok"]:
        return reply["result"]
    error = reply["error"]
    status = EXIT_CONFLICT if error["code"] == "version_conflict" else EXIT_ERROR
    raise CtlError(error["message"], status)


MIN_INTERVAL_MS, MAX_INTERVAL_MS = 100, 3_600_000


def _interval_ms(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of ms") from None
    if not MIN_INTERVAL_MS <= value <= MAX_INTERVAL_MS:
        raise argparse.ArgumentTypeError(f"must be {MIN_INTERVAL_MS}..{MAX_INTERVAL_MS} (got {value})")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lbctl", description="Fulcrum admin CLI")
    parser.add_argument("--control",
                        help=f"control endpoint (default: $LBCTL_CONTROL, -c FILE, {DEFAULT_CONTROL})")
    parser.add_argument("-c", "--config", help="config file whose [orchestrator].control to use")
    parser.add_argument("--timeout", type=float, default=3.0,
                        help="seconds to wait for an answer (default 3)")
    groups = parser.add_subparsers(dest="group", required=True)

    def command(group: Any, name: str, write: bool = False) -> argparse.ArgumentParser:
        sub = group.add_parser(name)
        if write:
            sub.add_argument("--expected-version", type=int, default=None,
                             help="apply only if the record is at this version (0 on add: only if absent)")
        else:
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        return sub

    backend = groups.add_parser("backend").add_subparsers(dest="verb", required=True)
    add = command(backend, "add", write=True)
    add.add_argument("service")
    add.add_argument("id")
    add.add_argument("address")
    add.add_argument("--weight", type=int, default=1)
    add.add_argument("--max-conns", type=int, default=0,
                     help="open connections at most, per node (0: no limit)")
    remove = command(backend, "remove", write=True)
    remove.add_argument("service")
    remove.add_argument("id")
    remove.add_argument("--final", action="store_true",
                        help="removed at once, not drained first (its record may be added again later)")
    remove.add_argument("--timeout-ms", type=int, help="the drain's timeout (default: drain_timeout_ms)")
    drain = command(backend, "drain", write=True)
    drain.add_argument("service")
    drain.add_argument("id")
    drain.add_argument("--timeout-ms", type=int,
                       help="then the service's on_drain_timeout applies (default: its drain_timeout_ms)")
    drain.add_argument("--then", choices=("keep", "remove"), default="keep",
                       help="once drained: keep the record (drained; add it again to reactivate), "
                            "or remove it")
    wait = command(backend, "wait-drained")
    wait.add_argument("service")
    wait.add_argument("id")
    wait.add_argument("--timeout-ms", type=int, default=330_000,
                      help="exit 1 if not drained by then (default 330000)")
    bset = command(backend, "set", write=True)
    bset.add_argument("service")
    bset.add_argument("id")
    bset.add_argument("--weight", type=int)
    bset.add_argument("--max-conns", type=int, help="open connections at most, per node (0: no limit)")
    weight = command(backend, "set-weight", write=True)
    weight.add_argument("service")
    weight.add_argument("id")
    weight.add_argument("weight", type=int)
    command(backend, "list").add_argument("service", nargs="?")

    policy = groups.add_parser("policy").add_subparsers(dest="verb", required=True)
    command(policy, "get").add_argument("service")
    pset = command(policy, "set", write=True)
    pset.add_argument("service")
    pset.add_argument("--algorithm", choices=ALGORITHM_NAMES, help="(required for a new service)")
    pset.add_argument("--listen", help="address:port (required for a new service)")
    for table, settings in (("health", HEALTH_SETTINGS), ("outlier", OUTLIER_SETTINGS)):
        for s in settings:  # one flag per key of [service.health] and [service.outlier]
            pset.add_argument(f"--{table}-{s.name.replace('_', '-')}", dest=f"{table}__{s.name}", type=s.kind,
                              help=f"[service.{table}] {s.name}: {s.help}")
    for s in LIFECYCLE_SETTINGS:  # one flag per lifecycle key of [[service]]
        pset.add_argument(f"--{s.name.replace('_', '-')}", dest=f"lifecycle__{s.name}", type=s.kind,
                          help=f"{s.name}: {s.help}")

    health = groups.add_parser("health").add_subparsers(dest="verb", required=True)
    report = command(health, "report")
    report.add_argument("backend")
    report.add_argument("status", choices=("up", "down"))
    report.add_argument("--revision", type=int, required=True)
    command(health, "show").add_argument("service", nargs="?")
    explain = command(groups, "explain")
    explain.set_defaults(verb="explain")
    explain.add_argument("service")
    explain.add_argument("backend")

    snapshot = groups.add_parser("snapshot").add_subparsers(dest="verb", required=True)
    command(snapshot, "show").add_argument("--node", help="what this node applied, audited")
    status = command(groups, "status")
    status.set_defaults(verb="status")
    status.add_argument("--watch", action="store_true", help="redraw the fleet view until Ctrl-C")
    status.add_argument("--interval-ms", type=_interval_ms, default=1000,
                        help=f"with --watch: between two views ({MIN_INTERVAL_MS}..{MAX_INTERVAL_MS}, "
                             "default 1000)")
    verify = command(groups, "verify")
    verify.set_defaults(verb="verify")
    verify.add_argument("--settle-ms", type=int, default=2000,
                        help="ask again until consistent for at most this long: a fleet still applying "
                             "the last change is not a violation (default 2000; 0: ask once)")
    apply = groups.add_parser("apply", help="make services and backends those of a file (diff, then CAS)")
    apply.add_argument("-f", "--file", required=True, help="TOML file with [[service]] tables")
    apply.add_argument("--dry-run", action="store_true", help="show the diff only")
    apply.set_defaults(verb="apply")
    return parser


def _call(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The API verb and arguments of a parsed command line."""
    expected = {"expected_version": args.expected_version} if getattr(args, "expected_version", None) \
        is not None else {}
    key = (args.group, args.verb)
    if args.group in ("status", "verify"):
        return args.group, {}
    if key == ("backend", "add"):
        return "backend.add", {"service": args.service, "id": args.id, "address": args.address,
                               "weight": args.weight, "max_conns": args.max_conns, **expected}
    if key == ("backend", "remove"):
        final = {"final": True} if args.final else {}
        timeout = {"timeout_ms": args.timeout_ms} if args.timeout_ms is not None else {}
        return "backend.remove", {"service": args.service, "id": args.id, **final, **timeout, **expected}
    if key == ("backend", "drain"):
        timeout = {"timeout_ms": args.timeout_ms} if args.timeout_ms is not None else {}
        return "backend.drain", {"service": args.service, "id": args.id, "then": args.then, **timeout,
                                 **expected}
    if key == ("backend", "set"):
        given = {k: v for k, v in (("weight", args.weight), ("max_conns", args.max_conns)) if v is not None}
        return "backend.set", {"service": args.service, "id": args.id, **given, **expected}
    if key == ("backend", "set-weight"):
        return "backend.set_weight", {"service": args.service, "id": args.id, "weight": args.weight,
                                      **expected}
    if key == ("backend", "list"):
        return "backend.list", {"service": args.service} if args.service else {}
    if key == ("policy", "get"):
        return "policy.get", {"service": args.service}
    if key == ("policy", "set"):
        given = {k: v for k, v in (("listen", args.listen), ("algorithm", args.algorithm)) if v}
        for table in ("health", "outlier", "lifecycle"):
            values = {k.split("__", 1)[1]: v for k, v in vars(args).items()
                      if k.startswith(f"{table}__") and v is not None}
            if values:
                given[table] = values
        return "policy.set", {"service": args.service, **given, **expected}
    if key == ("health", "report"):
        return "health.report", {"backend": args.backend, "up": args.status == "up",
                                 "revision": args.revision}
    if key == ("health", "show"):
        return "health.show", {"service": args.service} if args.service else {}
    if key == ("explain", "explain"):
        return "explain", {"service": args.service, "backend": args.backend}
    if getattr(args, "node", None):
        return "snapshot.node", {"node": args.node}
    return "snapshot.get", {}


def _endpoint(args: argparse.Namespace) -> str:
    if args.control:
        return str(args.control)
    if os.environ.get("LBCTL_CONTROL"):
        return os.environ["LBCTL_CONTROL"]
    if args.config:
        try:
            return control_endpoint(args.config)
        except ConfigError as exc:
            raise CtlError(str(exc), EXIT_USAGE) from None
    return DEFAULT_CONTROL


def _show(result: Any, as_json: bool) -> str:
    if as_json:
        return json.dumps(result, indent=2, sort_keys=True)
    if isinstance(result, dict) and "nodes" in result:
        lines = [f"control plane version {result['version']} (epoch {result['epoch']}), "
                 f"{len(result['nodes'])} nodes"]
        for n in result["nodes"]:
            ms = n.get("propagation_ms")
            took = f", {ms} ms after its commit" if ms is not None else ""
            lag = f"lag {n['lag']}" if n["epoch"] == result["epoch"] else \
                f"ON ANOTHER EPOCH {n['epoch']}: not yet re-based on this store"
            lines.append(f"  {n['node']}: applied {n['applied_version']} ({lag}{took}), "
                         f"staleness {n['staleness_ms']} ms, reported {n['last_report_ms']} ms ago")
            for service, backends in sorted(n["counters"].items()):
                for backend, c in sorted(backends.items()):
                    lines.append(f"    {service}/{backend}: active {c['active']} total {c['total']} "
                                 f"failed {c['failed']}")
            for service, q in sorted(n.get("services", {}).items()):
                if any(q.values()):
                    lines.append(f"    {service} queue: waiting {q['waiting']} queued {q['queued']} "
                                 f"timeouts {q['queue_timeouts']} rejected {q['rejected']}")
        return "\n".join(lines)
    if isinstance(result, dict) and "applied_version" in result:
        verdict = ("not yet audited against (its digest comes with its next report)"
                   if result["consistent"] is None else "consistent with" if result["consistent"]
                   else "DIFFERENT from" if result["current"] else "behind")
        return (f"node {result['node']}: applied version {result['applied_version']}, "
                f"{verdict} the control plane")
    if isinstance(result, dict) and "eligible" in result:
        return "\n".join([f"eligible: {'yes' if result['eligible'] else 'NO'}",
                          *(f"  {reason}" for reason in result["reasons"])])
    if isinstance(result, list) and result and "probers" in result[0]:
        return "\n".join(_health_line(row) for row in result)
    if isinstance(result, list) and result and "drain" in result[0]:
        return "\n".join(_backend_line(row) for row in result)
    if isinstance(result, dict) and "snapshot" in result:
        return json.dumps(json.loads(result["snapshot"]), indent=2, sort_keys=True)
    if isinstance(result, list):
        if not result:
            return "(none)"
        keys = list(result[0])
        rows = [keys] + [[str(r[k]) for k in keys] for r in result]
        widths = [max(len(row[i]) for row in rows) for i in range(len(keys))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                         for row in rows)
    if isinstance(result, dict) and set(result) <= {"version", "applied"}:
        applied = "" if result.get("applied", True) else " (not applied: revision not newer)"
        return f"ok: version {result['version']}{applied}"
    return "\n".join(f"{k}: {v}" for k, v in result.items())


def _backend_line(row: dict[str, Any]) -> str:
    """One backend of ``backend list``, on one line: its drain's progress when draining."""
    limit = f" max_conns {row['max_conns']}" if row["max_conns"] else ""
    line = (f"{row['service']}/{row['id']} {row['address']} weight {row['weight']}{limit} {row['state']} "
            f"(version {row['version']})")
    drain = row["drain"]
    if drain and not drain["ended"]:
        waiting = ", ".join(f"{w['node']} ({w['why']})" for w in drain["unconfirmed"]) or "-"
        closing = ", timed out: closing" if drain["closing"] else ""
        line += f": {drain['open']} open, then {drain['then']}{closing}; waiting for {waiting}"
    elif drain:
        line += f": drain {drain['ended']}, {drain['open']} open then"
    return line


def _wait_drained(args: argparse.Namespace) -> int:
    """0 once the backend's drain has ended (drained, or removed after it);
    1 at the timeout, naming the nodes not yet confirmed; 2 when there is
    no drain to wait for (no such backend, not draining, removed at once).
    A control plane that does not answer is asked again until the timeout."""
    endpoint = _endpoint(args)
    deadline = time.monotonic() + max(0, args.timeout_ms) / 1000
    row: dict[str, Any] | None = None
    while True:
        try:
            rows = [r for r in request(endpoint, "backend.list", {"service": args.service}, args.timeout)
                    if r["id"] == args.id]
        except CtlError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
            continue
        if not rows:
            raise CtlError(f"no backend {args.service}/{args.id}", EXIT_USAGE)
        row = rows[0]
        drain = row["drain"]
        if row["state"] in ("drained", "removed") and drain and drain["ended"] in ("confirmed", "timeout"):
            print(_show(row, True) if args.json else _backend_line(row))
            return EXIT_OK
        if row["state"] != "draining":
            raise CtlError(f"backend {args.service}/{args.id} is {row['state']}: no drain to wait for",
                           EXIT_USAGE)
        if time.monotonic() >= deadline:
            print(f"lbctl: not drained within {args.timeout_ms} ms: {_backend_line(row)}", file=sys.stderr)
            return EXIT_ERROR
        time.sleep(0.1)


def _health_line(row: dict[str, Any]) -> str:
    """One backend of ``health show``, on one line."""
    parts = [f"{row['service']}/{row['id']}: {row['state']}"]
    if row["source"]:
        since = time.strftime("%H:%M:%S", time.localtime(row["since"])) if row["since"] else "?"
        parts.append(f"by {row['source']} (revision {row['revision']}, since {since})")
    counter = row["counter"]
    if counter:
        parts.append(f"counter {counter['health']}/{counter['rise'] + counter['fall'] - 1} "
                     f"(rise {counter['rise']}, fall {counter['fall']})")
    if row["probers"]:
        parts.append("probers " + " ".join(
            f"{p['node']}={p['result'] or '-'}"
            + (f"({p['age_ms']} ms ago)" if p["age_ms"] is not None else "")
            for p in row["probers"]))
    if row["ejected_by"]:
        ejections = (f"{e['node']}({e['for_ms']} ms left)" for e in row["ejected_by"])
        parts.append("EJECTED on " + " ".join(ejections))
    if row["flaps"]:
        parts.append(f"{row['flaps']} changes in 60 s")
    if row["held_until"]:
        until = time.strftime("%H:%M:%S", time.localtime(row["held_until"]))
        parts.append(f"HELD DOWN for flapping until {until}")
    return ", ".join(parts)


def _apply(args: argparse.Namespace) -> int:
    from ctl.apply import apply_file

    try:
        services = load_services(args.file)
        endpoint = _endpoint(args)
        apply_file(services, lambda verb, call_args: request(endpoint, verb, call_args, args.timeout),
                   args.dry_run, print)
    except ConfigError as exc:
        print(f"lbctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CtlError as exc:
        print(f"lbctl: {exc}", file=sys.stderr)
        return exc.status
    except ValueError as exc:
        print(f"lbctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    """I2 and I7 over the fleet: exit 0 when consistent, 1 with each violation."""
    endpoint = _endpoint(args)
    deadline = time.monotonic() + max(0, args.settle_ms) / 1000
    while True:
        result = request(endpoint, "verify", {}, args.timeout)
        if result["consistent"] or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif result["consistent"]:
        print(f"all {result['nodes']} nodes consistent at version {result['version']} "
              f"(epoch {result['epoch']})")
    else:
        print("\n".join(result["violations"]))
    return EXIT_OK if result["consistent"] else EXIT_ERROR


def _watch_status(args: argparse.Namespace) -> int:
    """``status --watch``: the fleet view again every interval until Ctrl-C
    (exit 0). On a terminal each view replaces the last; piped, views follow
    each other under a time line. A control plane that does not answer is
    said in the view, and asked again at the next one."""
    endpoint = _endpoint(args)
    redraw = sys.stdout.isatty()
    try:
        while True:
            try:
                view = _show(request(endpoint, "status", {}, args.timeout), args.json)
            except CtlError as exc:
                view = f"lbctl: {exc}"
            stamp = time.strftime("%H:%M:%S")
            if redraw:
                sys.stdout.write("\x1b[H\x1b[2J")  # home, clear: the view replaces the last one
            sys.stdout.write(f"--- {stamp} (every {args.interval_ms} ms; Ctrl-C to stop)\n{view}\n")
            sys.stdout.flush()
            time.sleep(args.interval_ms / 1000)
    except KeyboardInterrupt:
        return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.group == "apply":
        return _apply(args)
    if args.group == "status" and args.watch:
        return _watch_status(args)
    for group, verb, run in (("verify", "verify", _verify), ("backend", "wait-drained", _wait_drained)):
        if (args.group, args.verb) == (group, verb):
            try:
                return run(args)
            except CtlError as exc:
                print(f"lbctl: {exc}", file=sys.stderr)
                return exc.status
    verb, call_args = _call(args)
    try:
        result = request(_endpoint(args), verb, call_args, args.timeout)
    except CtlError as exc:
        print(f"lbctl: {exc}", file=sys.stderr)
        return exc.status
    except Exception as exc:  # a bad -c FILE, say: said plainly, not as a traceback
        print(f"lbctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(_show(result, getattr(args, "json", False)))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
