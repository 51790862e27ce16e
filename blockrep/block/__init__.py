"""The block layer: nodes, the graph, the generic request layer and the drivers.

Drivers are imported on first use (``graph.DRIVER_MODULES``), not here.
"""

from ..errors import BlockError
from .graph import DRIVERS, Graph
from .node import Extent, Node

__all__ = ["DRIVERS", "Graph", "BlockError", "Extent", "Node"]
