"""``blockrep daemon``: graph + QMP server + NBD server on one event loop.

Its command line takes QEMU's block options (``-drive``, ``-blockdev``,
``-object``, ``-qmp``) and qemu-storage-daemon's (``--nbd-server``, ``--export``,
``--chardev``/``--monitor``, ``--pidfile``, ``--daemonize``), so that the
command lines of QEMU's COLO documentation run with ``blockrep daemon`` in
place of ``qemu-system-x86_64 -machine none -nodefaults -display none``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

from .block import Graph
from .block.node import Node
from .block.options import check, parse_keyval, parse_options
from .errors import BlockError, OptionError
from .jobs import launch
from .jobs.base import JobManager
from .nbd.server import Export, NBDServer
from .objects import AuthzSimple, TLSCredsX509, create_object
from .qmp.commands import build_commands
from .qmp.server import QMPServer
from .replication import ReplicationRegistry

log = logging.getLogger("blockrep.daemon")


class UsageError(Exception):
    """A bad command line: printed as ``blockrep daemon: <message>``, exit 1."""


# -drive options that belong to the drive (BlockBackend), not to the block driver
DRIVE_ONLY = {
    "if",
    "id",
    "index",
    "bus",
    "unit",
    "media",
    "format",
    "file",
    "readonly",
    "cache",
    "werror",
    "rerror",
    "serial",
    "addr",
    "aio",
    "snapshot",
    "copy-on-read",
    "boot",
    "cyls",
    "heads",
    "secs",
    "trans",
    "discard",
    "detect-zeroes",
}
DRIVE_REFUSED = {"snapshot": "on", "copy-on-read": "on"}
CACHE_MODES = {
    "writeback": (False, False),
    "none": (True, False),
    "writethrough": (False, False),
    "directsync": (True, False),
    "unsafe": (False, True),
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
  --nbd-server addr.type=inet|unix,addr.host=..,addr.port=..|addr.path=..[,tls-creds=ID][,tls-authz=ID][,max-connections=N]
  --export type=nbd,id=ID,node-name=NODE[,name=NAME][,writable=on][,description=TEXT]
  --pidfile PATH   --daemonize
"""


