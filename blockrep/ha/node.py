"""``blockrep up FILE``: one node of a resource whose role changes at run time.

The node comes up with role ``none``: a secondary that answers its peer's hello but
never makes itself primary (after a crash neither node knows which one should be).
``promote`` makes it primary — failing over first if a primary was replicating to it —
and it then pairs with its peer by itself, again after every loss: a failed-over node
re-protects itself as soon as the other node is back, without a restart. ``demote``
and ``switchover`` hand over cleanly (a final checkpoint, an empty activity log), so
the next pairing copies nothing. ``down`` is an orderly stop.

A role change keeps the process, the QMP socket and the consumer's NBD connections:
the consumer's export is held (quiesced) while one role's graph closes and the
next one's opens, then moves to the new top (role.Host). Role-changing verbs are
serialised; a refusal names its reason and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

from ..errors import QMPError
from . import auth, channel, metrics, qmp
from .config import (
    Mode,
    OutdateFailure,
    PrimaryConfig,
    SecondaryConfig,
    VolumeSpec,
    default_state_file,
)
from .primary import Primary
from .resource import Resource
from .role import BaseRole, Host, PeerStatus
from .secondary import Secondary
from .states import DiskState, EntryKind
from .states import Role as RoleName

log = logging.getLogger("blockrep.ha")


@dataclass(frozen=True)
class UpOptions:
    """``blockrep up``'s options beyond the resource file."""

    metrics: str | None = None
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 3.0
    failover_timeout: float = 5.0
    no_activity_log: bool = False
    resync_rate: int = 0  # bytes/s (primary's --resync-rate)
    resync_min_rate: int = 0
    outdate_peer_command: str | None = None  # as primary (failover-point latest)
    on_outdate_failure: OutdateFailure = OutdateFailure.FREEZE


class RoleChangeRefused(QMPError):
    """A promote/demote/switchover that cannot be done now: nothing was changed."""


