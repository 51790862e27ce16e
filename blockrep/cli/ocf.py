"""``blockrep ocf install | agent | fence-peer | unfence-peer``: blockrep under Pacemaker
(blockrep/ocf/, README "Pacemaker")."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

USAGE = """usage: blockrep ocf COMMAND [ARGS...]

commands:
  install       [--prefix DIR]: the agent as DIR/resource.d/blockrep/blockrep (/usr/lib/ocf)
  agent         ACTION: the OCF agent itself (what the installed wrapper runs)
  fence-peer    --config FILE --node NAME --clone ID: forbid promoting the peer (outdate hook)
  unfence-peer  --clone ID: remove that constraint
"""


def _fence_args(prog: str, argv: list[str], peer: bool) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"blockrep ocf {prog}")
    if peer:
        p.add_argument("--config", required=True, help="the resource file")
        p.add_argument("--node", help="this node (the primary), default the host name")
        p.add_argument("--timeout", type=float, default=50.0,
                       help="seconds to wait for an unreachable peer to be fenced")  # fmt: skip
        p.add_argument("--log", help="append what happened to this file")
    p.add_argument("--clone", required=True, help="the promotable clone's id in the CIB")
    return p.parse_args(argv)


def _logger(path: str | None, prog: str) -> Callable[[str], None]:
    def log(text: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} blockrep ocf {prog}: {text}\n"
        sys.stderr.write(line)
        if path:
            try:
                with open(path, "a") as f:
                    f.write(line)
            except OSError:
                pass

    return log


def cmd_fence_peer(argv: list[str]) -> int:
    from ..errors import OptionError
    from ..ha.resource import load_resource
    from ..ocf import fence

    a = _fence_args("fence-peer", argv, peer=True)
    log = _logger(a.log, "fence-peer")
    try:
        res = load_resource(a.config)
        node = res.local_node_name(a.node)
        peer = res.peer_of(node).name
    except OptionError as e:
        log(e.message)
        return 1
    try:
        return 0 if fence.fence_peer(a.clone, node, peer, a.timeout, log) else 1
    except (fence.FenceError, OSError) as e:
        log(str(e))
        return 1


def cmd_unfence_peer(argv: list[str]) -> int:
    from ..ocf import fence

    a = _fence_args("unfence-peer", argv, peer=False)
    try:
        fence.remove(a.clone)
    except (fence.FenceError, OSError) as e:
        print(f"blockrep ocf unfence-peer: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "install":
        from ..ocf.install import DEFAULT_PREFIX, install

        p = argparse.ArgumentParser(prog="blockrep ocf install")
        p.add_argument("--prefix", default=DEFAULT_PREFIX, help="the OCF root (/usr/lib/ocf)")
        a = p.parse_args(rest)
        try:
            path = install(a.prefix)
        except OSError as e:
            print(f"blockrep ocf install: {e}", file=sys.stderr)
            return 1
        print(f"installed ocf:blockrep:blockrep as {path}")
        return 0
    if cmd == "agent":
        from ..ocf.agent import run

        if len(rest) != 1:
            print("usage: blockrep ocf agent ACTION (OCF_RESKEY_* in the environment)",
                  file=sys.stderr)  # fmt: skip
            return 2
        return run(rest[0], os.environ)
    if cmd == "fence-peer":
        return cmd_fence_peer(rest)
    if cmd == "unfence-peer":
        return cmd_unfence_peer(rest)
    print(f"blockrep ocf: unknown command '{cmd}'\n{USAGE}", file=sys.stderr, end="")
    return 2
