"""The ``blockrep`` command line."""

from __future__ import annotations

import sys

USAGE = """usage: blockrep COMMAND [ARGS...]

commands:
  up          run a node of a resource file (role none until promoted or paired)
  promote     make a node primary (fails over if its primary is gone)
  outdate     mark a secondary Outdated: it refuses promotion and failover (a fence hook)
  demote      make a primary a secondary after a final checkpoint
  switchover  the primary and its secondary swap roles, no data copied
  down        stop a node cleanly (a primary hands over first)
  resync      pause | resume the primary's background resync; --out-of-sync: repair
              what verify found
  verify      compare the two disks by digests while Protected (--wait: exit 0/1/2)
  primary     run the Primary of a replicated disk (HA manager)
  secondary   run the Secondary of a replicated disk (HA manager)
  checkpoint  take a checkpoint now (on the primary's QMP socket)
  failover    fail the secondary over now (on the secondary's QMP socket)
  resolve     --discard-local: end a split brain by giving up this node's writes
  status      role, stage, peer, epoch, buffers, pauses, errors (--json, --watch)
  events      one JSON line per change of role, disk state, peer, replication (--once)
  demo        start a pair on loopback, run a workload, fail over, prove the result
  daemon      the block daemon: QEMU-style -drive/-blockdev, QMP, NBD server and exports
  img         image utility (qemu-img forms): create, info, check, map, compare, convert
  tls-init    write a CA plus server and client certificates (QEMU's x509 layout)
  ocf         the Pacemaker resource agent: install | agent | fence-peer | unfence-peer
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("primary", "secondary"):
        from .ha import run_role

        return run_role(cmd, rest)
    if cmd == "up":
        from .up import cmd_up

        return cmd_up(rest)
    if cmd == "resync" and "--out-of-sync" in rest:
        from .verify import cmd_resync_out_of_sync

        return cmd_resync_out_of_sync(rest)
    if cmd == "verify":
        from .verify import cmd_verify

        return cmd_verify(rest)
    if cmd == "resync":
        from .up import cmd_resync

        return cmd_resync(rest)
    if cmd in ("promote", "demote", "switchover", "down", "outdate"):
        from .up import cmd_verb

        return cmd_verb(cmd, rest)
    if cmd in ("checkpoint", "failover", "status", "events", "resolve"):
        from . import ha

        return {
            "checkpoint": ha.cmd_checkpoint,
            "failover": ha.cmd_failover,
            "resolve": ha.cmd_resolve,
            "status": ha.cmd_status,
            "events": ha.cmd_events,
        }[cmd](rest)
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if cmd == "daemon":
        from ..daemon import main as daemon_main

        return daemon_main(rest)
    if cmd == "img":
        import signal

        # `blockrep img map | head` ends quietly. Only here: a daemon must survive a
        # peer (QMP or NBD client) that hangs up while it writes (EPIPE, not death).
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        from .img import main as img_main

        return img_main(rest)
    if cmd == "tls-init":
        from .tls_init import main as tls_init_main

        return tls_init_main(rest)
    if cmd == "ocf":
        from .ocf import main as ocf_main

        return ocf_main(rest)
    if cmd in ("--version", "version"):
        from .. import __version__

        print(f"blockrep {__version__}")
        return 0
    print(f"blockrep: unknown command '{cmd}'\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
