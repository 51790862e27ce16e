"""Commands about the monitor and the process: query-version, query-commands, quit."""

from __future__ import annotations

from typing import Any, Protocol

from .. import __version__, fastpath, polling
from .table import CommandTable, args_of


class ControlContext(Protocol):
    """What quit uses: a way to end the process cleanly."""

    def request_shutdown(self, reason: str) -> None: ...


def register(table: CommandTable, ctx: ControlContext) -> None:
    @table.command("query-version")
    async def query_version(args: dict[str, Any]) -> Any:
        args_of({}, args)
        return {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": f"blockrep {__version__}"}

    @table.command("query-commands")
    async def query_commands(args: dict[str, Any]) -> Any:
        args_of({}, args)
        # qmp_capabilities is answered by the session itself, yet QEMU lists it
        return [{"name": n} for n in sorted([*table, "qmp_capabilities"])]

    @table.command("x-blockrep-fast-path")
    async def fast_path(args: dict[str, Any]) -> Any:
        """Which path requests took: the fast path's counters and its switch, and the
        loop's polling after I/O (issue 15)."""
        args_of({}, args)
        return {**fastpath.snapshot(), "polling": polling.POLLER.snapshot()}

    @table.command("quit")
    async def quit_(args: dict[str, Any]) -> Any:
        args_of({}, args)
        ctx.request_shutdown("host-qmp-quit")
        return {}
