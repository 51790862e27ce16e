"""``blockrep up FILE`` and the role verbs ``promote | demote | switchover | down``.

Every control command reaches its node by ``--qmp unix:PATH`` or by the resource file
and the node's name (``FILE --node NAME``, NAME defaulting to the host name): the file
says where that node's QMP socket is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys


def add_target(p: argparse.ArgumentParser) -> None:
    """The two ways to name a node: ``--qmp unix:PATH`` or ``FILE [--node NAME]``."""
    p.add_argument("file", nargs="?", help="the resource file (TOML) naming the node's QMP socket")
    p.add_argument("--node", help="the node's name in the resource file (default: host name)")
    p.add_argument("--qmp", help="the node's QMP socket (unix:PATH)")


def target_qmp(p: argparse.ArgumentParser, a: argparse.Namespace) -> str:
    """The QMP socket the arguments name; a usage error (exit 2) names what is missing."""
    if a.qmp and a.file:
        p.error("name the node by --qmp or by FILE [--node NAME], not both")
    if a.qmp:
        return str(a.qmp)
    if not a.file:
        p.error("name the node: --qmp unix:PATH, or the resource FILE [--node NAME]")
    from ..errors import OptionError
    from ..ha.resource import load_resource

    try:
        res = load_resource(a.file)
        return res.node(res.local_node_name(a.node)).qmp
    except OptionError as e:
        p.error(e.message)
    raise AssertionError  # p.error exits


def cmd_up(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="blockrep up",
        description="run this node of a resource: role none until promoted or paired",
    )
    p.add_argument("file", help="the resource file (TOML)")
    p.add_argument("--node", help="this node's name in the file (default: the host name)")
    p.add_argument("--metrics", help="serve Prometheus metrics on HOST:PORT")
    p.add_argument("--heartbeat-interval", type=float, default=0.5)
    p.add_argument("--heartbeat-timeout", type=float, default=3.0)
    p.add_argument("--failover-timeout", type=float, default=5.0)
    from ..ha.config import parse_rate

    p.add_argument("--resync-rate", type=parse_rate, default=0, help="bytes/s (50M; 0: unlimited)")
    p.add_argument("--resync-min-rate", type=parse_rate, default=0, help="bytes/s kept under load")
    p.add_argument(
        "--no-activity-log", action="store_true", help="UNSAFE, for measuring its cost only"
    )
    p.add_argument(
        "--outdate-peer-command",
        help="as primary, with failover-point latest: makes a lost peer Outdated (a cluster "
        "manager's constraint: `blockrep ocf fence-peer`)",
    )
    p.add_argument("--on-outdate-failure", choices=("freeze", "continue"), default="freeze")
    p.add_argument("--log", default=os.environ.get("BLOCKREP_LOG", "WARNING"))
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log.upper(), format="blockrep up: %(message)s")
    from ..errors import BlockError, OptionError
    from ..ha.config import OutdateFailure
    from ..ha.node import HANode, UpOptions
    from ..ha.node_state import StateFileError
    from ..ha.resource import load_resource

    try:
        res = load_resource(a.file)
        name = res.local_node_name(a.node)
    except OptionError as e:
        print(f"blockrep up: {e.message}", file=sys.stderr)
        return 1
    opts = UpOptions(
        metrics=a.metrics,
        heartbeat_interval=a.heartbeat_interval,
        heartbeat_timeout=a.heartbeat_timeout,
        failover_timeout=a.failover_timeout,
        no_activity_log=a.no_activity_log,
        resync_rate=a.resync_rate,
        resync_min_rate=a.resync_min_rate,
        outdate_peer_command=a.outdate_peer_command or None,
        on_outdate_failure=OutdateFailure(a.on_outdate_failure),
    )

    async def main() -> int:
        from .. import limits

        limits.install_accept_error_filter(asyncio.get_running_loop())
        try:
            node = HANode(res, name, opts)
            await node.start()
        except (BlockError, StateFileError, OSError, RuntimeError, ValueError) as e:
            print(f"blockrep up: {getattr(e, 'message', e)}", file=sys.stderr)
            return 1
        print(f"blockrep up: {res.name}/{name} ready (role none)", file=sys.stderr, flush=True)
        await node.run_forever()
        return 0

    from .. import eventloop

    return eventloop.run(main())


VERBS = {
    "promote": ("ha-promote", "this node is primary"),
    "demote": ("ha-demote", "this node is secondary"),
    "switchover": ("ha-switchover", "switched over: the peer is primary, this node secondary"),
    "down": ("ha-down", "the node stopped cleanly"),
    "outdate": ("ha-outdate", "Outdated: it refuses promotion and failover until it pairs again"),
}


def cmd_verb(verb: str, argv: list[str]) -> int:
    from .ha import qmp_call

    p = argparse.ArgumentParser(prog=f"blockrep {verb}")
    add_target(p)
    if verb == "promote":
        p.add_argument(
            "--force",
            action="store_true",
            help="a new resource (no history on either side): this node's disk is copied to the peer",
        )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    path = target_qmp(p, a)
    command, done = VERBS[verb]
    args = {"force": True} if getattr(a, "force", False) else {}
    try:
        r = qmp_call(path, command, args, timeout=3600)
    except (OSError, RuntimeError) as e:
        if verb == "down" and isinstance(e, ConnectionError):
            r = {}  # the node closed QMP as it stopped
        else:
            print(f"blockrep {verb}: {e}", file=sys.stderr)
            return 1
    if a.json:
        print(json.dumps(r))
    elif isinstance(r, dict) and r.get("changed") is False:
        print(f"nothing to do: this node is already {r.get('role')}")
    else:
        print(done)
    return 0


def cmd_resync(argv: list[str]) -> int:
    """``blockrep resync pause|resume``: hold or release the primary's running resync."""
    from .ha import qmp_call

    p = argparse.ArgumentParser(prog="blockrep resync")
    p.add_argument("action", choices=("pause", "resume"))
    add_target(p)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    path = target_qmp(p, a)
    try:
        r = qmp_call(path, f"ha-resync-{a.action}")
    except (OSError, RuntimeError) as e:
        print(f"blockrep resync: {e}", file=sys.stderr)
        return 1
    state = "paused" if r.get("paused") else "running"
    print(
        json.dumps(r) if a.json else f"resync {state}: {r['percent']:.1f}% of {r['total-bytes']} B"
    )
    return 0