class HANode:
    def __init__(self, res: Resource, name: str, opts: UpOptions | None = None) -> None:
        self.res = res
        self.me = res.node(name)
        self.peer_cfg = res.peer_of(name)
        self.opts = opts or UpOptions()
        if res.volume_count != 1 and res.mode.value == "shared":
            raise RoleChangeRefused(
                f"resource {res.name}: {res.volume_count} volumes in shared mode; several "
                "volumes are replicated as one group in separate mode only so far"
            )
        sec, where = res.security, f"resource {res.name}"  # refused now, not at a role change
        auth.for_pair(
            self.me.address, sec.psk_file, sec.tls_dir, sec.insecure, where, auth.RESOURCE_KEYS
        )
        self.vol = self.me.volumes[0]  # its disk names the state file and activity log
        self.host = Host.load(default_state_file(self.vol.disk))
        self.role: BaseRole | None = None
        self.lock = asyncio.Lock()
        self.tasks: list[asyncio.Task[Any]] = []
        self.changes = 0  # role changes done (status's ``role-changes``)

    # -- the two roles' configs ----------------------------------------------------------

    def _common(self) -> dict[str, Any]:
        disk = self.vol.disk
        vols = tuple(
            VolumeSpec(v.disk, self._addr(v.export.address), v.export.name) for v in self.me.volumes
        )
        return {
            "volumes": vols if len(vols) > 1 else (),
            "disk": disk,
            "mode": Mode(self.res.mode.value),
            "export": self._addr(self.vol.export.address),
            "export_name": self.vol.export.name,
            "qmp": None,  # the node serves QMP itself, across role changes
            "metrics": None,
            "tls_dir": self.res.security.tls_dir,
            "psk_file": self.res.security.psk_file,
            "insecure": self.res.security.insecure,
            "export_tls_dir": self.me.export_tls_dir,
            "failover_point": self.res.failover_point,
            "state_file": default_state_file(disk),
            "heartbeat_interval": self.opts.heartbeat_interval,
            "heartbeat_timeout": self.opts.heartbeat_timeout,
        }

    @staticmethod
    def _addr(cfg_addr: Any) -> str:
        return f"unix:{cfg_addr.path}" if cfg_addr.type == "unix" else cfg_addr.describe()

    def primary_config(self, initial_sync: bool = False) -> PrimaryConfig:
        return PrimaryConfig(
            **self._common(),
            secondary=self._addr(self.peer_cfg.address),
            checkpoint_interval=self.res.checkpoint_interval,
            assume_synced=False,
            initial_sync=initial_sync,
            connect_timeout=1.0,
            reconnect=True,  # re-protect: pair again after every loss of the peer
            progress=False,
            activity_log=not self.opts.no_activity_log,
            resync_rate=self.opts.resync_rate,
            resync_min_rate=self.opts.resync_min_rate,
            outdate_peer_command=self.opts.outdate_peer_command,
            on_outdate_failure=self.opts.on_outdate_failure,
        )

    def secondary_config(self) -> SecondaryConfig:
        return SecondaryConfig(
            **self._common(),
            listen=self._addr(self.me.address),
            buffer_dir=self.me.buffer_dir,
            auto_failover=False,  # a person or a cluster manager promotes (node.py's doc)
            failover_timeout=self.opts.failover_timeout,
            fence_command=None,
            link_port=self.me.link_port,
            keep_buffer_pages=self.me.keep_buffer_pages,
        )

    # -- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Come up with role none; serve QMP, the consumer's export and the control address."""
        self.host.was_clean = self.host.state.start(RoleName.NONE)
        qmp.register_node(self)
        await qmp.listen(self.host.d, self.me.qmp)
        if self.opts.metrics:
            self.tasks.append(metrics.serve(self.opts.metrics, self.status))
        await self._become(self._new_secondary())

    def _new_secondary(self) -> Secondary:
        s = Secondary(self.secondary_config(), self.host)
        s.on_handover = self._on_handover
        return s

    async def _become(self, new: BaseRole) -> None:
        """Release the current role and activate ``new`` (the consumer held meanwhile)."""
        exp = self.host.export
        if exp is not None:
            await exp.quiesce()
        try:
            if self.role is not None:
                await self.role.release()
                self.changes += 1
            self.role = new
            await new.activate()
        finally:
            if exp is not None:
                exp.resume()
        log.warning(
            "resource %s: node %s is now %s", self.res.name, self.me.name, new.shown_role.value
        )

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(
                sig, lambda: self.tasks.append(asyncio.create_task(self.down()))
            )
        quit_ = asyncio.create_task(self.host.d.shutdown_event.wait())  # QMP quit
        stop = asyncio.create_task(self.host.stopping.wait())
        await asyncio.wait({quit_, stop}, return_when=asyncio.FIRST_COMPLETED)
        for t in (quit_, stop, *self.tasks):
            if t is not asyncio.current_task():
                t.cancel()
        if self.role is not None:
            await self.role.shutdown()

    # -- role changes ----------------------------------------------------------------------

    def _on_handover(self, promote: bool) -> None:
        """The primary handed over cleanly (its final checkpoint is here): promote
        (switchover), or start afresh as a secondary that awaits the next primary."""
        self.tasks.append(asyncio.create_task(self._after_handover(promote)))

    async def _after_handover(self, promote: bool) -> None:
        try:
            if promote:
                await self.promote(handover=True)
            else:
                async with self.lock:
                    await self._become(self._new_secondary())
        except Exception as e:  # noqa: BLE001 - reported in status, the node goes on
            log.exception("handover")
            if self.role is not None:
                self.role.error(f"handover: {getattr(e, 'message', e)}")

    async def promote(self, force: bool = False, handover: bool = False) -> dict[str, Any]:
        """Become primary. ``force``: a node without history copies its whole disk to
        the peer (a new resource's first promote); ``handover``: the peer asked
        (switchover), so it is not primary any more."""
        async with self.lock:
            role = self.role
            if isinstance(role, Primary):
                return {"role": "primary", "changed": False}
            assert isinstance(role, Secondary)
            st = self.host.state
            if st.disk_state in (DiskState.INCONSISTENT, DiskState.OUTDATED):
                raise RoleChangeRefused(
                    f"promote refused (I3): this disk is {st.disk_state.value}; it holds "
                    "no usable data until a resync from the peer completes; nothing was changed"
                )
            heard = time.monotonic() - role.last_heard
            if (
                not handover
                and role.started
                and role.connections > 0
                and role.peer is PeerStatus.CONNECTED
                and heard < role.cfg.failover_timeout
            ):
                raise RoleChangeRefused(
                    "promote refused: the peer is primary and replicating to this node "
                    f"(heard {heard:.1f} s ago); demote it first or run switchover on it; "
                    "nothing was changed"
                )
            if role.started:
                # the primary is gone: fail over (I2 marks what the commit changes)
                await role.failover()
            else:
                # no primary replicates here: writes from now on are this node's alone
                with st.update():
                    st.go_alone(EntryKind.DEGRADED)
            await self._become(Primary(self.primary_config(initial_sync=force), self.host))
            return {"role": "primary", "changed": True}

    async def demote(self, promote_peer: bool = False) -> dict[str, Any]:
        """Become a secondary (``promote_peer``: switchover — the peer becomes primary)."""
        async with self.lock:
            role = self.role
            if not isinstance(role, Primary):
                if promote_peer:
                    raise RoleChangeRefused(
                        "switchover refused: this node is not primary; run it on the primary"
                    )
                return {
                    "role": self.role.shown_role.value if self.role else "none",
                    "changed": False,
                }
            exp = self.host.export
            if exp is not None:
                await exp.quiesce()
            try:
                try:
                    await role.hand_over(promote_peer)
                except channel.ChannelError as e:
                    raise RoleChangeRefused(f"{e}; nothing was changed") from None
                await self._become(self._new_secondary())
            finally:
                if exp is not None:
                    exp.resume()
            return {"role": "secondary", "changed": True}

    async def down(self) -> dict[str, Any]:
        """An orderly stop: a primary hands over cleanly, the state file says clean."""
        async with self.lock:
            role = self.role
            if isinstance(role, Primary):
                exp = self.host.export
                if exp is not None:
                    await exp.quiesce()
                try:
                    await role.hand_over(False)
                except Exception as e:  # noqa: BLE001 - stopping anyway; the next pairing copies more
                    role.error(f"down: no clean handover: {getattr(e, 'message', e)}")
            try:
                if role is not None:
                    role.flush_alone_writes()
                self.host.state.stop()
            except Exception as e:  # noqa: BLE001
                log.warning("down: %s", e)
            self.host.stopping.set()
            return {}

    # -- status ----------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        assert self.role is not None
        s = await self.role.status()
        s["resource"] = self.res.name
        s["node"] = self.me.name
        s["peer-node"] = self.peer_cfg.name
        s["role-changes"] = self.changes
        return s
