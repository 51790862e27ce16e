"""``blockrep primary|secondary|checkpoint|failover|status``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
from typing import Any


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disk", required=True, help="the disk (raw file) this node serves")
    p.add_argument("--shared", action="store_true", help="shared-disk mode (SPEC §3)")
    p.add_argument(
        "--export",
        required=True,
        help="consumer NBD export address (HOST:PORT or unix:PATH), export name 'disk'",
    )
    p.add_argument("--qmp", help="QMP socket (unix:PATH) for status, checkpoint and failover")
    p.add_argument("--metrics", help="serve Prometheus metrics on HOST:PORT")
    p.add_argument(
        "--tls-dir",
        help="x509 certificates (QEMU layout, see 'blockrep tls-init'): the control channel "
        "and the replication link on TLS, the peer's certificate checked",
    )
    p.add_argument(
        "--psk-file",
        help="a shared secret (both nodes the same file, mode 0600): the peer must prove it",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="run a pair on TCP without authentication (anyone reaching the ports is the peer)",
    )
    p.add_argument(
        "--export-tls-dir", help="x509 certificates (QEMU layout): the consumer export on TLS"
    )
    p.add_argument(
        "--failover-point",
        choices=("checkpoint", "latest"),
        default="checkpoint",
        help="what a failover keeps: 'checkpoint' (COLO: the last checkpoint + the "
        "secondary's own writes) or 'latest' (every write the primary acknowledged; the "
        "secondary's export is read-only until it fails over)",
    )
    p.add_argument("--state-file", help="generation state file (default: DISK.blockrep-state.json)")
    p.add_argument("--heartbeat-interval", type=float, default=0.5)
    p.add_argument("--heartbeat-timeout", type=float, default=3.0)
    p.add_argument("--log", default=os.environ.get("BLOCKREP_LOG", "WARNING"))


def _role_parser(role: str, peer_option: str, peer_help: str) -> argparse.ArgumentParser:
    """A role's parser: the options both roles take, then how it finds its peer."""
    p = argparse.ArgumentParser(
        prog=f"blockrep {role}", description=f"run the {role.capitalize()} of a replicated disk"
    )
    _common(p)
    p.add_argument(peer_option, required=True, help=peer_help)
    return p


def primary_parser() -> argparse.ArgumentParser:
    p = _role_parser(
        "primary", "--secondary", "the secondary's control address (HOST:PORT or unix:PATH)"
    )
    p.add_argument(
        "--checkpoint-interval",
        type=float,
        default=2.0,
        help="seconds between checkpoints (0: only on demand)",
    )
    p.add_argument(
        "--assume-synced", action="store_true", help="do not compare the disks before starting"
    )
    p.add_argument(
        "--initial-sync", action="store_true", help="copy this disk to the secondary first"
    )
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="keep trying to pair again after losing the secondary",
    )
    p.add_argument(
        "--progress",
        action="store_true",
        default=sys.stderr.isatty(),
        help="progress bars on stderr",
    )
    from ..ha.config import parse_rate

    p.add_argument(
        "--resync-rate",
        type=parse_rate,
        default=0,
        help="ceiling of a background resync in bytes/s (50M, 1G; 0: unlimited)",
    )
    p.add_argument(
        "--resync-min-rate",
        type=parse_rate,
        default=0,
        help="what a resync keeps even while the consumer writes (bytes/s)",
    )
    p.add_argument(
        "--outdate-peer-command",
        help="failover-point latest: a command that makes a lost secondary Outdated (a "
        "cluster constraint, a fence of the secondary); writes are held until it exits 0",
    )
    p.add_argument(
        "--on-outdate-failure",
        choices=("freeze", "continue"),
        default="freeze",
        help="when the lost secondary cannot be outdated: keep holding writes (freeze) or "
        "go on alone, giving up the promise (continue)",
    )
    p.add_argument(
        "--no-activity-log",
        action="store_true",
        help="UNSAFE, for measuring its cost: no activity log, so after a crash of this "
        "node the writes of its last epoch are not known to differ from the secondary",
    )
    return p


def secondary_parser() -> argparse.ArgumentParser:
    p = _role_parser(
        "secondary", "--listen", "control address the primary connects to (HOST:PORT or unix:PATH)"
    )
    p.add_argument(
        "--buffer-dir", help="where the hidden/active overlays go (default /dev/shm when present)"
    )
    p.add_argument(
        "--keep-buffer-pages",
        choices=("auto", "on", "off"),
        default="auto",
        help="whether a checkpoint keeps the overlays' pages for the next epoch "
        "(auto: where they are in memory, as in /dev/shm)",
    )
    p.add_argument(
        "--auto-failover",
        action="store_true",
        help="fail over by itself when the primary is lost (needs --fence-command)",
    )
    p.add_argument(
        "--failover-timeout",
        type=float,
        default=5.0,
        help="seconds without the primary before it counts as lost",
    )
    p.add_argument(
        "--fence-command",
        help="command that makes sure the primary is dead; must exit 0 before an automatic failover",
    )
    p.add_argument(
        "--link-port",
        type=int,
        default=0,
        help="TCP port of the replication link (default: the --listen port + 1)",
    )
    return p


