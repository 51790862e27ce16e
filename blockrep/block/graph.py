"""The node graph: registry of nodes and devices, opening nodes from options."""

from __future__ import annotations

import errno
import importlib
import os
import re
from collections.abc import Callable
from typing import Any

from ..errors import BlockError, OptionError
from .node import Node
from .options import COMMON_SCHEMA, check

# Driver name -> the module that defines it. A driver's module is imported the first
# time a node of that driver is opened, so that the block layer imports no driver
# (and no driver's dependencies, such as the qcow2 codec or the NBD client) up front.
DRIVER_MODULES: dict[str, str] = {
    "file": "blockrep.block.file",
    "raw": "blockrep.block.raw",
    "null-co": "blockrep.block.raw",
    "qcow2": "blockrep.qcow2.driver",
    "nbd": "blockrep.block.nbd",
    "quorum": "blockrep.block.quorum",
    "blkdebug": "blockrep.block.blkdebug",
    "copy-before-write": "blockrep.block.copy_before_write",
    "replication": "blockrep.replication.filter",
    "concat": "blockrep.block.concat",
}
# Driver classes imported so far (filled by ``register``).
DRIVERS: dict[str, type[Node]] = {}

_NODE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,30}$")


def register(cls: type[Node]) -> type[Node]:
    """Class decorator: make a driver known by its ``driver_name``."""
    DRIVERS[cls.driver_name] = cls
    return cls


def driver_class(name: str) -> type[Node] | None:
    """The class of a driver by name, importing its module on first use."""
    cls = DRIVERS.get(name)
    if cls is None and name in DRIVER_MODULES:
        importlib.import_module(DRIVER_MODULES[name])
        cls = DRIVERS.get(name)
    return cls


