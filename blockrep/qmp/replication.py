"""COLO block replication commands: xen-set-replication, xen-colo-do-checkpoint, queries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from ..errors import QMPError, ReplicationError
from ..replication.filter import ReplicationMode
from .table import CommandTable, args_of

if TYPE_CHECKING:
    from ..replication.registry import ReplicationRegistry


class ReplicationContext(Protocol):
    """What the replication commands use: the registry of replication nodes."""

    replication: ReplicationRegistry


def register(table: CommandTable, ctx: ReplicationContext) -> None:
    @table.command("xen-set-replication")
    async def xen_set_replication(args: dict[str, Any]) -> Any:
        a = args_of(
            {"enable": "bool", "primary": "bool", "failover": "bool"}, args, ("enable", "primary")
        )
        mode = ReplicationMode.PRIMARY if a["primary"] else ReplicationMode.SECONDARY
        if "failover" in a and a["enable"]:
            raise QMPError("Parameter 'failover' is only for stopping replication")
        if a["enable"]:
            await ctx.replication.start_all(mode)
        elif a.get("failover"):
            # QEMU drops every error of a failover stop; so does blockrep, but
            # query-replication shows them per node
            try:
                await ctx.replication.stop_all(True)
            except ReplicationError:
                pass
        else:
            await ctx.replication.stop_all(False)
        return {}

    @table.command("xen-colo-do-checkpoint")
    async def xen_colo_do_checkpoint(args: dict[str, Any]) -> Any:
        args_of({}, args)
        await ctx.replication.do_checkpoint_all()
        return {}

    @table.command("query-xen-replication-status")
    async def query_xen_replication_status(args: dict[str, Any]) -> Any:
        args_of({}, args)
        try:
            ctx.replication.get_error_all()
        except ReplicationError as e:
            return {"error": True, "desc": e.message}
        return {"error": False}

    @table.command("query-replication")
    async def query_replication(args: dict[str, Any]) -> Any:
        args_of({}, args)
        return [await ctx.replication.status(n) for n in ctx.replication.nodes]
