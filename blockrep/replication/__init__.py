"""COLO block replication, after QEMU's ReplicationOps.

``filter``: the ``replication`` block driver (the data path) and the per-node
state; ``control``: start, checkpoint, get_error, stop/failover on one node;
``registry``: the nodes of a graph and the ``*_all`` operations; ``identity``:
what identifies a shared disk.
"""

from . import fused

fused.install()  # P's write through its whole graph in one call (fused.py)