def run_role(kind: str, argv: list[str]) -> int:
    from ..errors import BlockError, OptionError
    from ..ha.config import PrimaryConfig, SecondaryConfig
    from ..ha.node_state import StateFileError
    from ..ha.primary import Primary
    from ..ha.role import BaseRole
    from ..ha.secondary import Secondary

    args = (primary_parser() if kind == "primary" else secondary_parser()).parse_args(argv)
    logging.basicConfig(level=args.log.upper(), format=f"blockrep {kind}: %(message)s")

    async def main() -> int:
        from .. import limits

        limits.install_accept_error_filter(asyncio.get_running_loop())
        # the Namespace stops here: the roles take a typed, frozen config
        try:  # a state file that cannot be read is one line naming it, never a traceback
            node: BaseRole = (
                Primary(PrimaryConfig.from_args(args))
                if kind == "primary"
                else Secondary(SecondaryConfig.from_args(args))
            )
        except (StateFileError, OptionError) as e:
            print(f"blockrep {kind}: {e.message}", file=sys.stderr)
            return 1
        try:
            await node.setup()
        except (BlockError, StateFileError, OSError, RuntimeError, ValueError) as e:
            print(f"blockrep {kind}: {getattr(e, 'message', e)}", file=sys.stderr)
            await node.shutdown()
            return 1
        print(f"blockrep {kind}: ready", file=sys.stderr, flush=True)
        await node.run_forever()
        return 0

    from .. import eventloop

    return eventloop.run(main())


# -- a tiny synchronous QMP client for the control commands ------------------------------------


def qmp_call(path: str, cmd: str, args: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
    if path.startswith("unix:"):
        path = path[5:]
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    f = s.makefile("rwb")

    def send(obj: dict[str, Any]) -> dict[str, Any]:
        f.write(json.dumps(obj).encode() + b"\n")
        f.flush()
        while True:
            line = f.readline()
            if not line:
                raise ConnectionError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    json.loads(f.readline())  # greeting
    send({"execute": "qmp_capabilities"})
    reply = send({"execute": cmd, "arguments": args or {}})
    s.close()
    if "error" in reply:
        raise RuntimeError(reply["error"]["desc"])
    return reply["return"]


def _qmp_arg(prog: str, argv: list[str]) -> argparse.Namespace:
    """``--qmp unix:PATH`` or ``FILE [--node NAME]`` (cli/up.py); ``a.qmp`` is the socket."""
    from .up import add_target, target_qmp

    p = argparse.ArgumentParser(prog=prog)
    add_target(p)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--watch", action="store_true", help="keep showing status (with progress of long jobs)"
    )
    a = p.parse_args(argv)
    a.qmp = target_qmp(p, a)
    return a


def cmd_checkpoint(argv: list[str]) -> int:
    a = _qmp_arg("blockrep checkpoint", argv)
    try:
        r = qmp_call(a.qmp, "replication-checkpoint")
    except (OSError, RuntimeError) as e:
        print(f"blockrep checkpoint: {e}", file=sys.stderr)
        return 1
    print(
        json.dumps(r)
        if a.json
        else f"checkpoint done: epoch {r['epoch']}, consumer paused {r['pause-ms']:.2f} ms"
    )
    return 0


def cmd_failover(argv: list[str]) -> int:
    a = _qmp_arg("blockrep failover", argv)
    try:
        qmp_call(a.qmp, "ha-failover", timeout=3600)
    except (OSError, RuntimeError) as e:
        print(f"blockrep failover: {e}", file=sys.stderr)
        return 1
    if not a.json:
        print("failed over: this node now holds the last checkpoint plus its own writes")
    return 0


