"""``blockrep daemon``: graph + QMP server + NBD server on one event loop.

Its command line takes QEMU's block options (``-drive``, ``-blockdev``,
``-object``, ``-qmp``) and qemu-storage-daemon's (``--nbd-server``, ``--export``,
``--chardev``/``--monitor``, ``--pidfile``, ``--daemonize``), so that the
command lines of QEMU's COLO documentation run with ``blockrep daemon`` in
place of ``qemu-system-x86_64 -machine none -nodefaults -display none``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

from . import eventloop, limits
from .block import Graph
from .block.options import check, parse_keyval, parse_options
from .blockdev import (
    BLOCK_EXPORT_OPTIONS,
    BLOCK_EXPORT_REQUIRED,
    NBD_SERVER_OPTIONS,
    Blockdev,
    BlockExports,
)
from .errors import BlockError, OptionError
from .jobs.base import JobManager
from .objects import create_object
from .qmp import block, control, export, hmp, jobs, replication
from .qmp.server import QMPServer
from .qmp.table import CommandTable
from .replication.registry import ReplicationRegistry

log = logging.getLogger("blockrep.daemon")

# the QMP command modules; each registers its commands over what it needs of a Daemon
QMP_DOMAINS = (control, block, export, jobs, replication, hmp)


class UsageError(Exception):
    """A bad command line: printed as ``blockrep daemon: <message>``, exit 1."""


# --export has never taken these members of BlockExportOptions; block-export-add takes all
CLI_EXPORT_OPTIONS = {
    k: v
    for k, v in BLOCK_EXPORT_OPTIONS.items()
    if k not in ("fixed-iothread", "bitmaps", "allocation-depth")
}
# options of qemu-system that are no-ops for a daemon without a guest
NOOP_OPTIONS_WITH_ARG = {"machine", "M", "display", "name", "accel", "m", "smp"}
NOOP_FLAGS = {"nodefaults", "S", "no-user-config", "nographic", "no-shutdown"}
KNOWN_WITH_ARG = {
    "drive",
    "blockdev",
    "object",
    "qmp",
    "nbd-server",
    "export",
    "pidfile",
    "chardev",
    "monitor",
    *NOOP_OPTIONS_WITH_ARG,
}
KNOWN_FLAGS = {"daemonize", *NOOP_FLAGS}


@dataclass
class DaemonConfig:
    items: list[tuple[str, str]] = field(default_factory=list)  # (option, value) in order
    pidfile: str | None = None
    daemonize: bool = False


def parse_argv(argv: list[str]) -> DaemonConfig:
    cfg = DaemonConfig()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-"):
            raise UsageError(f"unexpected argument '{arg}'")
        name = arg.lstrip("-")
        value: str | None = None
        if "=" in name and arg.startswith("--"):
            name, value = name.split("=", 1)
        if name in ("h", "help"):
            raise UsageError(USAGE)
        if name in KNOWN_FLAGS:
            if name == "daemonize":
                cfg.daemonize = True
            i += 1
            continue
        if name not in KNOWN_WITH_ARG:
            raise UsageError(f"option '{arg}' is not supported by blockrep daemon")
        if value is None:
            if i + 1 >= len(argv):
                raise UsageError(f"option '{arg}' requires an argument")
            value = argv[i + 1]
            i += 1
        i += 1
        if name in ("machine", "M") and value.split(",")[0] not in ("none", "type=none"):
            raise UsageError(
                f"-machine {value}: blockrep daemon runs no guest; only '-machine none' is accepted"
            )
        if name == "display" and value != "none":
            raise UsageError(f"-display {value}: only '-display none' is accepted")
        if name == "pidfile":
            cfg.pidfile = value
        elif name not in NOOP_OPTIONS_WITH_ARG:
            cfg.items.append((name, value))
    return cfg


USAGE = """usage: blockrep daemon [options]
  -drive OPTS | --drive OPTS       a drive (QEMU -drive syntax; if=none|virtio, id= names the device)
  -blockdev OPTS | --blockdev OPTS a node (keyval or JSON)
  -object tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off]
  -object authz-simple,id=ID,identity=DN
  -qmp unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off   (repeatable)
  --chardev socket,id=ID,path=PATH|host=H,port=P,server=on,wait=off --monitor chardev=ID
  --nbd-server addr.type=inet|unix,addr.host=..,addr.port=..|addr.path=..[,tls-creds=ID][,tls-authz=ID][,max-connections=N][,handshake-max-seconds=N]
  --export type=nbd,id=ID,node-name=NODE[,name=NAME][,writable=on][,description=TEXT]
  --pidfile PATH   --daemonize
