"""How a primary brings a secondary in: the hello, the handshake's decision, bringing
the disks level, and the switch into forwarding (the first agreed checkpoint).

The functions take the Primary (primary.py) whose pairing they run; the watchdog's
reconnect and ``blockrep up``'s re-protect call ``connect_and_replicate`` again after
every loss of the peer.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..address import SocketAddress
from ..block.node import DirtyBitmap, Node
from ..errors import BlockError, ReplicationError
from ..replication.filter import ReplicationMode
from . import channel, link, pairing
from .bitmap import REGION_SIZE as CHUNK
from .config import FailoverPoint
from .handshake import ALL, Decision, Direction, Rule, compare_histories, decide
from .node_state import StateFileError
from .ratelimit import RateMeter
from .resync import (
    Resync,
    ResyncOptions,
    ResyncProgress,
    SyncKind,
    SyncProgress,
    all_chunks,
    copy_chunks,
)
from .role import PeerStatus
from .states import EntryKind

if TYPE_CHECKING:
    from .primary import Primary

log = logging.getLogger("blockrep.ha")

# seconds a resync keeps chasing new writes after its listed regions are done before it
# pauses the consumer for the rest (a writer faster than the copy must not starve it)
CONVERGE_FOR = 2.0


async def connect_and_replicate(self: Primary, first: bool) -> bool:
    """Pair with the secondary and start replicating; False: serving alone (status says why).

    The first attempt keeps trying for --connect-timeout and a refusal by the disks
    (pairing.PairingRefused: they differ) ends the process; later ones (--reconnect)
    try once. A failure of the data path after the handshake (the link unreachable,
    a copy or the start failing) leaves this node serving alone (degraded).
    """
    cfg = self.cfg
    ch = channel.Client()
    deadline = time.monotonic() + (cfg.connect_timeout if first else 1.0)
    assert self.top is not None
    while True:
        try:
            await ch.connect(cfg.secondary, self.security)
            hello = await ch.call(
                "hello",
                size=self.top.length,
                shared=self.shared,
                history=[str(e) for e in self.state.history],
            )
            break
        except channel.ChannelError as e:
            if not ch.closed:  # the secondary answered: a real refusal
                await ch.close()
                self.peer = PeerStatus.REFUSED
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
            self.peer = PeerStatus.DEGRADED
            self.error(f"cannot reach the secondary at {cfg.secondary}: {err}")
            if first:
                self.track_alone_writes(EntryKind.DEGRADED)
            return False
        await asyncio.sleep(0.2)
    try:
        theirs = pairing.parse_history(hello.get("history"))
    except ValueError as e:
        await ch.close()
        self.peer = PeerStatus.REFUSED
        self.error(f"secondary refused pairing: its history is not valid: {e}")
        return False
    rel = compare_histories(self.state.history, theirs)
    common = str(rel.common) if rel.common is not None else None
    self.common_epoch = common
    self.peer_history = theirs
    self.flush_alone_writes()
    alone = self.state.alone_since
    mine, since = self.state.peer_bitmap.ranges(), str(alone) if alone else None
    refusal = pairing.judge_hello(rel, hello, mine, since)
    decision = None
    if refusal is None and not self.shared:
        # the handshake's table (CONTINUITY §5) decides: a pure function of both sides
        own_al = self.al.regions() if self.al is not None else frozenset()
        nregions = self.state.peer_bitmap.nregions
        try:
            peer = pairing.peer_side(hello, self.top.length, nregions)
        except ValueError as e:
            refusal = pairing.Refusal(PeerStatus.REFUSED, f"secondary refused pairing: {e}")
        else:
            local = pairing.local_side(self.state, own_al, self.top.length, self.host.was_clean)
            decision = decide(local, peer, initial_sync=self.cfg.initial_sync)
            log.warning("handshake: %s", decision.reason)
            if not (decision.refused and decision.rule is Rule.JUST_CREATED):
                refusal = pairing.refusal_of(decision, hello, mine, since, common)
    if refusal is not None:
        self.peer = refusal.peer
        if refusal.split_brain is not None:
            self.split_brain = refusal.split_brain
        self.error(refusal.message)
        # this node keeps serving its consumer: from here on it writes alone
        self.track_alone_writes(EntryKind.DEGRADED)
        await ch.close()
        return False
    self.peer = PeerStatus.SYNCING  # paired, not replicating yet
    try:
        await _bring_in_sync(self, hello, decision, ch)
        # the consumer waits only for the switch into forwarding (I5): a write landing
        # between the last copy and the start of forwarding would be lost on S
        exp = self.consumer_export
        if exp is not None:
            await exp.quiesce()
        try:
            if self.resync is not None:
                await self.resync.final_pass()
            await _start_replication(self, hello, ch)
        finally:
            _end_resync(self)
            if exp is not None:
                exp.resume()
    except pairing.PairingRefused as e:
        self.peer = PeerStatus.REFUSED
        self.error(e.message)
        await ch.close()
        if first:
            raise
        return False
    except (BlockError, OSError, channel.ChannelError, ReplicationError, StateFileError) as e:
        self.replicating, self.ch = True, ch  # what degrade() undoes, wherever it failed
        await self.degrade(f"pairing failed: {getattr(e, 'message', None) or e}", e)
        return False
    return True


async def _bring_in_sync(
    self: Primary, hello: dict[str, Any], decision: Decision | None, ch: channel.Client
) -> None:
    """Carry out the decision. Copies run in the background while the consumer writes
    (resync); whole-disk comparisons — two new disks (rule just-created without
    --initial-sync), or a node keeping no activity log — hold the consumer."""
    top = self.top
    assert top is not None
    if decision is None:  # shared mode: one disk, nothing to copy; both must see it
        self.last_handshake = {"rule": "shared-identity", "direction": "none", "bytes": 0,
                               "saved-by-checksums": 0}  # fmt: skip
        await pairing.check_shared_identity(top, hello)
        return
    rule = pairing.rule_name(decision, hello)
    self.last_handshake = {"rule": rule, "direction": "none", "bytes": 0, "saved-by-checksums": 0}
    log.warning("pairing by rule %s", rule)
    if rule == pairing.DISCARD_LOCAL:  # split brain resolved: the secondary gave up its writes
        self.split_brain = None
    compare = decision.refused  # just-created without --initial-sync: the disks must be equal
    regions: list[int] | None = None
    if not compare and decision.direction is Direction.LOCAL_TO_PEER:
        if decision.regions is ALL:
            regions = all_chunks(top.length)
        elif self.al is None:
            compare = True  # no activity log: its marks cannot be trusted, the bytes can
        else:
            regions = sorted(decision.regions)
    elif not compare and self.al is None and self.state.history:
        compare = True
    if compare and self.cfg.assume_synced:
        compare = False
    link = await pairing.open_link(hello, self.cfg.tls_dir)
    try:
        if regions:
            await _background_resync(self, link, ch, regions, decision.rule is Rule.JUST_CREATED)
            return
        if not compare:
            return
        exp = self.consumer_export
        if exp is not None:
            await exp.quiesce()
        try:
            if self.state.history:
                differ = await pairing.differing_chunks(top, link)
                if differ:
                    self.error(
                        f"{len(differ)} MiB differed after an unfinished epoch; resynchronising them"
                    )
                    await _copy(self, link, differ, SyncKind.RESYNC)
            else:
                self.last_handshake["rule"] = "verify"
                await pairing.verify_identical(top, link)
        finally:
            if exp is not None:
                exp.resume()
    finally:
        if self.resync is None:
            await link.graph.close_all()
        else:
            self.resync_link = link  # closed by _end_resync after the final pass


async def _background_resync(
    self: Primary, link: Node, ch: channel.Client, regions: list[int], whole: bool
) -> None:
    """Copy ``regions`` while the consumer writes: checksums first, rate-limited, new
    writes followed through a dirty bitmap; returns when little is left (the caller
    pauses the consumer for ``final_pass``). The regions are in the persisted peer
    bitmap first and leave it as they land, so an interruption resumes (peer-behind)."""
    top = self.top
    assert top is not None
    # what this node wrote since the common epoch differs on the peer: no digests for it
    written = frozenset(self.state.peer_bitmap)
    self.state.mark_regions(regions)
    # it is Inconsistent now (I3), and knows from whom it resumes (the resume rule)
    gen = str(self.state.current) if self.state.current else None
    await ch.call("sync-target", source=self.state.node_id, generation=gen)
    dirty = DirtyBitmap(CHUNK, top.length)
    top.dirty_bitmaps.append(dirty)
    what = SyncKind.INITIAL if whole else SyncKind.RESYNC

    async def peer_digests(regs: list[int]) -> list[str]:
        r = await ch.call("digests", regions=regs, timeout=120)
        return list(r["digests"])

    def landed(regs: list[int]) -> None:
        self.state.peer_bitmap.clear_regions(regs)
        self.save_state()

    self.resync_dirty = dirty
    self.resync = Resync(
        top,
        link,
        regions,
        options=ResyncOptions(
            rate=self.cfg.resync_rate,
            min_rate=self.cfg.resync_min_rate,
            batch=32,
            depth=8,
            final_threshold=32,  # at most ~32 MiB copied while the consumer waits
        ),
        progress=ResyncProgress(direction="local-to-peer"),
        peer_digests=peer_digests,
        dirty=dirty,
        on_done=landed,
        consumer_busy=_consumer_rate(self),
        no_digests=written,
    )
    self.sync_progress = SyncProgress(what, total=len(regions) * CHUNK)
    log.warning("resync: %d region(s) to the peer, consumer running", len(regions))
    if self.cfg.progress:
        from tqdm import tqdm

        self.resync_bar = tqdm(total=len(regions) * CHUNK, unit="B", unit_scale=True, desc=what)
    task = asyncio.ensure_future(self.resync.run())
    settled = None  # when the listed regions were done; new writes may keep it busy
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            _show(self)
            if self.resync.pending == 0 and settled is None:
                settled = time.monotonic()
            if settled is not None and time.monotonic() - settled > CONVERGE_FOR:
                task.cancel()  # the consumer dirties faster than it copies: pause and finish
                await asyncio.gather(task, return_exceptions=True)
        if not task.cancelled():
            task.result()
    except BaseException:
        task.cancel()
        _end_resync(self)
        raise


def _consumer_rate(self: Primary) -> Callable[[], int]:
    """Bytes/s the consumer writes now (the resync's floor logic takes it off its cap)."""
    meter = RateMeter()

    def rate() -> int:
        exp = self.consumer_export
        if exp is None:
            return 0
        meter.add(exp.written_bytes)
        return meter.rate()

    return rate


def _show(self: Primary) -> None:
    """The progress bar (``--progress``) follows the engine; its total grows with new writes."""
    bar, engine = self.resync_bar, self.resync
    if bar is not None and engine is not None:
        bar.total = max(engine.progress.total_bytes, 1)
        bar.update(engine.progress.done_bytes - bar.n)


def _end_resync(self: Primary) -> None:
    """After the final pass (or a failure): account the copy, drop the bitmap and link."""
    engine = self.resync
    if engine is None:
        return
    _show(self)
    if self.resync_bar is not None:
        self.resync_bar.close()
        self.resync_bar = None
    p = engine.progress
    if self.last_handshake is not None:
        self.last_handshake["direction"] = "local-to-peer"
        self.last_handshake["bytes"] += p.done_bytes - p.saved_by_checksums
        self.last_handshake["saved-by-checksums"] += p.saved_by_checksums
    top = self.top
    if top is not None and self.resync_dirty in top.dirty_bitmaps:
        top.dirty_bitmaps.remove(self.resync_dirty)
    self.resync = None
    self.resync_dirty = None
    self.sync_progress = None
    link = self.resync_link
    self.resync_link = None
    if link is not None:
        asyncio.ensure_future(link.graph.close_all())


async def _copy(self: Primary, link: Node, chunks: list[int], what: SyncKind) -> None:
    assert self.top is not None
    progress = SyncProgress(what, total=len(chunks) * CHUNK)
    self.sync_progress = progress
    try:
        await copy_chunks(self.top, link, chunks, progress)
    finally:
        self.sync_progress = None  # status shows "sync" only during a sync (README)
        if self.last_handshake is not None:
            self.last_handshake["direction"] = "local-to-peer"
            self.last_handshake["bytes"] += progress.current


async def _start_replication(self: Primary, hello: dict[str, Any], ch: channel.Client) -> None:
    d = self.d
    server = SocketAddress.from_str(hello["link"]).to_qapi()
    opts: dict[str, Any] = {
        "driver": "replication",
        "node-name": "replication0",
        "mode": "primary",
        "file": {
            "driver": "nbd",
            "export": hello["export"],
            "server": server,
            **link.client_options(self.cfg.tls_dir, d.graph.objects),
        },
    }
    if self.shared:
        opts.update({"shared-disk": True, "shared-disk-id": "primary_disk0"})
    await d.graph.add(opts, monitor=True)
    if not self.shared:
        d.blockdev.blockdev_change("colo-disk0", None, "replication0")
    # the secondary first (its buffers and copy-before-write must be ready)
    gen = str(uuid.uuid4())
    await ch.call("start", history=[str(e) for e in self.state.history])
    await d.replication.start_all(ReplicationMode.PRIMARY)
    self.ch = ch
    self.replicating = True
    self.peer = PeerStatus.CONNECTED
    # what the secondary's failover keeps decides whether acknowledgements wait for it
    point = hello.get("failover-point")
    self.freeze.arm(FailoverPoint(point) if point in ("latest", "checkpoint") else FailoverPoint.CHECKPOINT,
                    self.consumer_export)  # fmt: skip
    if (r := self.replication_node()) is not None:
        r.state.on_lost_forward = self.freeze.lost_forward
    # the first epoch, agreed by both (the consumer is held: every write is in it)
    mark = self.al.checkpoint_mark() if self.al is not None else 0
    await ch.call("checkpoint", gen=gen)
    self.agreed_epoch(gen)
    if self.al is not None:
        self.al.checkpoint_acked(mark)
