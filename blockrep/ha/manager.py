"""The HA manager: ``blockrep primary`` and ``blockrep secondary``.

Each role runs a Daemon (graph, QMP, jobs, replication registry) in its own
process and builds SPEC §2/§3's graph itself. The primary drives: it connects
the control channel, checks histories and disks, starts replication (secondary
first), checkpoints periodically (quiescing its consumer's export, so every
forwarded write is acknowledged first) and sends heartbeats. The secondary
answers, watches the heartbeat, and fails over — by hand (``blockrep failover``)
or, with ``--auto-failover``, after ``--fence-command`` succeeded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import statistics
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..address import SocketAddress
from ..block.node import DirtyBitmap, Node
from ..daemon import Daemon
from ..errors import BlockError, QMPError, ReplicationError
from ..export import Export
from ..nbd.server import NBDServer
from ..qcow2.create import create_file
from ..replication.filter import ReplicationMode, ReplicationStage
from . import channel
from .state import CHUNK, NodeState, chunks_to_ranges, compare

log = logging.getLogger("blockrep.ha")


def esc(value: str) -> str:
    """Escape a value for QEMU keyval syntax (``,`` → ``,,``)."""
    return value.replace(",", ",,")


def default_buffer_dir(disk: str) -> str:
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return os.path.dirname(os.path.abspath(disk))


@dataclass
class Stats:
    pauses_ms: list[float] = field(default_factory=list)
    checkpoints: int = 0
    last_checkpoint: float = 0.0

    def summary(self) -> dict[str, Any]:
        p = sorted(self.pauses_ms)
        return {
            "checkpoints": self.checkpoints,
            "last-checkpoint-pause-ms": round(self.pauses_ms[-1], 3) if self.pauses_ms else 0.0,
            "checkpoint-pause-p50-ms": round(statistics.median(p), 3) if p else 0.0,
            "checkpoint-pause-p99-ms": round(p[min(len(p) - 1, int(len(p) * 0.99))], 3)
            if p
            else 0.0,
        }


class Role:
    """What both roles share: the daemon, the state file, status, metrics, tracking."""

    role = ""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.disk = os.path.abspath(args.disk)
        self.shared = bool(getattr(args, "shared", False))
        self.state = NodeState.load(args.state_file or self.disk + ".blockrep-state.json")
        self.d = Daemon()
        self.peer = "connecting"
        self.errors: list[str] = []
        self.stats = Stats()
        self.epoch_started = time.monotonic()
        self.top_device = ""  # the consumer's device; its root may change (filters)
        self.consumer: NBDServer | None = None
        self.consumer_export: Export | None = None
        self.alone_bitmap: DirtyBitmap | None = None
        self.auto_failover_reason = ""
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        srv_tls, cli_tls = channel.tls_contexts(getattr(args, "tls_dir", None))
        self.tls_server, self.tls_client = srv_tls, cli_tls

    def error(self, text: str) -> None:
        log.warning("%s", text)
        self.errors.append(text)
        del self.errors[:-20]

    # -- QMP, consumer export, metrics ---------------------------------------------------

    async def start_qmp(self) -> None:
        self.d.qmp.commands.register("query-ha-status", self._qmp_status)
        if self.args.qmp:
            path = self.args.qmp[5:] if self.args.qmp.startswith("unix:") else self.args.qmp
            await self.d.qmp.listen_unix(path)

    async def _qmp_status(self, args: dict[str, Any]) -> Any:
        return await self.status()

    @property
    def top(self) -> Node | None:
        return self.d.graph.devices.get(self.top_device)

    async def start_consumer_export(self) -> None:
        assert self.top is not None
        self._attach_write_bitmap()
        self.consumer_export = Export("disk", self.top, writable=True, id="consumer")
        self.consumer = NBDServer({"disk": self.consumer_export})
        addr = SocketAddress.from_str(self.args.export)
        if addr.type == "unix":
            if os.path.exists(addr.path):
                os.unlink(addr.path)
            await self.consumer.listen_unix(addr.path)
        else:
            await self.consumer.listen_tcp(addr.host, int(addr.port))

    def start_metrics(self) -> None:
        if not getattr(self.args, "metrics", None):
            return
        from prometheus_client import Gauge, start_http_server

        addr = SocketAddress.from_str(self.args.metrics)
        start_http_server(int(addr.port), addr=addr.host)
        self.gauges = {
            k: Gauge(f"blockrep_{k}", h)
            for k, h in (
                ("epoch", "current epoch number"),
                ("epoch_age_seconds", "time since the last checkpoint"),
                ("hidden_bytes", "bytes buffered in the hidden disk"),
                ("active_bytes", "bytes buffered in the active disk"),
                ("unacked_bytes", "bytes forwarded to the secondary and not yet acknowledged"),
                ("checkpoints_total", "checkpoints taken"),
                ("last_checkpoint_pause_ms", "consumer pause of the last checkpoint"),
                ("peer_connected", "1 if the peer is connected"),
                ("errors", "errors recorded"),
            )
        }
        self.tasks.append(asyncio.create_task(self._metrics_loop()))

    async def _metrics_loop(self) -> None:
        while True:
            try:
                s = await self.status()
                g = self.gauges
                g["epoch"].set(s["epoch"])
                g["epoch_age_seconds"].set(s["epoch-age"])
                g["hidden_bytes"].set(s["hidden-bytes"])
                g["active_bytes"].set(s["active-bytes"])
                g["unacked_bytes"].set(s["unacked-bytes"])
                g["checkpoints_total"].set(s["checkpoints"])
                g["last_checkpoint_pause_ms"].set(s["last-checkpoint-pause-ms"])
                g["peer_connected"].set(1 if s["peer"] == "connected" else 0)
                g["errors"].set(len(s["errors"]))
            except Exception as e:  # metrics must never take the node down
                log.debug("metrics: %s", e)
            await asyncio.sleep(1.0)

    # -- going alone (failover / degraded) ------------------------------------------------

    def _attach_write_bitmap(self) -> None:
        """Track the consumer's writes since the last agreed checkpoint (and while alone)."""
        if self.top is not None and self.alone_bitmap is None:
            bm = DirtyBitmap(CHUNK, self.top.length)
            self.top.dirty_bitmaps.append(bm)
            self.alone_bitmap = bm
            self.tasks.append(asyncio.create_task(self._persist_alone_writes()))

    def agreed_epoch(self, gen: str) -> None:
        """Both nodes hold the same data now: a new epoch, nothing written since.

        The state file is written in the next turn of the event loop: after the
        checkpoint's reply went out (S) and after the consumer was let go (P), so
        its fsyncs are not part of the consumer's pause. A crash in between leaves
        one node one epoch behind, which pairing treats as "behind", never as split brain.
        """
        self.state.new_epoch(gen, save=False)
        asyncio.get_running_loop().call_soon(self.state.save)
        if self.alone_bitmap is not None:
            self.alone_bitmap.dirty.clear()
        self.epoch_started = time.monotonic()

    def track_alone_writes(self, kind: str) -> None:
        """From now on this node writes without its peer: record where.

        What the consumer wrote since the last agreed checkpoint counts too: the peer
        may not hold it (P: forwards that failed before the loss was noticed; S: its
        own writes, kept by the failover commit).
        """
        self.state.go_alone(kind)
        self._attach_write_bitmap()
        self.flush_alone_writes()

    async def _persist_alone_writes(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.flush_alone_writes()

    def flush_alone_writes(self) -> None:
        bm = self.alone_bitmap
        if bm is None or self.state.alone_since is None:
            return
        new = bm.dirty - self.state.written_chunks
        if new:
            self.state.written_chunks |= new
            self.state.save()

    # -- status ------------------------------------------------------------------------------

    def replication_node(self):
        return self.d.replication.nodes[0] if self.d.replication.nodes else None

    async def status(self) -> dict[str, Any]:
        r = self.replication_node()
        rs = await self.d.replication.status(r) if r is not None else {}
        jobs = [
            {
                "id": j.id,
                "type": j.job_type,
                "status": j.status,
                "current": j.current,
                "total": j.total,
            }
            for j in self.d.jobs.jobs.values()
        ]
        out: dict[str, Any] = {
            "role": self.role,
            "mode": "shared" if self.shared else "separate",
            "stage": rs.get("stage", "none"),
            "peer": self.peer,
            "epoch": len(self.state.generations),
            "epoch-uuid": self.state.current,
            "epoch-age": round(time.monotonic() - self.epoch_started, 3),
            "hidden-bytes": rs.get("hidden-allocated-bytes", 0),
            "active-bytes": rs.get("active-allocated-bytes", 0),
            "unacked-bytes": r.state.unacked_bytes if r is not None else 0,
            **self.stats.summary(),
            "replication-error": rs.get("error"),
            "errors": list(self.errors),
            "auto-failover": self.auto_failover_status(),
            "alone-since": self.state.alone_since,
            "written-alone": chunks_to_ranges(
                self.state.written_chunks
                | (
                    self.alone_bitmap.dirty
                    if self.alone_bitmap and self.state.alone_since
                    else set()
                )
            ),
            "jobs": jobs,
        }
        return out

    def auto_failover_status(self) -> dict[str, Any]:
        return {"enabled": False, "reason": "not applicable on the primary"}

    async def run_forever(self) -> None:
        import signal

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        waiter = asyncio.create_task(self.stopping.wait())
        quitter = asyncio.create_task(self.d.shutdown_event.wait())
        await asyncio.wait({waiter, quitter}, return_when=asyncio.FIRST_COMPLETED)
        await self.shutdown()

    async def shutdown(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.flush_alone_writes()
        if self.consumer is not None:
            await self.consumer.close()
        await self.d.shutdown()


class Secondary(Role):
    role = "secondary"

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.last_heard = 0.0
        self.started = False
        self.failed_over = self.state.alone_since is not None and self.state.alone_since.startswith(
            "failover:"
        )
        self.link_addr = ""
        self.link_export = ""
        self.failover_lock = asyncio.Lock()

    def auto_failover_status(self) -> dict[str, Any]:
        a = self.args
        if not a.auto_failover:
            return {"enabled": False, "reason": "manual failover (no --auto-failover)"}
        if not a.fence_command:
            return {
                "enabled": False,
                "reason": "no --fence-command configured: automatic failover is off",
            }
        return {"enabled": True, "timeout": a.failover_timeout, "reason": self.auto_failover_reason}

    async def shutdown(self) -> None:
        await super().shutdown()
        # the overlays are throw-away buffers (a restart makes new ones): free the tmpfs
        for path in (getattr(self, "hidden", None), getattr(self, "active", None)):
            if path:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    async def setup(self) -> None:
        size = os.path.getsize(self.disk)
        bdir = self.args.buffer_dir or default_buffer_dir(self.disk)
        stem = os.path.basename(self.disk)
        tag = uuid.uuid4().hex[:8]
        self.hidden = os.path.join(bdir, f"blockrep-{stem}-{tag}-hidden.qcow2")
        self.active = os.path.join(bdir, f"blockrep-{stem}-{tag}-active.qcow2")
        await create_file(self.hidden, size)
        await create_file(self.active, size)
        d = self.d
        if self.failed_over:
            # this node went on alone before: it is a plain disk now, never a secondary
            await d.blockdev.drive_add(
                f"if=none,id=colo-disk0,driver=raw,file.filename={esc(self.disk)}"
            )
            self.top_device = "colo-disk0"
            self.peer = "failed-over"
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
        if not self.failed_over:
            # the replication link: an NBD server next to the control address
            addr = SocketAddress.from_str(self.args.listen)
            if addr.type == "unix":
                link = addr.path + ".nbd"
                await d.block_exports.nbd_server_start(
                    {"type": "unix", "path": link}, None, None, 0
                )
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
        await self.start_consumer_export()
        self.d.qmp.commands.register("ha-failover", self._qmp_failover)
        await self.start_qmp()
        self.start_metrics()
        self.server = await channel.listen(self.args.listen, self._on_conn, self.tls_server)
        self.tasks.append(asyncio.create_task(self._watchdog()))

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
        theirs = msg.get("history")
        if isinstance(theirs, list) and self.state.alone_since is not None:
            rel = compare(self.state.generations, theirs)
            if rel.relation == "diverged":
                # both went on alone: the primary refuses too; say so here as well
                self.peer = "split-brain"
                self.error(
                    f"split brain: the primary wrote on its own since epoch {rel.common} "
                    f"as did this node ({len(self.state.written_chunks)} MiB region(s)); nothing is overwritten"
                )
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
            from ..replication.identity import disk_identity

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
        self.peer = "connected"
        self.last_heard = time.monotonic()
        return {}

    async def _checkpoint(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.d.replication.get_error_all()
        await self.d.replication.do_checkpoint_all()
        self.agreed_epoch(str(msg["gen"]))
        self.stats.checkpoints += 1
        return {"epoch": len(self.state.generations)}

    async def _heartbeat(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self.peer == "peer-lost" and not self.failed_over:
            self.peer = "connected"
        r = self.replication_node()
        if r is None:
            return {"stage": "none", "error": False}
        return {"stage": r.state.stage.value, "error": bool(r.state.error)}

    # -- losing the primary --------------------------------------------------------------------

    async def _watchdog(self) -> None:
        a = self.args
        fenced_attempted = False
        while True:
            await asyncio.sleep(0.1)
            if not self.started or self.failed_over:
                continue
            silent = time.monotonic() - self.last_heard
            if silent < a.failover_timeout:
                fenced_attempted = False
                continue
            if self.peer != "peer-lost":
                self.peer = "peer-lost"
                self.error(f"peer-lost: no word from the primary for {silent:.1f} s")
            if not a.auto_failover or fenced_attempted:
                continue
            fenced_attempted = True
            if not a.fence_command:
                self.auto_failover_reason = (
                    "no --fence-command configured: not failing over automatically"
                )
                continue
            rc = await self._fence()
            if rc != 0:
                self.auto_failover_reason = f"fence command failed (exit {rc}): not failing over"
                self.error(self.auto_failover_reason)
                continue
            self.auto_failover_reason = "fenced the primary; failed over"
            await self.failover()

    async def _fence(self) -> int:
        proc = await asyncio.create_subprocess_exec(
            *shlex.split(self.args.fence_command),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            return await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            return -1

    async def _qmp_failover(self, args: dict[str, Any]) -> Any:
        await self.failover()
        return {}

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
            deadline = time.monotonic() + 3600
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
            self.peer = "failed-over"
            self.track_alone_writes("failover")


class Primary(Role):
    role = "primary"

    def __init__(self, args: Any) -> None:
        super().__init__(args)
        self.ch: channel.Client | None = None
        self.replicating = False
        self.split_brain: dict[str, Any] | None = None
        self.ckpt_lock = asyncio.Lock()
        # what a running sync has copied (status shows "sync" only during one)
        self.sync_progress: dict[str, Any] | None = None

    async def setup(self) -> None:
        d = self.d
        if self.shared:
            await d.blockdev.drive_add(
                f"if=none,id=primary_disk0,driver=raw,file.filename={esc(self.disk)}"
            )
            self.top_device = "primary_disk0"
        else:
            await d.blockdev.drive_add(
                "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,"
                f"children.0.driver=raw,children.0.file.filename={esc(self.disk)}"
            )
            self.top_device = "colo-disk0"
        if self.state.alone_since is not None:
            # went on alone in an earlier life: keep recording where it writes
            self.track_alone_writes("degraded")
        d.qmp.commands.register("replication-checkpoint", self._qmp_checkpoint)
        await self.start_qmp()
        self.start_metrics()
        await self.connect_and_replicate(first=True)
        await self.start_consumer_export()
        self.tasks.append(asyncio.create_task(self._heartbeat_loop()))
        if self.args.checkpoint_interval > 0:
            self.tasks.append(asyncio.create_task(self._checkpoint_loop()))

    # -- pairing ----------------------------------------------------------------------------------

    async def connect_and_replicate(self, first: bool) -> bool:
        a = self.args
        ch = channel.Client()
        deadline = time.monotonic() + (a.connect_timeout if first else 1.0)
        assert self.top is not None
        while True:
            try:
                await ch.connect(a.secondary, self.tls_client)
                hello = await ch.call(
                    "hello",
                    size=self.top.length,
                    shared=self.shared,
                    history=self.state.generations,
                )
                break
            except channel.ChannelError as e:
                if not ch.closed:  # the secondary answered: a real refusal
                    await ch.close()
                    self.peer = "refused"
                    self.error(f"secondary refused pairing: {e}")
                    return False
                # the channel died before an answer (secondary not up yet, a proxy,
                # a TLS mismatch): a transport failure, retried like a failed connect
                await ch.close()
                ch = channel.Client()
                err: Exception = e
            except (OSError, TimeoutError) as e:
                err = e
            if time.monotonic() >= deadline:
                self.peer = "degraded"
                self.error(f"cannot reach the secondary at {a.secondary}: {err}")
                if first:
                    self.track_alone_writes("degraded")
                return False
            await asyncio.sleep(0.2)
        rel = compare(self.state.generations, hello["history"])
        self.flush_alone_writes()
        if hello.get("failed-over") or rel.relation in ("self-behind", "diverged"):
            mine = chunks_to_ranges(self.state.written_chunks)
            theirs = hello.get("written", [])
            if rel.relation == "self-behind" and not mine:
                self.peer = "stale"
                self.error(
                    "the secondary went on without this primary (it failed over at "
                    f"{hello.get('alone-since')}); this primary's disk is stale: not replicating"
                )
            else:
                self.peer = "split-brain"
                self.split_brain = {
                    "common-epoch": rel.common,
                    "primary": {"since": self.state.alone_since, "written": mine},
                    "secondary": {"since": hello.get("alone-since"), "written": theirs},
                }
                self.error(
                    f"split brain: both nodes wrote since epoch {rel.common}: primary wrote "
                    f"{len(mine)} region(s), secondary {len(theirs)} region(s); not replicating, nothing overwritten"
                )
            # this node keeps serving its consumer: from here on it writes alone
            self.track_alone_writes("degraded")
            await ch.close()
            return False
        if hello.get("stage") not in ("none", None):
            self.peer = "degraded"
            self.error(f"the secondary is in stage {hello.get('stage')}; restart it to pair again")
            self.track_alone_writes("degraded")
            await ch.close()
            return False
        # a live consumer waits while the disks are brought in sync and replication
        # starts: a write landing on an already copied region would be lost on S
        exp = self.consumer_export
        if exp is not None:
            await exp.quiesce()
        try:
            try:
                await self._bring_in_sync(hello, rel.relation)
            except BlockError as e:
                self.peer = "refused"
                self.error(e.message)
                await ch.close()
                if first:
                    raise
                return False
            await self._start_replication(hello, ch)
        finally:
            if exp is not None:
                exp.resume()
        return True

    async def _bring_in_sync(self, hello: dict[str, Any], relation: str) -> None:
        a = self.args
        if self.shared:
            from ..replication.identity import disk_identity

            theirs = hello.get("identity") or {}
            mine = await disk_identity(self.top)  # type: ignore[arg-type]
            if (theirs.get("device"), theirs.get("inode")) != (
                mine.get("device"),
                mine.get("inode"),
            ):
                if theirs.get("fingerprint") != mine.get("fingerprint"):
                    raise BlockError(
                        22, "the secondary's hidden disk does not back onto this shared disk"
                    )
            return
        link = await self._link_node(hello)
        try:
            if relation == "peer-behind" and self.state.alone_since is not None:
                # only this node wrote since the secondary's last epoch: copy just that
                await self._copy_chunks(link, sorted(self.state.written_chunks), "resync")
            elif a.initial_sync:
                assert self.top is not None
                await self._copy_chunks(
                    link, list(range(-(-self.top.length // CHUNK))), "initial sync"
                )
            elif relation == "same" and self.state.generations and not a.assume_synced:
                # The histories agree, but the last epoch may not have ended cleanly:
                # writes P made after it may have reached S only in part. S wrote
                # nothing of its own since (its history would show it), so P's disk
                # is the truth: copy the 1 MiB chunks that differ.
                differ = await self._differing_chunks(link)
                if differ:
                    self.error(
                        f"{len(differ)} MiB differed after an unfinished epoch; resynchronising them"
                    )
                    await self._copy_chunks(link, differ, "resync")
            elif not a.assume_synced:
                await self._verify(link)
        finally:
            await link.graph.close_all()

    async def _link_node(self, hello: dict[str, Any]) -> Node:
        from ..block import Graph

        g = Graph()
        server = SocketAddress.from_str(hello["link"]).to_qapi()
        node = await g.add({"driver": "nbd", "server": server, "export": hello["export"]})
        return node

    async def _verify(self, link: Node) -> None:
        top = self.top
        assert top is not None
        step = 4 << 20
        pos = 0
        while pos < top.length:
            n = min(step, top.length - pos)
            a, b = await top.read(pos, n), await link.read(pos, n)
            if a != b:
                i = next(i for i in range(n) if a[i] != b[i])
                raise BlockError(
                    22,
                    f"the disks differ at offset {pos + i}: refusing to replicate "
                    "(use --initial-sync to copy this disk to the secondary, or --assume-synced)",
                )
            pos += n

    async def _differing_chunks(self, link: Node) -> list[int]:
        top = self.top
        assert top is not None
        out = []
        for c in range(-(-top.length // CHUNK)):
            off = c * CHUNK
            n = min(CHUNK, top.length - off)
            if await top.read(off, n) != await link.read(off, n):
                out.append(c)
        return out

    async def _copy_chunks(self, link: Node, chunks: list[int], what: str) -> None:
        from tqdm import tqdm

        top = self.top
        assert top is not None
        bar = tqdm(
            total=len(chunks) * CHUNK,
            unit="B",
            unit_scale=True,
            desc=what,
            disable=not self.args.progress,
        )
        progress: dict[str, Any] = {"what": what, "current": 0, "total": len(chunks) * CHUNK}
        self.sync_progress = progress
        try:
            for c in chunks:
                off = c * CHUNK
                n = min(CHUNK, top.length - off)
                if n > 0:
                    await link.write(off, await top.read(off, n))
                bar.update(CHUNK)
                progress["current"] += CHUNK
            await link.flush()
        finally:
            bar.close()
            self.sync_progress = None  # status shows "sync" only during a sync (README)

    async def _start_replication(self, hello: dict[str, Any], ch: channel.Client) -> None:
        d = self.d
        server = SocketAddress.from_str(hello["link"]).to_qapi()
        opts: dict[str, Any] = {
            "driver": "replication",
            "node-name": "replication0",
            "mode": "primary",
            "file": {"driver": "nbd", "export": hello["export"], "server": server},
        }
        if self.shared:
            opts.update({"shared-disk": True, "shared-disk-id": "primary_disk0"})
        await d.graph.add(opts, monitor=True)
        if not self.shared:
            d.blockdev.blockdev_change("colo-disk0", None, "replication0")
        # the secondary first (its buffers and copy-before-write must be ready)
        gen = str(uuid.uuid4())
        await ch.call("start", history=self.state.generations)
        await d.replication.start_all(ReplicationMode.PRIMARY)
        self.ch = ch
        self.replicating = True
        self.peer = "connected"
        # the first epoch, agreed by both
        await ch.call("checkpoint", gen=gen)
        self.agreed_epoch(gen)

    # -- checkpoints ------------------------------------------------------------------------------

    async def _qmp_checkpoint(self, args: dict[str, Any]) -> Any:
        try:
            return await self.checkpoint()
        except channel.ChannelError as e:
            # the control channel's errors are outside blockrep's error tree
            raise QMPError(str(e)) from None

    async def checkpoint(self) -> dict[str, Any]:
        if not self.replicating or self.ch is None:
            raise channel.ChannelError(f"not replicating (peer: {self.peer})")
        async with self.ckpt_lock:
            exp = self.consumer_export
            t0 = time.perf_counter()
            if exp is not None:
                await exp.quiesce()  # in flight done ⇒ every forwarded write acknowledged
            try:
                self.d.replication.get_error_all()
                gen = str(uuid.uuid4())
                await self.ch.call(
                    "checkpoint", gen=gen, timeout=max(5.0, self.args.heartbeat_timeout)
                )
                await self.d.replication.do_checkpoint_all()
            except (channel.ChannelError, ReplicationError) as e:
                await self.degrade(f"checkpoint failed: {e}")
                raise
            finally:
                if exp is not None:
                    exp.resume()
                pause = (time.perf_counter() - t0) * 1000
            # after resume(): the state file's fsyncs run once the consumer is moving
            self.agreed_epoch(gen)
            self.stats.pauses_ms.append(pause)
            del self.stats.pauses_ms[:-10000]
            self.stats.checkpoints += 1
            return {"epoch": len(self.state.generations), "pause-ms": round(pause, 3)}

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.args.checkpoint_interval)
            if self.replicating:
                try:
                    await self.checkpoint()
                except Exception as e:
                    log.warning("checkpoint: %s", e)

    async def _heartbeat_loop(self) -> None:
        a = self.args
        while True:
            await asyncio.sleep(a.heartbeat_interval)
            if self.replicating and self.ch is not None:
                try:
                    await self.ch.call("heartbeat", timeout=a.heartbeat_timeout)
                except channel.ChannelError as e:
                    await self.degrade(f"secondary lost: {e}")
            elif self.peer in ("degraded", "connecting") and a.reconnect:
                try:
                    await self.connect_and_replicate(first=False)
                except Exception as e:
                    log.debug("reconnect: %s", e)

    async def degrade(self, why: str) -> None:
        """Lose the secondary: stop replicating, keep serving, record what is written."""
        if not self.replicating:
            return
        self.replicating = False
        self.peer = "degraded"
        self.error(why)
        if self.ch is not None:
            await self.ch.close()
            self.ch = None
        self.track_alone_writes("degraded")
        d = self.d
        try:
            await d.replication.stop_all(True)
        except ReplicationError:
            pass
        try:
            if not self.shared:
                d.blockdev.blockdev_change("colo-disk0", "children.1", None)
            await d.blockdev.blockdev_del("replication0")
        except BlockError as e:
            log.warning("removing the replication node: %s", e.message)

    async def status(self) -> dict[str, Any]:
        s = await super().status()
        if self.split_brain is not None:
            s["split-brain"] = self.split_brain
        if self.sync_progress is not None:
            s["sync"] = self.sync_progress
        return s
