"""Mirror-style jobs: copy a node's contents to a target while writes continue.

A dirty bitmap on the source records every write; the job first copies the
initial regions, then keeps copying what gets dirty. Once nothing is left it is
READY. On completion it converges — copies the rest, waits for writes in flight,
and with the bitmap empty and nothing in flight pivots the graph in the same
step, so that no write can fall between the last copy and the switch.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..block.node import DirtyBitmap, is_zero
from ..errors import BlockError, JobError
from .base import CopyJob

GRANULARITY = 64 << 10
RUN_CHUNKS = 16  # 1 MiB per copy at 64 KiB granularity


class DirtyCopyJob(CopyJob):
    """Copy ``source``'s view to ``target`` chunk by chunk, tracking new writes."""

    def __init__(
        self, *args: Any, auto_complete: bool = False, on_error: str = "report", **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.auto_complete = auto_complete
        self.on_error = on_error
        self.bitmap: DirtyBitmap | None = None
        self.complete_requested = False
        self.pivot = True

    async def seed(self, bm: DirtyBitmap) -> None:
        """Mark what the first pass must copy (default: everything)."""
        bm.mark_all()

    def request_complete(self) -> None:
        self.complete_requested = True
        self.wake()

    def cancel(self, force: bool = False) -> None:
        if self.is_ready and not force and not self.cancel_requested:
            # QEMU: cancelling a READY mirror completes it without the pivot
            self._verb("cancel")
            self.pivot = False
            self.request_complete()
            return
        super().cancel(force)

    async def _copy_chunks(self, chunks: list[int]) -> None:
        g = self.bitmap.granularity if self.bitmap else GRANULARITY
        length = self.source.length
        i = 0
        while i < len(chunks):
            j = i + 1
            while j < len(chunks) and chunks[j] == chunks[j - 1] + 1 and j - i < RUN_CHUNKS:
                j += 1
            start = chunks[i] * g
            n = min((chunks[j - 1] + 1) * g, length) - start
            try:
                data = await self.source.read(start, n)
            except BlockError:
                self.report_error("read", "report")
                if self.bitmap:
                    self.bitmap.mark(start, n)
                raise
            try:
                if is_zero(data):
                    await self.target.write_zeroes(start, n, may_unmap=False)
                else:
                    await self.target.write(start, data)
            except BlockError:
                self.report_error("write", "report")
                if self.bitmap:
                    self.bitmap.mark(start, n)
                raise
            await self.progress(n)
            i = j

    async def run(self) -> None:
        if self.target.length != self.source.length:
            # QEMU starts the job and fails it (not the command)
            raise BlockError(22, "Source and target image have different sizes")
        bm = DirtyBitmap(GRANULARITY, self.source.length)
        self.bitmap = bm
        self.source.dirty_bitmaps.append(bm)
        await self.seed(bm)
        self.total = min(bm.count() * GRANULARITY, self.source.length)
        while True:
            await self.pause_point()
            chunks = bm.take(RUN_CHUNKS * 4)
            if chunks:
                # new dirt extends the work to do
                self.total = max(self.total, self.current + len(chunks) * GRANULARITY)
                await self._copy_chunks(chunks)
                continue
            if not self.is_ready:
                self.transition_to_ready()
                if self.auto_complete:
                    self.complete_requested = True
            if self.complete_requested:
                return
            self._wakeup.clear()
            # sleep until a write makes something dirty or a verb arrives
            dirty_wait = asyncio.ensure_future(bm.changed.wait())
            wake_wait = asyncio.ensure_future(self._wakeup.wait())
            self.busy = False  # idle while in sync, as QEMU shows it
            await asyncio.wait({dirty_wait, wake_wait}, return_when=asyncio.FIRST_COMPLETED)
            self.busy = True
            dirty_wait.cancel()
            wake_wait.cancel()

    async def prepare(self) -> None:
        bm = self.bitmap
        assert bm is not None
        while True:
            chunks = bm.take(1 << 30)
            if chunks:
                await self._copy_chunks(chunks)
                continue
            await self.source.drain()
            if bm.count() == 0:
                break
        # nothing dirty, nothing in flight: switch now, with no await in between
        if self.pivot:
            self.switch()

    def switch(self) -> None:
        """The graph change at completion (overridden)."""

    async def clean(self) -> None:
        if self.bitmap is not None and self.bitmap in self.source.dirty_bitmaps:
            self.source.dirty_bitmaps.remove(self.bitmap)


class MirrorJob(DirtyCopyJob):
    job_type = "mirror"

    async def seed(self, bm: DirtyBitmap) -> None:
        bm.mark_all()

    def switch(self) -> None:
        self.graph.replace_node(self.source, self.target)


def check_sync(sync: str) -> None:
    if sync in ("incremental", "bitmap"):
        raise JobError(f"Sync mode '{sync}' not supported")
    if sync != "full":
        raise JobError(f"blockrep supports mirror sync=full only, not '{sync}'")
