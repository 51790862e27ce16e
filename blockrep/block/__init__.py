"""The block layer: nodes, the graph, and the drivers (imported here to register)."""

from . import blkdebug, copy_before_write, file, nbd, qcow2, quorum, raw, replication  # noqa: F401  (drivers register themselves)
from .graph import DRIVERS, Graph
from .node import BlockError, Extent, Node

__all__ = ["DRIVERS", "Graph", "BlockError", "Extent", "Node"]
