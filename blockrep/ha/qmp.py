"""The HA manager's QMP commands, registered into the daemon's CommandTable.

``query-ha-status`` on both roles, ``replication-checkpoint`` on the primary,
``ha-failover`` on the secondary. The handlers are thin: the roles do the work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import QMPError
from . import channel
from .config import qmp_socket_path

if TYPE_CHECKING:
    from ..daemon import Daemon
    from .primary import Primary
    from .role import BaseRole
    from .secondary import Secondary


def register_status(role: BaseRole) -> None:
    async def query_ha_status(args: dict[str, Any]) -> Any:
        return await role.status()

    role.d.qmp.commands.register("query-ha-status", query_ha_status)


def register_primary(p: Primary) -> None:
    async def replication_checkpoint(args: dict[str, Any]) -> Any:
        try:
            return await p.checkpoint()
        except channel.ChannelError as e:
            # the control channel's errors are outside blockrep's error tree
            raise QMPError(str(e)) from None

    p.d.qmp.commands.register("replication-checkpoint", replication_checkpoint)


def register_secondary(s: Secondary) -> None:
    async def ha_failover(args: dict[str, Any]) -> Any:
        await s.failover()
        return {}

    s.d.qmp.commands.register("ha-failover", ha_failover)


async def listen(d: Daemon, qmp: str) -> None:
    """Serve QMP on ``unix:PATH`` (or a bare path)."""
    await d.qmp.listen_unix(qmp_socket_path(qmp))
