"""What the monitor does to the graph: drives, nodes, the NBD server and its exports.

QEMU's ``blockdev.c`` (``-drive``, ``drive_add``, ``drive_del``, ``blockdev-del``,
``x-blockdev-change``) and ``blockdev-nbd.c`` (``nbd-server-start``/``-stop``,
exports). The daemon's command line, the QMP and HMP commands and the HA manager all
go through here, so each refusal has one text.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

from .address import SocketAddress
from .block import Graph
from .block.node import Node
from .block.options import parse_keyval
from .errors import BlockError, OptionError
from .export import Export
from .nbd.server import NBDServer
from .objects import AuthzSimple, TLSCredsX509

Emit = Callable[[str, dict[str, Any] | None], None]

# -drive features blockrep does not implement: refused rather than silently ignored
DRIVE_REFUSED = {"snapshot": "on", "copy-on-read": "on"}
# -drive cache= modes as (cache.direct, cache.no-flush)
CACHE_MODES = {
    "writeback": (False, False),
    "none": (True, False),
    "writethrough": (False, False),
    "directsync": (True, False),
    "unsafe": (False, True),
}
# -drive options that address a guest bus: meaningless without a guest, accepted and dropped
DRIVE_BUS_OPTIONS = ("index", "bus", "unit", "media", "serial", "addr", "werror", "rerror", "boot")

# QAPI NbdServerOptions: nbd-server-start and --nbd-server
NBD_SERVER_OPTIONS: dict[str, Any] = {
    "addr": "any",
    "tls-creds": "str",
    "tls-authz": "str",
    "max-connections": "int",
    "handshake-max-seconds": "int",
}
# QAPI BlockExportOptions for type nbd (block-export-add); --export takes a subset
BLOCK_EXPORT_OPTIONS: dict[str, Any] = {
    "type": ("enum", ("nbd",)),
    "id": "str",
    "node-name": "str",
    "name": "str",
    "description": "str",
    "writable": "bool",
    "writethrough": "bool",
    "fixed-iothread": "bool",
    "iothread": "str",
    "bitmaps": "any",
    "allocation-depth": "bool",
}
BLOCK_EXPORT_REQUIRED = ("type", "id", "node-name")


class BlockExports:
    """The NBD server and the block exports on it, by export id."""

    def __init__(self, graph: Graph, emit: Emit) -> None:
        self.graph = graph
        self.emit = emit
        self.nbd: NBDServer | None = None
        self.exports: dict[str, Export] = {}  # by export id
        self.legacy_exports: set[str] = set()  # ids created by nbd-server-add

    async def nbd_server_start(
        self,
        addr: Any,
        tls_creds: str | None,
        tls_authz: str | None,
        max_conn: int,
        handshake_timeout: float = 10.0,
    ) -> None:
        if self.nbd is not None:
            raise BlockError(errno.EBUSY, "NBD server already running")
        a = SocketAddress.from_qapi(addr)
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
        srv = NBDServer(
            {}, tls=tls, authz=authz, max_connections=max_conn, handshake_timeout=handshake_timeout
        )
        try:
            await srv.listen(a)
        except OSError as e:
            raise BlockError(
                e.errno or errno.EIO, f"Failed to bind socket: {os.strerror(e.errno or errno.EIO)}"
            ) from None
        srv.exports = {e.name: e for e in self.exports.values()}
        self.nbd = srv

    async def nbd_server_start_options(self, o: dict[str, Any]) -> None:
        """nbd-server-start from checked NbdServerOptions."""
        await self.nbd_server_start(
            o["addr"],
            o.get("tls-creds"),
            o.get("tls-authz"),
            o.get("max-connections", 0),
            o.get("handshake-max-seconds", 10),
        )

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

    async def block_export_add(self, o: dict[str, Any]) -> None:
        """block-export-add from checked BlockExportOptions."""
        await self.export_add(
            o["id"],
            o["node-name"],
            o.get("name", o["node-name"]),
            o.get("writable", False),
            o.get("description", ""),
        )

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


class Blockdev:
    """Drives (QEMU's BlockBackends named by ``id``) and monitor-owned nodes of a graph."""

    def __init__(self, graph: Graph, exports: BlockExports) -> None:
        self.graph = graph
        self.exports = exports
        self._drive_counter: dict[str, int] = {}

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
        for k in DRIVE_BUS_OPTIONS:
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
        """HMP ``drive_add -n``: a monitor-owned node, no device."""
        opts = parse_keyval(text)
        if "node-name" not in opts:
            raise OptionError("'node-name' needs to be specified")
        await self.graph.add(opts, typed=False, monitor=True)

    async def drive_del(self, dev_id: str) -> None:
        node = self.graph.devices.get(dev_id)
        if node is None:
            raise BlockError(errno.ENOENT, f"Device '{dev_id}' not found")
        for exp in list(self.exports.exports.values()):
            if exp.node is node:
                await self.exports.export_del(exp.id, "hard")
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
