"""The consumer's side of a node: its export's write guard and the checkpoint pauses.

``ConsumerExport`` is the export the consumer (a VM, any NBD client) writes through on
either role: each write first passes the role's ``before_write`` (I1 for a node alone),
then — on a replicating primary — the activity log; the ranges in flight are known so
a node going alone can mark them too. ``Stats`` keeps what each checkpoint cost it.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..block.node import Node
from ..export import Export
from .activity_log import ActivityLog


@dataclass
class Stats:
    """Checkpoints taken and the consumer pause each one cost."""

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


class ConsumerExport(Export):
    """The consumer's export: a write, write-zeroes or discard first passes
    ``before_write`` (which may refuse it with a BlockError before anything is issued),
    then — on a primary — the activity log (I1: its region is durably active before the
    write is issued); the ranges in flight are known, so a node going alone can mark
    those too."""

    def __init__(
        self, node: Node, before_write: Callable[[int, int], None], name: str = "disk"
    ) -> None:
        super().__init__(name, node, writable=True, id="consumer")
        self.before_write = before_write
        self.activity_log: ActivityLog | None = None
        self.in_flight: dict[int, tuple[int, int]] = {}
        self.written_bytes = 0  # bytes written, zeroed or discarded (a resync's floor logic)
        self._seq = 0

    async def _guarded(self, offset: int, nbytes: int, op: Callable[[], Awaitable[None]]) -> None:
        self.before_write(offset, nbytes)
        self._seq += 1
        key = self._seq
        self.in_flight[key] = (offset, nbytes)  # no await since the check above
        al = self.activity_log
        try:
            if al is not None and nbytes > 0:
                # A write waiting for room in the log has issued nothing: it must not
                # hold a checkpoint's drain (quiesce), whose ack is what makes room.
                self.leave()
                try:
                    await al.begin_write(offset, nbytes)
                    try:
                        await self.gate.wait()  # a checkpoint drains: wait like a new request
                    except BaseException:
                        al.end_write(offset, nbytes)
                        raise
                finally:
                    self.active += 1  # in again, balanced with the server's leave()
                    self.idle.clear()
            try:
                await op()
                self.written_bytes += nbytes
            finally:
                if al is not None and nbytes > 0:
                    al.end_write(offset, nbytes)
        finally:
            del self.in_flight[key]

    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> Awaitable[None]:
        return self._guarded(offset, len(data), lambda: Export.write(self, offset, data, fua))

    def write_zeroes(self, offset: int, nbytes: int, may_unmap: bool, fua: bool) -> Awaitable[None]:
        return self._guarded(
            offset, nbytes, lambda: Export.write_zeroes(self, offset, nbytes, may_unmap, fua)
        )

    def discard(self, offset: int, nbytes: int) -> Awaitable[None]:
        return self._guarded(offset, nbytes, lambda: Export.discard(self, offset, nbytes))
