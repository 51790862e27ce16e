"""The HA manager's QMP commands, registered into the daemon's CommandTable.

``query-ha-status`` and ``query-ha-events`` on both roles, ``replication-checkpoint``
and the online verify's (``ha-verify``, ``ha-verify-cancel``, ``ha-resync-out-of-sync``)
on the primary, ``ha-failover`` on the secondary, ``ha-resolve`` on both (resolve.py);
``blockrep up``'s node (node.py) registers the same names once, plus the role verbs, and
sends each to the role it holds. The handlers are thin: the roles do the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..errors import QMPError
from . import channel, events
from .config import qmp_socket_path

if TYPE_CHECKING:
    from ..daemon import Daemon
    from .node import HANode
    from .primary import Primary
    from .role import BaseRole
    from .secondary import Secondary
    from .states import HistoryEntry


def register_status(role: BaseRole) -> None:
    """``query-ha-status``, and ``query-ha-events {cursor}`` fed by a status poller
    (events.py) whose task joins the role's tasks."""
    _register_status(role.d, role.status, role.tasks)


def _register_status(
    d: Daemon, status: Callable[[], Awaitable[dict[str, Any]]], tasks: list[asyncio.Task[Any]]
) -> None:
    evlog = events.EventLog()

    async def query_ha_status(args: dict[str, Any]) -> Any:
        return await status()

    async def query_ha_events(args: dict[str, Any]) -> Any:
        cursor = args.get("cursor", 0)
        if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
            raise QMPError("cursor must be a non-negative integer")
        evlog.observe(await status())  # what is true now is in the answer
        return evlog.since(cursor)

    d.qmp.commands.register("query-ha-status", query_ha_status)
    d.qmp.commands.register("query-ha-events", query_ha_events)
    tasks.append(asyncio.create_task(events.watch(evlog, status)))


def register_node(node: HANode) -> None:
    """``blockrep up``'s commands: status and events across role changes, and the
    verbs (``ha-promote {force}``, ``ha-demote``, ``ha-switchover``, ``ha-down``;
    ``ha-failover`` is promote). ``replication-checkpoint`` and ``ha-resolve`` go to
    the role the node holds when they arrive."""
    d = node.host.d
    _register_status(d, node.status, node.tasks)
    table = d.qmp.commands

    async def promote(args: dict[str, Any]) -> Any:
        return await node.promote(force=args.get("force") is True)

    async def demote(args: dict[str, Any]) -> Any:
        return await node.demote()

    async def switchover(args: dict[str, Any]) -> Any:
        return await node.demote(promote_peer=True)

    async def down(args: dict[str, Any]) -> Any:
        return await node.down()

    async def outdate_node(args: dict[str, Any]) -> Any:
        from .outdate import outdate_secondary  # imports the roles, which import this module
        from .secondary import Secondary

        if not isinstance(node.role, Secondary):
            raise QMPError("ha-outdate: this node is not a secondary")
        try:
            return outdate_secondary(node.role, "blockrep outdate")
        except channel.ChannelError as e:
            raise QMPError(str(e)) from None

    async def checkpoint(args: dict[str, Any]) -> Any:
        from .primary import Primary  # primary imports this module

        if not isinstance(node.role, Primary):
            raise QMPError("replication-checkpoint: this node is not primary")
        try:
            return await node.role.checkpoint()
        except channel.ChannelError as e:
            raise QMPError(str(e)) from None

    async def resolve_(args: dict[str, Any]) -> Any:
        from . import resolve

        if args.get("discard-local") is not True:
            raise QMPError("ha-resolve: only discard-local is supported; nothing was changed")
        role = node.role
        assert role is not None
        try:
            return await resolve.discard_local(role, getattr(role, "peer_history", None))
        except resolve.ResolveRefused as e:
            raise QMPError(str(e)) from None

    def current_primary() -> Primary | None:
        from .primary import Primary

        return node.role if isinstance(node.role, Primary) else None

    _register_resync(d, current_primary)
    _register_verify(d, current_primary)
    for name, fn in (
        ("ha-promote", promote),
        ("ha-failover", promote),
        ("ha-demote", demote),
        ("ha-switchover", switchover),
        ("ha-down", down),
        ("ha-outdate", outdate_node),
        ("replication-checkpoint", checkpoint),
        ("ha-resolve", resolve_),
    ):
        table.register(name, fn)


def register_primary(p: Primary) -> None:
    async def replication_checkpoint(args: dict[str, Any]) -> Any:
        try:
            return await p.checkpoint()
        except channel.ChannelError as e:
            # the control channel's errors are outside blockrep's error tree
            raise QMPError(str(e)) from None

    p.d.qmp.commands.register("replication-checkpoint", replication_checkpoint)
    _register_resync(p.d, lambda: p)
    _register_verify(p.d, lambda: p)


def _register_resync(d: Daemon, primary: Callable[[], Primary | None]) -> None:
    """``ha-resync-pause`` and ``ha-resync-resume`` on the node's primary (its resync)."""

    def control(pause: bool) -> Any:
        p = primary()
        if p is None:
            raise QMPError("no resync is running: this node is not primary")
        try:
            return p.resync_control(pause)
        except channel.ChannelError as e:
            raise QMPError(str(e)) from None

    async def pause(args: dict[str, Any]) -> Any:
        return control(True)

    async def resume(args: dict[str, Any]) -> Any:
        return control(False)

    d.qmp.commands.register("ha-resync-pause", pause)
    d.qmp.commands.register("ha-resync-resume", resume)


def _register_verify(d: Daemon, primary: Callable[[], Primary | None]) -> None:
    """``ha-verify {rate, restart}``, ``ha-verify-cancel`` and ``ha-resync-out-of-sync``
    on the node's primary (verify.py); a refusal is the QMP error's text."""
    from .verify import VerifyRefused

    def verify_of(what: str) -> Any:
        p = primary()
        if p is None:
            raise QMPError(f"{what} refused: this node is not primary")
        return p.verify

    async def start(args: dict[str, Any]) -> Any:
        rate, restart = args.get("rate", 0), args.get("restart", False)
        if type(rate) is not int or rate < 0 or not isinstance(restart, bool):
            raise QMPError("ha-verify: 'rate' is bytes/s (an integer >= 0), 'restart' a bool")
        try:
            return verify_of("verify").start(rate, restart)
        except VerifyRefused as e:
            raise QMPError(str(e)) from None

    async def cancel(args: dict[str, Any]) -> Any:
        try:
            return await verify_of("verify-cancel").cancel()
        except VerifyRefused as e:
            raise QMPError(str(e)) from None

    async def repair(args: dict[str, Any]) -> Any:
        try:
            return await verify_of("resync --out-of-sync").repair()
        except (VerifyRefused, channel.ChannelError) as e:
            raise QMPError(str(e)) from None

    d.qmp.commands.register("ha-verify", start)
    d.qmp.commands.register("ha-verify-cancel", cancel)
    d.qmp.commands.register("ha-resync-out-of-sync", repair)


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