"""


class Daemon:
    """One graph with its QMP monitor, NBD exports, jobs and replication, on one event loop."""

    def __init__(self) -> None:
        self.graph = Graph()
        self.qmp = QMPServer(CommandTable())
        self.shutdown_event = asyncio.Event()
        self.shutdown_reason = ""
        self.chardevs: dict[str, dict[str, Any]] = {}
        self.graph.emit = self.emit
        self.block_exports = BlockExports(self.graph, self.emit)
        self.blockdev = Blockdev(self.graph, self.block_exports)
        self.jobs = JobManager(self.emit)
        self.replication = ReplicationRegistry(self.graph, self.jobs)
        for domain in QMP_DOMAINS:
            domain.register(self.qmp.commands, self)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        self.qmp.emit(name, data)

    # -- startup -----------------------------------------------------------------

    async def apply(self, cfg: DaemonConfig) -> None:
        # monitors last: once a QMP socket exists, the whole command line is in effect
        late = ("qmp", "monitor")
        items = [i for i in cfg.items if i[0] not in late] + [i for i in cfg.items if i[0] in late]
        for name, value in items:
            try:
                await self._apply_one(name, value)
            except (BlockError, OptionError) as e:
                raise UsageError(f"-{name} {value}: {e.message}") from None

    async def _apply_one(self, name: str, value: str) -> None:
        if name == "drive":
            await self.blockdev.drive_add(value)
        elif name == "blockdev":
            opts, typed = parse_options(value)
            await self.graph.add(opts, typed=typed, monitor=True)
        elif name == "object":
            opts, typed = parse_options(value)
            if not typed:
                opts = parse_keyval(value, implied_key="qom-type")
            qom = opts.get("qom-type")
            if not qom:
                raise OptionError("Parameter 'qom-type' is missing")
            obj = create_object(qom, opts, typed)
            if obj.id in self.graph.objects:
                raise OptionError(
                    f"attempt to add duplicate property '{obj.id}' to object (type 'container')"
                )
            self.graph.objects[obj.id] = obj
        elif name == "qmp":
            await self._listen_qmp(value)
        elif name == "chardev":
            opts = parse_keyval(value, implied_key="backend")
            self.chardevs[opts.get("id", "")] = opts
        elif name == "monitor":
            opts = parse_keyval(value, implied_key="chardev")
            dev = self.chardevs.get(opts.get("chardev", ""))
            if dev is None:
                raise OptionError(f"chardev '{opts.get('chardev')}' not found")
            if "path" in dev:
                await self.qmp.listen_unix(dev["path"])
            else:
                await self.qmp.listen_tcp(dev.get("host", "127.0.0.1"), int(dev["port"]))
        elif name == "nbd-server":
            o = check(NBD_SERVER_OPTIONS, parse_keyval(value), typed=False, required=("addr",))
            await self.block_exports.nbd_server_start_options(o)
        elif name == "export":
            o = check(
                CLI_EXPORT_OPTIONS,
                parse_keyval(value),
                typed=False,
                required=BLOCK_EXPORT_REQUIRED,
            )
            await self.block_exports.block_export_add(o)

    async def _listen_qmp(self, spec: str) -> None:
        head, _, rest = spec.partition(",")
        opts = parse_keyval(rest) if rest else {}
        if opts.get("server", "on") not in ("on", "yes", "true") and "server" in opts:
            raise OptionError("blockrep daemon only listens (server=on)")
        if head.startswith("unix:"):
            await self.qmp.listen_unix(head[5:])
        elif head.startswith("tcp:"):
            hostport = head[4:]
            host, _, port = hostport.rpartition(":")
            await self.qmp.listen_tcp(host.strip("[]") or "127.0.0.1", int(port))
        else:
            raise OptionError(f"unsupported -qmp backend '{head}' (use unix:PATH or tcp:HOST:PORT)")

    # -- shutdown ------------------------------------------------------------------

    def request_shutdown(self, reason: str) -> None:
        self.shutdown_reason = reason
        asyncio.get_running_loop().call_soon(self.shutdown_event.set)

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish, flush every writable node."""
        if self.block_exports.nbd is not None:
            await self.block_exports.nbd.close()
        await self.jobs.cancel_all()
        self.emit("SHUTDOWN", {"guest": False, "reason": self.shutdown_reason or "host-signal"})
        for node in list(self.graph.nodes.values()):
            await node.drain()
        for node in list(self.graph.nodes.values()):
            if not node.read_only and not node.closed:
                try:
                    await node.flush()
                except BlockError as e:
                    log.error("flush of %s failed: %s", node.node_name, e.message)
        await self.graph.close_all()
        await self.qmp.close()


async def run_daemon(cfg: DaemonConfig, ready_fd: int | None = None) -> int:
    d = Daemon()
    loop = asyncio.get_running_loop()
    limits.install_accept_error_filter(loop)  # EMFILE: one line a minute, not a flood
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, d.request_shutdown, "host-signal")
    try:
        await d.apply(cfg)
    except UsageError as e:
        await d.graph.close_all()
        if ready_fd is not None:
            os.write(ready_fd, f"E{e}".encode())
            os.close(ready_fd)
        else:
            print(f"blockrep daemon: {e}", file=sys.stderr)
        return 1
    if cfg.pidfile:
        with open(cfg.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    if ready_fd is not None:
        os.write(ready_fd, b"R")
        os.close(ready_fd)
    await d.shutdown_event.wait()
    await d.shutdown()
    if cfg.pidfile:
        try:
            os.unlink(cfg.pidfile)
        except OSError:
            pass
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=os.environ.get("BLOCKREP_LOG", "WARNING"), format="%(name)s: %(message)s"
    )
    try:
        cfg = parse_argv(argv)
    except UsageError as e:
        print(f"blockrep daemon: {e}", file=sys.stderr)
        return 1
    if not cfg.daemonize:
        return eventloop.run(run_daemon(cfg))
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        msg = os.read(rfd, 65536).decode()
        if msg.startswith("R"):
            return 0
        print(f"blockrep daemon: {msg[1:] or 'failed to start'}", file=sys.stderr)
        return 1
    os.close(rfd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    code = eventloop.run(run_daemon(cfg, ready_fd=wfd))
    os._exit(code)
