"""The consumer's side of a node: its export's write guard and the checkpoint pauses.

``ConsumerExport`` is the export the consumer (a VM, any NBD client) writes through on
either role: each write first passes the role's ``before_write`` (I1 for a node alone),
then — on a replicating primary — the activity log; the ranges in flight are known so
a node going alone can mark them too. ``Stats`` keeps what each checkpoint cost it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .. import fastpath
from ..block.node import Done, Extent, Node
from ..errors import BlockError
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
        self,
        node: Node,
        before_write: Callable[[int, int], None],
        name: str = "disk",
        base: int = 0,
        length: int | None = None,
    ) -> None:
        super().__init__(name, node, writable=True, id=f"consumer-{name}")
        self.before_write = before_write
        # a volume of a resource: where it starts in the replicated device and how long
        # it is (its requests, marks, AL and in-flight ranges are shifted by ``base``);
        # the whole device for a resource of one volume
        self.base = base
        self.length = length
        self.activity_log: ActivityLog | None = None
        # failover-point latest (primary.py): cleared while the peer may be promoted
        # without a write it lacks; a write's acknowledgement waits for it
        self.ack_gate: asyncio.Event | None = None
        self.in_flight: dict[int, tuple[int, int]] = {}
        self.written_bytes = 0  # bytes written, zeroed or discarded (a resync's floor logic)
        self._seq = 0

    async def _guarded(self, local: int, nbytes: int, op: Callable[[], Awaitable[None]]) -> None:
        offset = self.base + local
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
            ack = self.ack_gate
            if ack is not None and not ack.is_set():
                # done here, maybe not on the peer: no acknowledgement until the peer is
                # outdated or back; not in flight meanwhile (a pairing's drain goes on)
                self.leave()
                try:
                    await ack.wait()
                finally:
                    self.active += 1  # in again, balanced with the server's leave()
                    self.idle.clear()
        finally:
            del self.in_flight[key]

    def try_write(self, offset: int, data: bytes | memoryview, fua: bool, done: Done) -> bool:
        """``_guarded`` as callbacks: taken only when the activity log need not wait; an
        acknowledgement gate that closes meanwhile still holds the acknowledgement."""
        if not fastpath.enabled():
            return False
        ack, al, at, nbytes = self.ack_gate, self.activity_log, self.base + offset, len(data)
        if not self.gate.is_set() or (ack is not None and not ack.is_set()):
            return fastpath.refuse("consumer: quiesced or acknowledgements held")
        try:
            if al is not None and not al.try_begin_write(at, nbytes):
                return fastpath.refuse("consumer: activity log must commit")
        except BlockError:
            return False  # a range the log refuses: the general path reports it
        try:
            self.before_write(at, nbytes)
        except BaseException as e:
            if al is not None:
                al.cancel_write(at, nbytes)
            if not isinstance(e, BlockError):
                raise
            done(e)
            return True
        self._seq += 1
        key = self._seq
        self.in_flight[key] = (at, nbytes)

        settled = False

        def written(err: BlockError | None) -> None:
            nonlocal settled
            if settled:
                return
            settled = True
            if al is not None:
                al.end_write(at, nbytes)
            if err is None:
                self.written_bytes += nbytes
            gate = self.ack_gate
            if err is None and gate is not None and not gate.is_set():
                self.leave()  # not in flight while held (a pairing's drain goes on)
                _hold(gate, lambda stop: self._acknowledge(key, stop or err, done))
                return
            self._acknowledge(key, err, done)
            self.leave()

        self.active += 1
        self.idle.clear()
        try:
            taken = self.child.node.try_write(at, data, fua, written)
        except BaseException:
            taken = False  # a bug below: the request is lost, the counts are not
            raise
        finally:
            if not taken and not settled:
                settled = True
                self.leave()
                del self.in_flight[key]
                if al is not None:
                    al.cancel_write(at, nbytes)
        if not taken:
            return False
        fastpath.COUNTERS.take("write")
        return True

    def _acknowledge(self, key: int, err: BlockError | None, done: Done) -> None:
        del self.in_flight[key]
        done(err)

    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> Awaitable[None]:
        at = self.base + offset
        return self._guarded(offset, len(data), lambda: Export.write(self, at, data, fua))

    def write_zeroes(self, offset: int, nbytes: int, may_unmap: bool, fua: bool) -> Awaitable[None]:
        at = self.base + offset
        return self._guarded(
            offset, nbytes, lambda: Export.write_zeroes(self, at, nbytes, may_unmap, fua)
        )

    def discard(self, offset: int, nbytes: int) -> Awaitable[None]:
        at = self.base + offset
        return self._guarded(offset, nbytes, lambda: Export.discard(self, at, nbytes))


class VolumeExport(ConsumerExport):
    """One volume of a resource of several: the slice [base, base + length) of the
    replicated device (volumes.py). Reads and block status are shifted too; a resource
    of one volume uses ConsumerExport itself and pays no extra frame per read."""

    def try_read(self, offset: int, nbytes: int) -> bytes | None:
        return Export.try_read(self, self.base + offset, nbytes)

    def file_range(self, offset: int, nbytes: int) -> tuple[int, int] | None:
        return Export.file_range(self, self.base + offset, nbytes)

    @property
    def size(self) -> int:
        return self.node.length if self.length is None else self.length

    def read(self, offset: int, nbytes: int) -> Awaitable[bytes]:
        return Export.read(self, self.base + offset, nbytes)

    async def block_status(self, offset: int, nbytes: int) -> list[Extent]:
        out = await Export.block_status(self, self.base + offset, nbytes)
        return [dataclasses.replace(e, start=e.start - self.base) for e in out]


_HELD: set[asyncio.Task[None]] = set()  # fast-path acknowledgements waiting for the gate


def _hold(gate: asyncio.Event, then: Callable[[BlockError | None], None]) -> None:
    """Call ``then(None)`` once ``gate`` opens; ``then(error)`` if that wait is cancelled
    (shutdown): an error is never a false acknowledgement."""

    async def wait() -> None:
        try:
            await gate.wait()
        except asyncio.CancelledError:
            then(BlockError(errno.EIO, "acknowledgement withheld: the node is stopping"))
            raise
        then(None)

    t = asyncio.ensure_future(wait())
    _HELD.add(t)
    t.add_done_callback(_HELD.discard)


class ConsumerGroup:
    """The consumer's exports of one node, one per volume: they pause and resume
    together (one checkpoint covers every volume of the resource) and share the
    role's write guard and activity log."""

    def __init__(self, members: list[ConsumerExport]) -> None:
        self.members = members

    async def quiesce(self) -> None:
        for m in self.members:
            m.gate.clear()  # every volume stops taking requests before any is waited for
        for m in self.members:
            await m.quiesce()

    def resume(self) -> None:
        for m in self.members:
            m.resume()

    def in_flight_ranges(self) -> list[tuple[int, int]]:
        """(offset, length) of every write in flight, in the replicated device's space."""
        return [r for m in self.members for r in m.in_flight.values()]

    @property
    def written_bytes(self) -> int:
        return sum(m.written_bytes for m in self.members)

    def attach(
        self, top: Node, before_write: Callable[[int, int], None], al: ActivityLog | None
    ) -> None:
        """Serve the next role's replicated device (each volume its slice of it)."""
        for m in self.members:
            m.child.replace(top)
            m.before_write = before_write
            m.activity_log = al

    def set_activity_log(self, al: ActivityLog | None) -> None:
        for m in self.members:
            m.activity_log = al

    def set_ack_gate(self, gate: asyncio.Event | None) -> None:
        for m in self.members:
            m.ack_gate = gate

    def detach(self) -> None:
        for m in self.members:
            m.child.detach()
