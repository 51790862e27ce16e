"""NBD server and export commands: nbd-server-*, block-export-*, query-block-exports."""

from __future__ import annotations

from typing import Any, Protocol

from ..blockdev import (
    BLOCK_EXPORT_OPTIONS,
    BLOCK_EXPORT_REQUIRED,
    NBD_SERVER_OPTIONS,
    BlockExports,
)
from ..errors import QMPError
from .table import CommandTable, args_of


class ExportContext(Protocol):
    """What the export commands use: the NBD server and its exports, nothing of the graph."""

    block_exports: BlockExports


REMOVE_MODE = ("enum", ("safe", "hard"))


def register(table: CommandTable, ctx: ExportContext) -> None:
    @table.command("nbd-server-start")
    async def nbd_server_start(args: dict[str, Any]) -> Any:
        a = args_of(NBD_SERVER_OPTIONS, args, ("addr",))
        await ctx.block_exports.nbd_server_start_options(a)
        return {}

    @table.command("nbd-server-stop")
    async def nbd_server_stop(args: dict[str, Any]) -> Any:
        args_of({}, args)
        await ctx.block_exports.nbd_server_stop()
        return {}

    @table.command("nbd-server-add")
    async def nbd_server_add(args: dict[str, Any]) -> Any:
        a = args_of(
            {
                "device": "str",
                "name": "str",
                "description": "str",
                "writable": "bool",
                "bitmap": "str",
            },
            args,
            ("device",),
        )
        if "bitmap" in a:
            raise QMPError("blockrep does not export dirty bitmaps")
        name = a.get("name", a["device"])
        await ctx.block_exports.export_add(
            name,
            a["device"],
            name,
            a.get("writable", False),
            a.get("description", ""),
            legacy=True,
        )
        return {}

    @table.command("nbd-server-remove")
    async def nbd_server_remove(args: dict[str, Any]) -> Any:
        a = args_of({"name": "str", "mode": REMOVE_MODE}, args, ("name",))
        await ctx.block_exports.export_del_by_name(a["name"], a.get("mode", "safe"))
        return {}

    @table.command("block-export-add")
    async def block_export_add(args: dict[str, Any]) -> Any:
        a = args_of(BLOCK_EXPORT_OPTIONS, args, BLOCK_EXPORT_REQUIRED)
        await ctx.block_exports.block_export_add(a)
        return {}

    @table.command("block-export-del")
    async def block_export_del(args: dict[str, Any]) -> Any:
        a = args_of({"id": "str", "mode": REMOVE_MODE}, args, ("id",))
        await ctx.block_exports.export_del(a["id"], a.get("mode", "safe"))
        return {}

    @table.command("query-block-exports")
    async def query_block_exports(args: dict[str, Any]) -> Any:
        args_of({}, args)
        return [
            {"type": "nbd", "id": e.id, "node-name": e.node.node_name, "shutting-down": False}
            for e in ctx.block_exports.exports.values()
        ]