def cmd_resolve(argv: list[str]) -> int:
    """``blockrep resolve --discard-local``: on the node whose writes are given up, in
    split brain only; it records that durably and stops (restart it as a secondary)."""
    from .up import add_target, target_qmp

    p = argparse.ArgumentParser(prog="blockrep resolve")
    add_target(p)
    p.add_argument(
        "--discard-local",
        action="store_true",
        required=True,
        help="give up this node's writes since the common epoch; its peer's data wins",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    a.qmp = target_qmp(p, a)
    try:
        r = qmp_call(a.qmp, "ha-resolve", {"discard-local": True})
    except (OSError, RuntimeError) as e:
        print(f"blockrep resolve: {e}", file=sys.stderr)
        return 1
    print(
        json.dumps(r)
        if a.json
        else f"split brain resolved (discard-local): this node's writes since {r['common-epoch']} "
        f"are discarded, {r['regions']} region(s) will be copied back from the peer; "
        "the node stops: restart it as blockrep secondary"
    )
    return 0


def _buffer_pages(keep: bool | None) -> str:
    if keep is None:  # not a running secondary
        return ""
    return ", pages kept between checkpoints" if keep else ", fresh files at each checkpoint"


def human_status(s: dict[str, Any]) -> str:
    af = s["auto-failover"]
    lines = [
        f"role:        {s['role']} ({s['mode']} disks)",
        f"stage:       {s['stage']}",
        f"peer:        {s['peer']}",
        f"states:      disk {s.get('disk-state')}, replication {s.get('replication')}, "
        f"peer {s.get('peer-role') or '-'}/{s.get('peer-disk-state') or '-'}, "
        f"out of sync {s.get('out-of-sync-bytes', 0)} B",
        f"epoch:       {s['epoch']} ({s['epoch-uuid'] or '-'}), age {s['epoch-age']:.1f} s",
        f"buffered:    hidden {s['hidden-bytes']} B, active {s['active-bytes']} B"
        + _buffer_pages(s.get("keep-buffer-pages")),
        f"unacked:     {s['unacked-bytes']} B forwarded, not yet acknowledged",
        f"checkpoints: {s['checkpoints']}, last pause {s['last-checkpoint-pause-ms']:.2f} ms "
        f"(p50 {s['checkpoint-pause-p50-ms']:.2f}, p99 {s['checkpoint-pause-p99-ms']:.2f})",
        f"failover:    {'automatic' if af['enabled'] else 'manual'}"
        + (f" — {af['reason']}" if af.get("reason") else ""),
    ]
    if s.get("replication-error"):
        lines.append(f"replication: {s['replication-error']}")
    if s.get("alone-since"):
        lines.append(f"alone since: {s['alone-since']}, wrote {len(s['written-alone'])} region(s)")
    if s.get("split-brain"):
        sb = s["split-brain"]
        lines.append(
            f"SPLIT BRAIN since epoch {sb['common-epoch']}: primary wrote {sb['primary']['written']}, "
            f"secondary wrote {sb['secondary']['written']}"
        )
    for e in s["errors"][-5:]:
        lines.append(f"error:       {e}")
    for j in s["jobs"]:
        pct = 100.0 * j["current"] / j["total"] if j["total"] else 0.0
        lines.append(f"job:         {j['id']} ({j['type']}) {j['status']} {pct:.1f}%")
    return "\n".join(lines)


def cmd_status(argv: list[str]) -> int:
    a = _qmp_arg("blockrep status", argv)
    try:
        if not a.watch:
            s = qmp_call(a.qmp, "query-ha-status")
            print(json.dumps(s, indent=2) if a.json else human_status(s))
            return 0
        from tqdm import tqdm

        bars: dict[str, Any] = {}
        while True:
            s = qmp_call(a.qmp, "query-ha-status")
            for j in s["jobs"] + ([{"id": "sync", **s["sync"]}] if s.get("sync") else []):
                bar = bars.get(j["id"])
                if bar is None:
                    bar = bars[j["id"]] = tqdm(
                        total=j["total"] or 1, desc=j["id"], unit="B", unit_scale=True
                    )
                bar.total = j["total"] or 1
                bar.update(j["current"] - bar.n)
            if not bars:
                print(human_status(s), "\n")
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0
    except (OSError, RuntimeError) as e:
        print(f"blockrep status: {e}", file=sys.stderr)
        return 1


def cmd_events(argv: list[str]) -> int:
    """``blockrep events``: one JSON object per line for each change of role, disk state,
    peer, replication or last handshake (the node diffs its status: ha/events.py)."""
    from .up import add_target, target_qmp

    p = argparse.ArgumentParser(prog="blockrep events")
    add_target(p)
    p.add_argument("--once", action="store_true", help="print the current state and exit")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between polls")
    a = p.parse_args(argv)
    a.qmp = target_qmp(p, a)
    from ..ha.events import snapshot

    try:
        if a.once:
            print(json.dumps(snapshot(qmp_call(a.qmp, "query-ha-status"))), flush=True)
            return 0
        cursor = 0
        while True:
            r = qmp_call(a.qmp, "query-ha-events", {"cursor": cursor})
            for e in r["events"]:
                print(json.dumps(e), flush=True)
            cursor = r["cursor"]
            time.sleep(a.interval)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0
    except (OSError, RuntimeError) as e:
        print(f"blockrep events: {e}", file=sys.stderr)
        return 1
