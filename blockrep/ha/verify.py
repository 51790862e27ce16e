"""Online verify (CONTINUITY.md §7): are the two disks of a Protected pair equal?

Each side hashes its own disk, REGION_SIZE regions at a time (resync.py's digests:
the secondary answers the ``digests`` verb); only digests cross the wire. A batch of
regions is hashed on both sides at once; a region that a consumer write touched while
the batch ran — in flight when it began or ended, or completed meanwhile (a
DirtyBitmap on the primary's top) — is skipped and counted, never reported: P forwards
every write to S before acknowledging it, so a region no write touched during the
batch holds the same bytes on both sides if they are in sync. A mismatch is reported
(status, log, event, metric), kept durably in this node's verify file and set in the
peer bitmap; ``repair`` (``blockrep resync --out-of-sync``) copies those regions from
P to S through the replication link, a few at a time with the consumer held — the
checkpoint's pause — so no consumer request fails (I5).

The position (the next region) survives a cancel, a lost peer and a restart of the
node (the verify file, written atomically): the next verify continues from it unless
told to restart; a pass that reached the end starts again from the first region.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from ..block.node import DirtyBitmap
from ..errors import BlockError, ReplicationError
from . import channel
from .bitmap import REGION_SIZE
from .node_state import StateFileError
from .ratelimit import RateMeter, TokenBucket
from .resync import digests_of, region_span
from .verify_plan import (
    Outcome,
    Progress,
    batch_size,
    compare,
    plan_batch,
    region_ranges,
    unsettled,
    verify_path,
)

if TYPE_CHECKING:
    from .primary import Primary

log = logging.getLogger("blockrep.ha")

REPAIR_BATCH = 8  # regions copied per consumer pause: a pause like a checkpoint's
SAVE_EVERY = 1.0  # seconds between saves of the position while a pass runs


class VerifyRefused(Exception):
    """A verify or a repair that cannot run now; the message says why."""


class Verify:
    """The primary's online verify and out-of-sync repair (one of them at a time)."""

    def __init__(self, p: Primary) -> None:
        self.p = p
        self.progress = Progress()
        self.path = verify_path(p.state.path)
        self._task: asyncio.Task[Any] | None = None
        self._loaded = False
        self._saved_at = 0.0

    # -- control ----------------------------------------------------------------------------

    def _protected(self, what: str) -> None:
        p = self.p
        if p.shared:
            raise VerifyRefused(
                f"{what} refused: shared-disk mode has one disk, there is nothing to compare"
            )
        if not (p.replicating and p.ch is not None) or p.resync is not None:
            raise VerifyRefused(
                f"{what} refused: the pair is not Protected (peer: {p.peer.value}); "
                "verify compares the two disks only while the primary replicates"
            )

    def _busy(self, what: str) -> None:
        if self._task is not None and not self._task.done():
            raise VerifyRefused(f"{what} refused: a verify or a repair is running")

    def start(self, rate: int = 0, restart: bool = False) -> dict[str, Any]:
        """``ha-verify``: start a pass (from the saved position unless ``restart``)."""
        self._protected("verify")
        self._busy("verify")
        self.load()
        pr = self.progress
        if restart or pr.position >= pr.nregions:
            pr.position, pr.mismatched, pr.skipped_bytes, pr.digest_bytes = 0, set(), 0, 0
        pr.rate_limit, pr.rate, pr.running, pr.run = max(0, rate), 0, True, pr.run + 1
        self._task = self._own(asyncio.ensure_future(self._run()))
        log.warning("verify: from offset %d of %d", pr.position * REGION_SIZE, pr.length)
        return pr.as_dict()

    async def cancel(self) -> dict[str, Any]:
        """``ha-verify-cancel``: stop a running pass; its position is kept."""
        t = self._task
        if t is None or t.done() or not self.progress.running:
            raise VerifyRefused("no verify is running")
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
        return self.progress.as_dict()

    def _own(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """The role's tasks: a shutdown or a role change cancels it too."""
        tasks = self.p.tasks
        tasks[:] = [t for t in tasks if not t.done()]
        tasks.append(task)
        return task

    def status(self) -> dict[str, Any]:
        self.load()
        return self.progress.as_dict()

    # -- a pass -----------------------------------------------------------------------------

    async def _run(self) -> None:
        pr, p = self.progress, self.p
        bucket, meter = TokenBucket(), RateMeter()
        done, t0 = 0, time.monotonic()
        try:
            while pr.position < pr.nregions:
                self._protected("verify")
                regions = plan_batch(pr.position, pr.nregions, batch_size(pr.rate_limit))
                await bucket.take(len(regions) * REGION_SIZE, lambda: pr.rate_limit)
                self._protected("verify")
                await self._batch(regions)
                pr.position = regions[-1] + 1
                done += sum(region_span(pr.length, r)[1] for r in regions)
                meter.add(done)
                pr.rate = meter.rate()
                if time.monotonic() - self._saved_at >= SAVE_EVERY:
                    self.save()
            pr.last_result = Outcome.MISMATCHES if pr.mismatched else Outcome.IN_SYNC
            log.warning(
                "verify: %s: %d region(s) differ, %d bytes skipped (written meanwhile)",
                pr.last_result,
                len(pr.mismatched),
                pr.skipped_bytes,
            )
        except asyncio.CancelledError:
            pr.last_result = f"{Outcome.CANCELLED} at offset {pr.position * REGION_SIZE}"
            raise
        except (VerifyRefused, channel.ChannelError, ReplicationError, BlockError) as e:
            why = getattr(e, "message", None) or str(e)
            pr.last_result = f"{Outcome.ERROR}: at offset {pr.position * REGION_SIZE}: {why}"
            p.error(f"verify stopped: {why}")
        finally:
            pr.elapsed = round(time.monotonic() - t0, 3)
            pr.running, pr.rate = False, int(done / pr.elapsed) if pr.elapsed > 0 else 0
            self.save()

    async def _batch(self, regions: list[int]) -> None:
        p, pr = self.p, self.progress
        top, exp, ch = p.top, p.consumer_export, p.ch
        assert top is not None and ch is not None
        dirty = DirtyBitmap(REGION_SIZE, top.length)
        # the bitmap and the first in-flight list in one step: no write falls between
        top.dirty_bitmaps.append(dirty)
        flying = list(exp.in_flight_ranges()) if exp is not None else []
        try:
            asked = ch.call("digests", regions=regions, timeout=120)
            theirs_f = asyncio.ensure_future(asked)
            try:
                mine = await digests_of(top, regions)
            except BaseException:
                theirs_f.cancel()
                raise
            reply = await theirs_f
        finally:
            if exp is not None:
                flying += exp.in_flight_ranges()
            top.dirty_bitmaps.remove(dirty)
        # a forward that failed meanwhile: S may lack a write P acknowledged — the
        # pair is not Protected any more, which is an error, not a mismatch
        p.d.replication.get_error_all()
        theirs = reply.get("digests")
        if not isinstance(theirs, list) or not all(isinstance(d, str) for d in theirs):
            raise BlockError(errno.EIO, "the secondary's digests answer is not a list of digests")
        pr.digest_bytes += len(json.dumps({"id": 0, "op": "digests", "regions": regions}))
        pr.digest_bytes += len(json.dumps(reply))
        skip = unsettled(regions, dirty.dirty, dirty.granularity, flying, pr.nregions)
        res = compare(regions, mine, theirs, skip)
        pr.skipped_bytes += sum(region_span(pr.length, r)[1] for r in res.skipped)
        if res.mismatched:
            self._found(res.mismatched)

    def _found(self, regions: list[int]) -> None:
        pr, p = self.progress, self.p
        pr.mismatched.update(regions)
        pr.out_of_sync.update(regions)
        ranges = region_ranges(regions, pr.length)
        p.error(f"verify: the disks differ in region(s) {regions} (bytes {ranges})")
        self.save()  # before the peer bitmap: the verify file is what a repair reads
        try:
            p.state.mark_regions(regions)  # a later pairing copies them
        except StateFileError as e:  # said; the verify file has them
            p.error(f"verify: cannot mark the peer bitmap: {e.message}")

    # -- repair -----------------------------------------------------------------------------

    async def repair(self) -> dict[str, Any]:
        """``ha-resync-out-of-sync``: copy the regions verify found different from this
        disk to the peer's, REPAIR_BATCH at a time with the consumer held, then a
        checkpoint; the regions leave the verify file and the peer bitmap."""
        self._protected("resync --out-of-sync")
        self._busy("resync --out-of-sync")
        self.load()
        task = self._task = self._own(asyncio.ensure_future(self._repair()))
        # a QMP client that hangs up does not stop a repair between two of its pauses
        return await asyncio.shield(task)

    async def _repair(self) -> dict[str, Any]:
        pr, p = self.progress, self.p
        todo = sorted(pr.out_of_sync)
        copied = 0
        for i in range(0, len(todo), REPAIR_BATCH):
            batch = todo[i : i + REPAIR_BATCH]
            copied += await self._copy_held(batch)
            pr.out_of_sync.difference_update(batch)
            p.state.peer_bitmap.clear_regions(batch)
            self.save()
            p.save_state()
        if todo:
            await p.checkpoint()  # S's copy of the repaired regions is an agreed epoch now
            log.warning("resync --out-of-sync: %d region(s), %d bytes copied", len(todo), copied)
        return {"regions": todo, "bytes": copied}

    async def _copy_held(self, regions: list[int]) -> int:
        p = self.p
        top, exp = p.top, p.consumer_export
        assert top is not None
        async with p.ckpt_lock:  # a checkpoint's resume must not end this pause
            self._protected("resync --out-of-sync")
            rep = p.d.graph.find("replication0")
            dst = rep.file if rep is not None else None
            if dst is None:
                raise VerifyRefused("resync --out-of-sync: no replication link")
            if exp is not None:
                await exp.quiesce()  # no write in flight: P's bytes are final here
            try:
                n = 0
                for r in regions:
                    off, size = region_span(top.length, r)
                    await dst.write(off, await top.read(off, size))
                    n += size
                await dst.flush()
            finally:
                if exp is not None:
                    exp.resume()
        return n

    # -- the verify file --------------------------------------------------------------------

    def load(self) -> None:
        """Size the progress to the disk and read the saved position (once)."""
        if self._loaded or self.p.top is None:
            return
        self._loaded = True
        pr = self.progress
        pr.length = self.p.top.length
        pr.nregions = -(-pr.length // REGION_SIZE)
        try:
            with open(self.path, "rb") as f:
                pr.decode(json.loads(f.read()), self._disk_id())
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError) as e:
            self.p.error(f"verify file {self.path} ignored (verify starts over): {e}")
            pr.position, pr.mismatched, pr.out_of_sync, pr.skipped_bytes = 0, set(), set(), 0

    def _disk_id(self) -> str:
        d = self.p.state.disk_id
        return f"{d.uuid}:{d.size}" if d is not None else "-"

    def save(self) -> None:
        """Atomically: temp file, fsync, rename (a torn file is never read as one)."""
        if not self._loaded:
            return
        self._saved_at = time.monotonic()
        data = json.dumps(self.progress.encode(self._disk_id())).encode() + b"\n"
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self.p.error(f"verify: cannot write {self.path}: {e}")
