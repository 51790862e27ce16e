"""``blockrep secondary``: the node that answers.

It builds SPEC §2/§3's secondary graph (hidden/active overlays in --buffer-dir),
serves the replication link (NBD) next to its control address, answers the primary's
hello/start/checkpoint/heartbeat, watches the heartbeat (watchdog.py), and fails
over — by hand (``blockrep failover``) or, with ``--auto-failover``, after
``--fence-command`` succeeded.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

from ..address import SocketAddress
from ..errors import ReplicationError
from ..qcow2.create import create_file
from ..replication.filter import ReplicationMode, ReplicationStage
from ..replication.identity import disk_identity
from . import channel, pairing, qmp, watchdog
from .config import SecondaryConfig, default_buffer_dir
from .role import BaseRole, PeerStatus, esc
from .state import chunks_to_ranges
from .states import EntryKind
from .states import Role as RoleName

FAILOVER_WAIT = 3600.0  # seconds the failover commit may take before it counts as failed


class Secondary(BaseRole):
    role = RoleName.SECONDARY
    cfg: SecondaryConfig

    def __init__(self, cfg: SecondaryConfig) -> None:
        super().__init__(cfg)
        self.last_heard = 0.0
        self.started = False
        # a node that failed over in an earlier life is a plain disk: never a secondary again
        self.failed_over = self.state.alone_since is not None and self.state.alone_since.startswith(
            f"{EntryKind.FAILOVER.value}:"
        )
        self.link_addr = ""
        self.link_export = ""
        self.hidden = ""  # overlay files, made in setup()
        self.active = ""
        self.auto_failover_reason = ""
        self.failover_lock = asyncio.Lock()
        self.server: asyncio.AbstractServer | None = None

    def auto_failover_status(self) -> dict[str, Any]:
        return watchdog.auto_failover_status(self.cfg, self.auto_failover_reason)

    async def shutdown(self) -> None:
        await super().shutdown()
        # the overlays are throw-away buffers (a restart makes new ones): free the tmpfs
        for path in (self.hidden, self.active):
            if path:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    async def setup(self) -> None:
        size = os.path.getsize(self.disk)
        bdir = self.cfg.buffer_dir or default_buffer_dir(self.disk)
        stem = os.path.basename(self.disk)
        tag = uuid.uuid4().hex[:8]
        self.hidden = os.path.join(bdir, f"blockrep-{stem}-{tag}-hidden.qcow2")
        self.active = os.path.join(bdir, f"blockrep-{stem}-{tag}-active.qcow2")
        await create_file(self.hidden, size)
        await create_file(self.active, size)
        await self._build_graph()
        if not self.failed_over:
            await self._serve_link()
        await self.start_consumer_export()
        qmp.register_secondary(self)
        await self.start_qmp()
        self.start_metrics()
        self.server = await channel.listen(self.cfg.listen, self._on_conn, self.tls_server)
        self.tasks.append(asyncio.create_task(watchdog.watch_primary(self)))

    async def _build_graph(self) -> None:
        d = self.d
        if self.failed_over:
            # this node went on alone before: it is a plain disk now, never a secondary
            await d.blockdev.drive_add(
                f"if=none,id=colo-disk0,driver=raw,file.filename={esc(self.disk)}"
            )
            self.top_device = "colo-disk0"
            self.peer = PeerStatus.FAILED_OVER
        elif not self.shared:
            await d.blockdev.drive_add(
                f"if=none,id=parent0,driver=raw,file.filename={esc(self.disk)}"
            )
            await d.blockdev.drive_add(
                "if=none,id=childs0,driver=replication,mode=secondary,top-id=colo-disk0,"
                f"file.driver=qcow2,file.node-name=active0,file.file.filename={esc(self.active)},"
                f"file.backing.driver=qcow2,file.backing.node-name=hidden0,"
                f"file.backing.file.filename={esc(self.hidden)},file.backing.backing=parent0"
            )
            await d.blockdev.drive_add(
                "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0=childs0"
            )
            self.top_device = "colo-disk0"
            self.link_export = "parent0"
        else:
            await d.blockdev.drive_add(
                f"if=none,driver=qcow2,file.filename={esc(self.hidden)},id=hidden_disk0,"
                f"backing.driver=raw,backing.file.filename={esc(self.disk)}"
            )
            await d.blockdev.drive_add(
                "if=none,id=active-disk0,driver=replication,mode=secondary,file.driver=qcow2,"
                f"top-id=active-disk0,file.file.filename={esc(self.active)},file.backing=hidden_disk0,shared-disk=on"
            )
            self.top_device = "active-disk0"
            self.link_export = "hidden_disk0"

    async def _serve_link(self) -> None:
        """The replication link: an NBD server next to the control address."""
        d = self.d
        addr = SocketAddress.from_str(self.cfg.listen)
        if addr.type == "unix":
            link = addr.path + ".nbd"
            await d.block_exports.nbd_server_start({"type": "unix", "path": link}, None, None, 0)
            self.link_addr = f"unix:{link}"
        else:
            await d.block_exports.nbd_server_start(
                SocketAddress.inet(addr.host, 0).to_qapi(), None, None, 0
            )
            nbd = d.block_exports.nbd
            assert nbd is not None and isinstance(nbd.servers[0], asyncio.Server)
            real_port = nbd.servers[0].sockets[0].getsockname()[1]
            self.link_addr = f"{addr.host}:{real_port}"
        await d.block_exports.export_add(
            self.link_export, self.link_export, self.link_export, True, "replication link"
        )

    # -- control channel ---------------------------------------------------------------------

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def heard() -> None:
            self.last_heard = time.monotonic()

        await channel.serve(
            reader,
            writer,
            {
                "hello": self._hello,
                "start": self._start,
                "checkpoint": self._checkpoint,
                "heartbeat": self._heartbeat,
            },
            on_message=heard,
        )

    async def _hello(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.top is not None
        if msg.get("size") != self.top.length:
            raise RuntimeError(
                f"disk sizes differ: primary {msg.get('size')}, secondary {self.top.length}"
            )
        if bool(msg.get("shared")) != self.shared:
            raise RuntimeError("one side runs shared-disk mode and the other does not")
        self.flush_alone_writes()
        split = pairing.secondary_split_brain(
            self.state.generations,
            msg.get("history"),
            self.state.alone_since,
            len(self.state.written_chunks),
        )
        if split is not None:
            # both went on alone: the primary refuses too; say so here as well
            self.peer = PeerStatus.SPLIT_BRAIN
            self.error(split)
        reply: dict[str, Any] = {
            "node-id": self.state.node_id,
            "history": self.state.generations,
            "alone-since": self.state.alone_since,
            "written": chunks_to_ranges(self.state.written_chunks),
            "link": self.link_addr,
            "export": self.link_export,
            "stage": (await self.status())["stage"],
            "failed-over": self.failed_over,
        }
        if self.shared:
            hidden = self.d.graph.find("hidden_disk0")
            if hidden is not None and hidden.backing is not None:
                reply["identity"] = await disk_identity(hidden.backing)
        return reply

    async def _start(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.failed_over:
            raise RuntimeError("this node has failed over and cannot be a secondary again")
        gens = msg.get("history")
        if isinstance(gens, list):
            self.state.generations = list(gens)
            self.state.save()
        await self.d.replication.start_all(ReplicationMode.SECONDARY)
        self.started = True
        self.peer = PeerStatus.CONNECTED
        self.last_heard = time.monotonic()
        return {}

    async def _checkpoint(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.d.replication.get_error_all()
        await self.d.replication.do_checkpoint_all()
        self.agreed_epoch(str(msg["gen"]))
        self.stats.checkpoints += 1
        return {"epoch": len(self.state.generations)}

    async def _heartbeat(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.peer == PeerStatus.PEER_LOST and not self.failed_over:
            self.peer = PeerStatus.CONNECTED
        r = self.replication_node()
        if r is None:
            return {"stage": "none", "error": False}
        return {"stage": r.state.stage.value, "error": bool(r.state.error)}

    # -- losing the primary --------------------------------------------------------------------

    async def failover(self) -> None:
        """Stop the link, fail over, and go on alone: S now holds checkpoint + own writes."""
        async with self.failover_lock:
            if self.failed_over:
                return
            d = self.d
            if d.block_exports.nbd is not None:
                await d.block_exports.nbd_server_stop()
            await d.replication.stop_all(True)
            r = self.replication_node()
            deadline = time.monotonic() + FAILOVER_WAIT
            while (
                r is not None
                and r.state.stage == ReplicationStage.FAILOVER
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.02)
            if r is not None and r.state.stage != ReplicationStage.DONE:
                st = r.state
                self.error(f"failover ended in stage {st.stage.value}: {st.error_message}")
                raise ReplicationError(f"failover failed: {st.error_message or st.stage.value}")
            self.failed_over = True
            self.peer = PeerStatus.FAILED_OVER
            self.track_alone_writes(EntryKind.FAILOVER)