class Daemon:
    def __init__(self) -> None:
        self.graph = Graph()
        self.qmp = QMPServer(build_commands(self))
        self.nbd: NBDServer | None = None
        self.exports: dict[str, Export] = {}  # by export id
        self.legacy_exports: set[str] = set()  # ids created by nbd-server-add
        self.shutdown_event = asyncio.Event()
        self.shutdown_reason = ""
        self._drive_counter: dict[str, int] = {}
        self.chardevs: dict[str, dict[str, Any]] = {}
        self.graph.emit = self.emit
        self.jobs = JobManager(self.emit)
        self.replication = ReplicationRegistry(self.graph, self.jobs)

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
            await self.drive_add(value)
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
            opts = parse_keyval(value)
            o = check(
                {"addr": "any", "tls-creds": "str", "tls-authz": "str", "max-connections": "int"},
                opts,
                typed=False,
                required=("addr",),
            )
            await self.nbd_server_start(
                o["addr"], o.get("tls-creds"), o.get("tls-authz"), o.get("max-connections", 0)
            )
        elif name == "export":
            opts = parse_keyval(value)
            o = check(
                {
                    "type": ("enum", ("nbd",)),
                    "id": "str",
                    "node-name": "str",
                    "name": "str",
                    "writable": "bool",
                    "description": "str",
                    "writethrough": "bool",
                    "iothread": "str",
                },
                opts,
                typed=False,
                required=("type", "id", "node-name"),
            )
            await self.export_add(
                o["id"],
                o["node-name"],
                o.get("name", o["node-name"]),
                o.get("writable", False),
                o.get("description", ""),
            )

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

    # -- drives ------------------------------------------------------------------

    async def drive_add(self, text: str) -> Node:
        """A ``-drive``: a node tree plus a device (BlockBackend) named by ``id``."""
        opts = parse_keyval(text)
        for key, bad in DRIVE_REFUSED.items():
            if opts.get(key) == bad:
                raise OptionError(f"-drive {key}={bad} is not supported by blockrep daemon")
        iface = opts.pop("if", "ide")
        if iface not in ("none", "virtio"):
            raise OptionError(
                f"if={iface} is not supported by blockrep daemon (use if=none or if=virtio)"
            )
        dev_id = opts.pop("id", None)
        if dev_id is None:
            n = self._drive_counter.get(iface, 0)
            self._drive_counter[iface] = n + 1
            dev_id = f"{iface}{n}"
        if dev_id in self.graph.devices or dev_id in self.graph.nodes:
            raise OptionError(f"Duplicate ID '{dev_id}' for drive")
        for k in ("index", "bus", "unit", "media", "serial", "addr", "werror", "rerror", "boot"):
            opts.pop(k, None)
        fmt = opts.pop("format", None)
        if fmt is not None:
            if "driver" in opts:
                raise OptionError("Cannot specify both 'driver' and 'format'")
            opts["driver"] = fmt
        fname = opts.pop("file", None)
        if isinstance(fname, str):
            if fname.startswith("nbd:") or fname.startswith("nbd+"):
                opts["file"] = {"driver": "nbd", "filename": fname}
            else:
                opts["file"] = {"filename": fname}
        elif isinstance(fname, dict):
            opts["file"] = fname
        ro = opts.pop("readonly", None)
        if ro is not None:
            opts["read-only"] = ro
        cache = opts.pop("cache", None)
        if isinstance(cache, str):
            if cache not in CACHE_MODES:
                raise OptionError(f"invalid cache option '{cache}'")
            direct, noflush = CACHE_MODES[cache]
            opts["cache"] = {
                "direct": "on" if direct else "off",
                "no-flush": "on" if noflush else "off",
            }
        elif isinstance(cache, dict):
            opts["cache"] = cache
        aio = opts.pop("aio", None)
        if aio is not None and isinstance(opts.get("file"), dict):
            opts["file"].setdefault("aio", aio)
        node = await self.graph.add(opts, typed=False, drive_style=True)
        self.graph.devices[dev_id] = node
        return node

    async def drive_add_node(self, text: str) -> None:
        opts = parse_keyval(text)
        if "node-name" not in opts:
            raise OptionError("'node-name' needs to be specified")
        await self.graph.add(opts, typed=False, monitor=True)

    async def drive_del(self, dev_id: str) -> None:
        node = self.graph.devices.get(dev_id)
        if node is None:
            raise BlockError(errno.ENOENT, f"Device '{dev_id}' not found")
        for exp in list(self.exports.values()):
            if exp.node is node:
                await self.export_del(exp.id, "hard")
        if node.op_blocker:
            raise BlockError(errno.EBUSY, f"Node '{dev_id}' is busy: {node.op_blocker}")
        del self.graph.devices[dev_id]
        if not node.parents and not self.graph.has_backend(node):
            await node.flush()
            await self.graph.close_node(node)

    def blockdev_change(self, parent: str, child: str | None, node: str | None) -> None:
        """x-blockdev-change: add or remove a quorum child, with QEMU's refusals."""
        from .block.quorum import QuorumNode

        pnode = self.graph.lookup(parent)
        if (child is None) == (node is None):
            if child is not None:
                raise BlockError(errno.EINVAL, "The parameters child and node are in conflict")
            raise BlockError(errno.EINVAL, "Either child or node must be specified")
        pname = self.graph.device_of(pnode) or pnode.node_name
        if child is not None:
            if child not in pnode.children:
                raise BlockError(errno.ENOENT, f"Node '{parent}' does not have child '{child}'")
            if not isinstance(pnode, QuorumNode):
                raise BlockError(
                    errno.ENOTSUP, f"The node {pname} does not support removing a child"
                )
            pnode.del_child(child)
        if node is not None:
            new = self.graph.nodes.get(node)
            if new is None:
                raise BlockError(errno.ENOENT, f"Node '{node}' not found")
            if not isinstance(pnode, QuorumNode):
                raise BlockError(errno.ENOTSUP, f"The node {pname} does not support adding a child")
            if new.parents or self.graph.device_of(new) is not None:
                raise BlockError(errno.EBUSY, f"The node {new.node_name} already has a parent")
            pnode.add_child(new)

    async def blockdev_del(self, name: str) -> None:
        node = self.graph.nodes.get(name)
        if node is None:
            raise BlockError(errno.ENOENT, f"Failed to find node with node-name='{name}'")
        if name not in self.graph.monitor_owned:
            raise BlockError(errno.EBUSY, f"Node {name} is not owned by the monitor")
        if node.op_blocker:
            raise BlockError(errno.EBUSY, f"Node '{name}' is busy: {node.op_blocker}")
        if node.parents or self.graph.has_backend(node):
            raise BlockError(errno.EBUSY, f"Node {name} is in use")
        try:
            await node.flush()
        except BlockError:
            pass
        await self.graph.close_node(node)

    # -- NBD server and exports --------------------------------------------------

    async def nbd_server_start(
        self, addr: Any, tls_creds: str | None, tls_authz: str | None, max_conn: int
    ) -> None:
        from .block.nbd import parse_address

        if self.nbd is not None:
            raise BlockError(errno.EBUSY, "NBD server already running")
        a = parse_address(addr)
        tls = None
        if tls_creds:
            creds = self.graph.objects.get(tls_creds)
            if not isinstance(creds, TLSCredsX509):
                raise BlockError(errno.ENOENT, f"No TLS credentials with id '{tls_creds}'")
            if creds.endpoint != "server":
                raise BlockError(errno.EINVAL, "Expecting TLS credentials with a server endpoint")
            tls = creds.server_context()
        authz = None
        if tls_authz:
            obj = self.graph.objects.get(tls_authz)
            if not isinstance(obj, AuthzSimple):
                raise BlockError(errno.ENOENT, f"No authorization object with id '{tls_authz}'")
            authz = obj
        srv = NBDServer({}, tls=tls, authz=authz, max_connections=max_conn)
        try:
            if a.type == "unix":
                if os.path.exists(a.path):
                    os.unlink(a.path)
                await srv.listen_unix(a.path)
            else:
                await srv.listen_tcp(a.host, int(a.port))
        except OSError as e:
            raise BlockError(
                e.errno or errno.EIO, f"Failed to bind socket: {os.strerror(e.errno or errno.EIO)}"
            ) from None
        srv.exports = {e.name: e for e in self.exports.values()}
        self.nbd = srv

    async def nbd_server_stop(self) -> None:
        if self.nbd is None:
            raise BlockError(errno.ENOENT, "NBD server not running")
        for exp_id in list(self.exports):
            await self.export_del(exp_id, "hard")
        await self.nbd.close()
        self.nbd = None

    async def export_add(
        self,
        exp_id: str,
        device: str,
        name: str,
        writable: bool,
        description: str,
        legacy: bool = False,
    ) -> None:
        if self.nbd is None:
            raise BlockError(errno.ENOENT, "NBD server not running")
        if exp_id in self.exports:
            raise BlockError(errno.EEXIST, f"Block export id '{exp_id}' is already in use")
        if name in self.nbd.exports:
            raise BlockError(errno.EEXIST, f"NBD server already has export named '{name}'")
        node = self.graph.lookup(device)
        if writable and node.read_only:
            raise BlockError(errno.EPERM, "Cannot export read-only node as writable")
        exp = Export(name, node, writable, description, exp_id)
        self.exports[exp_id] = exp
        if legacy:
            self.legacy_exports.add(exp_id)
        self.nbd.exports[name] = exp

    async def export_del(self, exp_id: str, mode: str = "safe") -> None:
        exp = self.exports.get(exp_id)
        if exp is None:
            raise BlockError(errno.ENOENT, f"Export '{exp_id}' is not found")
        if mode == "safe" and exp.clients:
            raise BlockError(errno.EBUSY, f"export '{exp_id}' still in use")
        del self.exports[exp_id]
        self.legacy_exports.discard(exp_id)
        if self.nbd is not None:
            self.nbd.exports.pop(exp.name, None)
            self.nbd.drop_export_clients(exp)
        exp.release()
        self.emit("BLOCK_EXPORT_DELETED", {"id": exp_id})

    async def export_del_by_name(self, name: str, mode: str) -> None:
        for exp in self.exports.values():
            if exp.name == name:
                await self.export_del(exp.id, mode)
                return
        raise BlockError(errno.ENOENT, f"Export '{name}' is not found")

    # -- jobs ------------------------------------------------------------------------

    async def start_backup(self, a: dict[str, Any]) -> None:
        await launch.start_backup(self.graph, self.jobs, a)

    async def start_commit(self, a: dict[str, Any]) -> None:
        await launch.start_commit(self.graph, self.jobs, a)

    async def start_mirror(self, a: dict[str, Any], fmt: str | None) -> None:
        await launch.start_mirror(self.graph, self.jobs, a, fmt)

    # -- shutdown ------------------------------------------------------------------

    def request_shutdown(self, reason: str) -> None:
        self.shutdown_reason = reason
        asyncio.get_running_loop().call_soon(self.shutdown_event.set)

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish, flush every writable node."""
        if self.nbd is not None:
            await self.nbd.close()
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
        return asyncio.run(run_daemon(cfg))
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
    code = asyncio.run(run_daemon(cfg, ready_fd=wfd))
    os._exit(code)
