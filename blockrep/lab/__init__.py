"""A real two-node Pacemaker 2.1 + Corosync 3 cluster on one machine, for tests and bench.

Each node is a persistent network namespace (``ip netns``, joined to the other node by a
veth pair with link-local addresses) plus a mount + UTS namespace held open by an
*anchor* process (``sleep``): inside it the node's host name is its cluster name, its
``/etc/corosync``, ``/var/lib/{corosync,pacemaker}`` and ``/var/log/{corosync,pacemaker}``
are bind mounts of directories under the lab dir, and ``/run`` and ``/dev/shm`` are fresh
tmpfs (libqb's IPC lives there; a power-off must drop them as a reboot does).

Everything of a node — corosync, pacemakerd and what Pacemaker starts — runs in its
network namespace, so a power-off (and the lab fence agent Pacemaker calls, a power switch)
is "SIGKILL every process whose network namespace is the node's, then wait until the
anchor is gone". Each node has ``node.dir/data``: a directory the host reaches too, for
disks and unix sockets (a node's own ``/run`` is not visible from the host).

The consumer gate: ``GATE_AGENT``, installed per lab as ``ocf:brlab<tag>:gate``
(``Lab.gate_xml``), is colocated with the Promoted role and ordered after promote, as a
real VM or file system would be; ``GatedConsumer`` the test's consumer writes to a node's export only while holding the node's
``gate.lock`` and seeing ``gate`` there, and the agent's stop removes ``gate`` and then
takes the lock: no write of the consumer is in flight once the gate has stopped.
A power-off (the harness's or the fence agent's) forgets the gate as it forgets ``/run``.

``BlockrepCluster`` runs ``ocf:blockrep:blockrep`` (installed by ``blockrep ocf install``
at the default OCF root, where Pacemaker looks; left installed) as the promotable clone.
bench/pacemaker.py uses it too (bench never imports tests): it needs only the stdlib and
blockrep. ``nodes`` holds the pieces of one node, ``cluster`` the Lab, ``blockrep`` the
resource under it and its consumer.

Every wait is bounded; ``teardown`` kills by namespace and pid, deletes the namespaces and
the agents this lab installed, and runs even after a failed setup. Not root, or namespaces
refused: ``LabError`` (a test fails, it never skips).
"""

from .blockrep import BlockrepCluster, GatedConsumer, install_blockrep_agent
from .cluster import Lab
from .nodes import LabError, wait_until

__all__ = [
    "BlockrepCluster",
    "GatedConsumer",
    "Lab",
    "LabError",
    "install_blockrep_agent",
    "wait_until",
]
