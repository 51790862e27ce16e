"""The replication nodes of one graph, and QEMU's ``replication_*_all`` operations.

Every replication node registers here when it opens. The ``*_all`` operations
walk the nodes newest first and stop at the first error (no rollback), so a
checkpoint over several disks is one operation (SPEC §4).
"""

from __future__ import annotations

from typing import Any

from ..block.graph import Graph
from ..block.node import Node
from ..jobs.base import JobManager
from .control import ReplicationControl
from .filter import ReplicationMode, ReplicationNode


class ReplicationRegistry:
    """Owned by the daemon, which hands it to whoever runs replication (QMP, HA)."""

    def __init__(self, graph: Graph, jobs: JobManager) -> None:
        self.control = ReplicationControl(graph, jobs)
        self.nodes: list[ReplicationNode] = []  # newest first
        graph.on_open.append(self._on_open)

    def _on_open(self, node: Node) -> None:
        if isinstance(node, ReplicationNode):
            self.nodes.insert(0, node)
            node.close_listeners.append(self._on_close)

    async def _on_close(self, node: ReplicationNode) -> None:
        await self.control.close(node)
        if node in self.nodes:
            self.nodes.remove(node)

    async def start_all(self, mode: ReplicationMode) -> None:
        for n in list(self.nodes):
            await self.control.start(n, mode)

    async def do_checkpoint_all(self) -> None:
        for n in list(self.nodes):
            await self.control.do_checkpoint(n)

    def get_error_all(self) -> None:
        for n in list(self.nodes):
            self.control.get_error(n)

    async def stop_all(self, failover: bool) -> None:
        for n in list(self.nodes):
            await self.control.stop(n, failover)

    async def status(self, node: ReplicationNode) -> dict[str, Any]:
        """One node's entry of query-replication."""
        return await self.control.status(node)