def probe_format(path: str) -> str:
    """Guess a format from the first bytes of a file, as QEMU's probing does."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return "raw"
    return "qcow2" if head == b"QFI\xfb" else "raw"


class Graph:
    """All nodes of one process, by node-name, plus the devices (BlockBackends)."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        # device id (``-drive id=``) -> root node; a device is a user of its node
        self.devices: dict[str, Node] = {}
        # nodes that blockdev-add created (may be blockdev-del'ed)
        self.monitor_owned: set[str] = set()
        # events from nodes (quorum, jobs) go to whoever listens (the QMP server)
        self.emit: Callable[[str, dict[str, Any]], None] = lambda name, data: None
        self._auto = 0
        # user-creatable objects (-object / object-add): TLS credentials, authz
        self.objects: dict[str, Any] = {}
        # called after a node has been opened, so that higher layers can watch
        self.on_open: list[Callable[[Node], None]] = []

    # -- lookup --------------------------------------------------------------

    def find(self, name: str) -> Node | None:
        """A node by device id or node-name (QEMU's bdrv_lookup_bs)."""
        return self.devices.get(name) or self.nodes.get(name)

    def lookup(self, name: str) -> Node:
        node = self.find(name)
        if node is None:
            raise BlockError(errno.ENOENT, f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    def get_node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise BlockError(errno.ENOENT, f"Cannot find node {name}")
        return node

    def device_of(self, node: Node) -> str | None:
        for dev, n in self.devices.items():
            if n is node:
                return dev
        return None

    def has_backend(self, node: Node) -> bool:
        """Does the node have a user outside the graph (a device, an export, a job)?

        Such users hold the node through edges without a parent node.
        """
        return self.device_of(node) is not None or any(c.parent is None for c in node.parents)

    def replace_node(self, old: Node, new: Node) -> None:
        """Make every user of ``old`` use ``new`` (filter insertion, commit pivot).

        The edges of ``new`` itself are left alone, so ``new`` may have ``old`` as
        its child (a filter above it).
        """
        below_new = _descendants(new)
        for child in list(old.parents):
            # never create a loop: an edge whose parent lies below ``new`` (say the
            # backing link of the target of a filter inserted above ``old``) stays
            if child.parent is new or child.parent in below_new:
                continue
            child.replace(new)
        for dev, n in list(self.devices.items()):
            if n is old:
                self.devices[dev] = new

    def is_root(self, node: Node) -> bool:
        """No other node uses it (devices, exports and jobs may: QEMU's root node)."""
        return all(c.parent is None for c in node.parents)

    def auto_name(self) -> str:
        self._auto += 1
        return f"#block{self._auto:03d}"

    # -- opening ---------------------------------------------------------------

    async def add(
        self,
        opts: dict[str, Any],
        *,
        typed: bool = True,
        drive_style: bool = False,
        inherited: dict[str, Any] | None = None,
        monitor: bool = False,
    ) -> Node:
        """Open a node (and the children its options describe) from an options dict."""
        opts = dict(opts)
        driver = opts.get("driver")
        if driver is None:
            if "filename" in opts:
                driver = "file"
            elif drive_style and isinstance(opts.get("file"), dict) and "filename" in opts["file"]:
                driver = probe_format(opts["file"]["filename"])
            else:
                raise OptionError("Parameter 'driver' is missing")
            opts["driver"] = driver
        if not isinstance(driver, str):
            raise OptionError("Invalid parameter type for 'driver', expected: string")
        cls = driver_class(driver)
        if cls is None:
            if drive_style:
                raise OptionError(f"Unknown driver '{driver}'")
            raise OptionError(f"Parameter 'driver' does not accept value '{driver}'")
        schema = {**COMMON_SCHEMA, **cls.schema}
        unknown = (
            f"Block format '{driver}' does not support the option '{{name}}'"
            if drive_style
            else "Parameter '{name}' is unexpected"
        )
        opts = check(schema, opts, typed=typed, unknown=unknown)
        for key, value in (inherited or {}).items():
            opts.setdefault(key, value)
        name = opts.get("node-name")
        if name is None:
            name = self.auto_name()
        else:
            if not _NODE_NAME_RE.match(name):
                raise OptionError(f"Invalid node-name: '{name}'")
            if name in self.nodes or name in self.devices:
                raise OptionError(f"Duplicate nodes with node-name='{name}'")
        node = await cls.open(self, name, opts, typed=typed)  # type: ignore[attr-defined]
        node.graph = self
        self.nodes[name] = node
        if monitor:
            self.monitor_owned.add(name)
        for cb in self.on_open:
            cb(node)
        return node

    async def open_child(
        self,
        parent_opts: dict[str, Any],
        role: str,
        *,
        typed: bool,
        default_driver: str | None = None,
        required: bool = True,
    ) -> Node | None:
        """Open (or look up) the child ``role`` described in the parent's options."""
        ref = parent_opts.get(role)
        if ref is None:
            if required:
                raise OptionError(f'A block device must be specified for "{role}"')
            return None
        if isinstance(ref, str):
            return self.lookup(ref)
        child_opts = dict(ref)
        if "driver" not in child_opts and default_driver:
            child_opts["driver"] = default_driver
        inherited = {}
        if parent_opts.get("read-only"):
            inherited["read-only"] = True
        if "cache" in parent_opts:
            inherited["cache"] = parent_opts["cache"]
        return await self.add(child_opts, typed=typed, inherited=inherited)

    # -- closing ---------------------------------------------------------------

    async def close_node(self, node: Node) -> None:
        """Close a node and every child it alone held that no one else uses."""
        if node.node_name not in self.nodes or node.closed:
            return
        await node.close()
        self.nodes.pop(node.node_name, None)
        self.monitor_owned.discard(node.node_name)
        for role in list(node.children):
            child = node.detach_child(role)
            if (
                not child.parents
                and child.node_name not in self.monitor_owned
                and not self.has_backend(child)
            ):
                await self.close_node(child)

    async def close_all(self) -> None:
        for dev in list(self.devices):
            self.devices.pop(dev)
        # roots first, so that children are released by their parents
        while self.nodes:
            roots = [n for n in self.nodes.values() if not n.parents] or list(self.nodes.values())
            for n in roots:
                try:
                    await n.flush()
                except BlockError:
                    pass
                self.monitor_owned.discard(n.node_name)
                await self.close_node(n)


def _descendants(node: Node) -> set[Node]:
    seen: set[Node] = set()
    stack = [c.node for c in node.children.values()]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(c.node for c in n.children.values())
    return seen


def resolve_relative(base_file: str, target: str) -> str:
    """A backing file name relative to the directory of the image naming it."""
    if os.path.isabs(target) or "://" in target or target.startswith("json:"):
        return target
    return os.path.join(os.path.dirname(base_file), target)
