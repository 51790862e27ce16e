"""The HA manager's QMP commands, registered into the daemon's CommandTable.

``query-ha-status`` and ``query-ha-events`` on both roles, ``replication-checkpoint``
on the primary, ``ha-failover`` on the secondary, ``ha-resolve`` on both (resolve.py). The handlers
are thin: the roles do the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import QMPError
from . import channel, events
from .config import qmp_socket_path

if TYPE_CHECKING:
    from ..daemon import Daemon
    from .primary import Primary
    from .role import BaseRole
    from .secondary import Secondary
    from .states import HistoryEntry


def register_status(role: BaseRole) -> None:
    """``query-ha-status``, and ``query-ha-events {cursor}`` fed by a status poller
    (events.py) whose task joins the role's tasks."""
    evlog = events.EventLog()

    async def query_ha_status(args: dict[str, Any]) -> Any:
        return await role.status()

    async def query_ha_events(args: dict[str, Any]) -> Any:
        cursor = args.get("cursor", 0)
        if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
            raise QMPError("cursor must be a non-negative integer")
        evlog.observe(await role.status())  # what is true now is in the answer
        return evlog.since(cursor)

    role.d.qmp.commands.register("query-ha-status", query_ha_status)
    role.d.qmp.commands.register("query-ha-events", query_ha_events)
    role.tasks.append(asyncio.create_task(events.watch(evlog, role.status)))


def register_primary(p: Primary) -> None:
    async def replication_checkpoint(args: dict[str, Any]) -> Any:
        try:
            return await p.checkpoint()
        except channel.ChannelError as e:
            # the control channel's errors are outside blockrep's error tree
            raise QMPError(str(e)) from None

    p.d.qmp.commands.register("replication-checkpoint", replication_checkpoint)


def register_resolve(role: BaseRole, peer_history: Callable[[], list[HistoryEntry] | None]) -> None:
    """``ha-resolve {"discard-local": true}``: give up this node's writes (split brain only)."""

    async def ha_resolve(args: dict[str, Any]) -> Any:
        from . import resolve  # resolve imports role, which imports this module

        if args.get("discard-local") is not True:
            raise QMPError("ha-resolve: only discard-local is supported; nothing was changed")
        try:
            return await resolve.discard_local(role, peer_history())
        except resolve.ResolveRefused as e:
            raise QMPError(str(e)) from None

    role.d.qmp.commands.register("ha-resolve", ha_resolve)


def register_secondary(s: Secondary) -> None:
    async def ha_failover(args: dict[str, Any]) -> Any:
        await s.failover()
        return {}

    s.d.qmp.commands.register("ha-failover", ha_failover)


async def listen(d: Daemon, qmp: str) -> None:
    """Serve QMP on ``unix:PATH`` (or a bare path)."""
    await d.qmp.listen_unix(qmp_socket_path(qmp))
