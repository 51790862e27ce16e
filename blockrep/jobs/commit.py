"""block-commit: merge the layers above ``base`` up to ``top`` into ``base``.

Non-active commit (``top`` has an overlay): copy what is allocated above base,
then point the overlay's backing link at base and drop the merged layers.
Active commit (``top`` is the active layer, written to while the job runs): a
mirror from ``top``'s view into ``base`` that tracks new writes; READY once in
sync, and on completion every user of ``top`` is switched to ``base``.
"""

from __future__ import annotations

from ..block.graph import Graph
from ..block.node import DirtyBitmap, Node, is_zero
from ..errors import BlockError
from .base import Job, JobManager
from .mirror import GRANULARITY, DirtyCopyJob


def chain_between(top: Node, base: Node) -> list[Node]:
    """Nodes from ``top`` down to (excluding) ``base`` along backing links."""
    out = []
    cur: Node | None = top
    while cur is not None and cur is not base:
        out.append(cur)
        cur = cur.backing
    return out


def depth_of(top: Node, base: Node) -> int:
    return len(chain_between(top, base))


async def mark_allocated_above(top: Node, base: Node, bm: DirtyBitmap) -> None:
    """Mark every region whose data comes from a layer above ``base``."""
    depth = depth_of(top, base)
    pos = 0
    while pos < top.length:
        n = min(1 << 30, top.length - pos)
        for e in await top.block_status(pos, n):
            if e.present and e.depth < depth:
                bm.mark(e.start, e.length)
        pos += n


async def _drop(graph: Graph, nodes: list[Node]) -> None:
    for n in nodes:
        if not n.parents and n.node_name not in graph.monitor_owned and not graph.has_backend(n):
            await graph.close_node(n)


class CommitJob(Job):
    """Non-active commit."""

    job_type = "commit"

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        graph: Graph,
        top: Node,
        base: Node,
        backing_file: str | None = None,
        **kw,
    ) -> None:
        super().__init__(manager, job_id, **kw)
        self.graph = graph
        self.top = top
        self.base = base
        self.backing_file = backing_file
        self.base_was_ro = base.read_only

    async def run(self) -> None:
        if self.base.read_only:
            await self.base.reopen(False)
        bm = DirtyBitmap(GRANULARITY, self.top.length)
        await mark_allocated_above(self.top, self.base, bm)
        # QEMU's commit_run accounts the whole length of top, copied or not
        self.total = self.top.length
        skipped = self.top.length - min(bm.count() * GRANULARITY, self.top.length)
        while True:
            await self.pause_point()
            chunks = bm.take(16)
            if not chunks:
                break
            for c in chunks:
                start = c * GRANULARITY
                n = min(GRANULARITY, self.top.length - start)
                data = await self.top.read(start, n)
                if is_zero(data):
                    await self.base.write_zeroes(start, n, may_unmap=False)
                else:
                    await self.base.write(start, data)
                await self.progress(n)
        self.current += skipped
        await self.base.flush()

    async def prepare(self) -> None:
        # the overlays of top now back onto base
        dropped = chain_between(self.top, self.base)
        for parent_edge in list(self.top.parents):
            if parent_edge.name == "backing" and parent_edge.parent is not None:
                overlay = parent_edge.parent
                parent_edge.replace(self.base)
                change = getattr(overlay, "change_backing_file", None)
                if change is not None:
                    await change(
                        self.backing_file or self.base.describe_filename(), self.base.driver_name
                    )
        await _drop(self.graph, dropped)

    async def clean(self) -> None:
        if self.base_was_ro and not self.base.closed and self.base.parents:
            try:
                await self.base.reopen(True)
            except BlockError:
                pass


class ActiveCommitJob(DirtyCopyJob):
    """Active commit: top is the active layer."""

    job_type = "commit"

    def __init__(
        self, manager: JobManager, job_id: str, graph: Graph, top: Node, base: Node, **kw
    ) -> None:
        super().__init__(manager, job_id, graph, top, base, **kw)
        self.dropped: list[Node] = []

    async def run(self) -> None:
        if self.target.read_only:
            await self.target.reopen(False)
        await super().run()

    async def seed(self, bm: DirtyBitmap) -> None:
        await mark_allocated_above(self.source, self.target, bm)

    def switch(self) -> None:
        self.dropped = chain_between(self.source, self.target)
        self.graph.replace_node(self.source, self.target)

    async def commit(self) -> None:
        if self.dropped:
            await _drop(self.graph, self.dropped)
