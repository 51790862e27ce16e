"""Block graph commands: blockdev-add/-del, x-blockdev-change, query-block and friends."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from ..block.image_info import image_info
from ..block.node import Node
from ..errors import QMPError
from .table import CommandTable, args_of

if TYPE_CHECKING:
    from ..block import Graph
    from ..blockdev import Blockdev


class BlockContext(Protocol):
    """What the block commands use: the graph and the monitor's operations on it."""

    graph: Graph
    blockdev: Blockdev


def block_device_info(node: Node, flat: bool = False) -> dict[str, Any]:
    """QAPI BlockDeviceInfo of a node."""
    depth = 0
    cur = node.backing
    while cur is not None:
        depth += 1
        cur = cur.backing
    cache = node.options.get("cache", {})
    info: dict[str, Any] = {
        "file": node.describe_filename(),
        "node-name": node.node_name,
        "ro": node.read_only,
        "drv": node.driver_name,
        "encrypted": False,
        "detect_zeroes": node.options.get("detect-zeroes", "off"),
        "bps": 0,
        "bps_rd": 0,
        "bps_wr": 0,
        "iops": 0,
        "iops_rd": 0,
        "iops_wr": 0,
        "image": image_info(node, flat=flat),
        "cache": {
            "writeback": True,
            "direct": bool(cache.get("direct", False)),
            "no-flush": bool(cache.get("no-flush", False)),
        },
        "write_threshold": 0,
        "backing_file_depth": depth,
    }
    if node.backing is not None:
        info["backing_file"] = node.backing.describe_filename()
    return info


def register(table: CommandTable, ctx: BlockContext) -> None:
    @table.command("blockdev-add")
    async def blockdev_add(args: dict[str, Any]) -> Any:
        if "node-name" not in args:
            raise QMPError("'node-name' must be specified for the root node")
        await ctx.graph.add(args, typed=True, monitor=True)
        return {}

    async def blockdev_del(args: dict[str, Any]) -> Any:
        a = args_of({"node-name": "str"}, args, ("node-name",))
        await ctx.blockdev.blockdev_del(a["node-name"])
        return {}

    # x-blockdev-del: the name before QEMU 2.9, which older COLO how-tos still use
    table.register("blockdev-del", blockdev_del)
    table.register("x-blockdev-del", blockdev_del)

    @table.command("x-blockdev-change")
    async def x_blockdev_change(args: dict[str, Any]) -> Any:
        a = args_of({"parent": "str", "child": "str", "node": "str"}, args, ("parent",))
        ctx.blockdev.blockdev_change(a["parent"], a.get("child"), a.get("node"))
        return {}

    @table.command("query-named-block-nodes")
    async def query_named_block_nodes(args: dict[str, Any]) -> Any:
        a = args_of({"flat": "bool"}, args)
        return [block_device_info(n, a.get("flat", False)) for n in ctx.graph.nodes.values()]

    @table.command("query-block")
    async def query_block(args: dict[str, Any]) -> Any:
        args_of({}, args)
        return [
            {
                "device": dev,
                "locked": False,
                "removable": False,
                "type": "unknown",
                "inserted": block_device_info(node),
            }
            for dev, node in ctx.graph.devices.items()
        ]

    @table.command("x-blkdebug-set-rules")
    async def x_blkdebug_set_rules(args: dict[str, Any]) -> Any:
        # the driver is loaded on first use, like every driver
        from ..block.blkdebug import BlkdebugNode, parse_rules

        a = args_of({"node-name": "str", "inject-error": ("list", "any")}, args, ("node-name",))
        node = ctx.graph.lookup(a["node-name"])
        if not isinstance(node, BlkdebugNode):
            raise QMPError(f"Node '{a['node-name']}' is not a blkdebug node")
        node.set_rules(parse_rules(a.get("inject-error", []), True))
        return {}
