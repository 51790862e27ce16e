"""Starting jobs from QMP arguments: resolve nodes, check them with QEMU's texts."""

from __future__ import annotations

import errno
import os
from typing import Any

from ..block.graph import DRIVER_MODULES, Graph
from ..block.node import Node
from ..errors import BlockError, JobError
from .backup import BackupJob, BackupOptions
from .base import JobManager
from .commit import ActiveCommitJob, CommitJob
from .mirror import MirrorJob, check_sync


def _common(a: dict[str, Any], device: str) -> dict[str, Any]:
    if a.get("speed", 0) < 0:
        raise JobError("Parameter 'speed' expects a non-negative value")
    return {
        "device": device,
        "auto_finalize": a.get("auto-finalize", True),
        "auto_dismiss": a.get("auto-dismiss", True),
        "speed": a.get("speed", 0),
    }


def _job_id(
    jobs: JobManager, a: dict[str, Any], graph: Graph, device_node: Node, device: str
) -> str:
    job_id = a.get("job-id")
    if job_id is None:
        dev = graph.device_of(device_node)
        if dev is None:
            raise JobError("An explicit job ID is required for this node")
        job_id = dev
    jobs.check_id(job_id)
    return job_id


def _busy(node: Node) -> None:
    if node.op_blocker:
        raise BlockError(errno.EBUSY, f"Node '{node.node_name}' is busy: {node.op_blocker}")


async def start_backup(
    graph: Graph, jobs: JobManager, a: dict[str, Any], *, internal: bool = False
) -> BackupJob:
    source = graph.lookup(a["device"])
    target = graph.lookup(a["target"])
    sync = a["sync"]
    if sync in ("incremental", "bitmap") and not a.get("bitmap"):
        raise JobError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync not in ("full", "none"):
        raise JobError(f"blockrep supports backup sync=full and sync=none, not '{sync}'")
    if target is source:
        raise BlockError(errno.EINVAL, "Source and target cannot be the same")
    if target.read_only:
        raise BlockError(errno.EPERM, "Block node is read-only")
    if not internal:
        _busy(source)
        _busy(target)
    job_id = _job_id(jobs, a, graph, source, a["device"])
    options = BackupOptions(
        sync,
        filter_node_name=a.get("filter-node-name"),
        on_source_error=a.get("on-source-error", "report"),
        on_target_error=a.get("on-target-error", "report"),
    )
    job = BackupJob(
        jobs,
        job_id,
        graph,
        source,
        target,
        options=options,
        internal=internal,
        **_common(a, job_id),
    )
    await job.install()
    if not internal:
        job.block_nodes(source, target)
    job.start()
    return job


def _chain_contains(top: Node, node: Node) -> bool:
    cur: Node | None = top
    while cur is not None:
        if cur is node:
            return True
        cur = cur.backing
    return False


def _skip_filters(node: Node) -> Node:
    while node.is_filter and node.file is not None and node.backing is None:
        node = node.file
    return node


async def start_commit(
    graph: Graph,
    jobs: JobManager,
    a: dict[str, Any],
    *,
    internal: bool = False,
    auto_complete: bool = False,
) -> CommitJob | ActiveCommitJob:
    root = graph.find(a["device"])
    if root is None:
        raise BlockError(errno.ENODEV, f"Device '{a['device']}' not found", "DeviceNotFound")
    if not internal and root.parents:
        raise BlockError(errno.EINVAL, "Need a root block node")
    active = _skip_filters(root)
    if "top-node" in a and "top" in a:
        raise BlockError(errno.EINVAL, "'top-node' and 'top' are mutually exclusive")
    if "base-node" in a and "base" in a:
        raise BlockError(errno.EINVAL, "'base-node' and 'base' are mutually exclusive")
    top = _chain_node(graph, a, "top", active, "Top image file {} not found")
    if top is None:
        top = active
    base = _chain_node(graph, a, "base", top, "Can't find '{}' in the backing chain")
    if base is None:
        base = top
        while base.backing is not None:
            base = base.backing
    if base is top:
        raise BlockError(errno.EINVAL, "cannot commit an image into itself")
    if not internal:
        _busy(root)
    _busy(top)
    job_id = _job_id(jobs, a, graph, root, a["device"])
    common = _common(a, job_id)
    if top is active:
        if a.get("backing-file"):
            raise BlockError(
                errno.EINVAL, "'backing-file' specified, but 'top' is the active layer"
            )
        job: CommitJob | ActiveCommitJob = ActiveCommitJob(
            jobs, job_id, graph, top, base, auto_complete=auto_complete, internal=internal, **common
        )
    else:
        job = CommitJob(
            jobs, job_id, graph, top, base, a.get("backing-file"), internal=internal, **common
        )
    if not internal:
        job.block_nodes(root if root is not top else None, top, base)
    job.start()
    return job


def graph_drivers() -> set[str]:
    return set(DRIVER_MODULES)


def _node(graph: Graph, name: str) -> Node:
    node = graph.nodes.get(name)
    if node is None:
        raise BlockError(errno.ENOENT, f"Cannot find device='' nor node-name='{name}'")
    return node


def _chain_node(
    graph: Graph, a: dict[str, Any], arg: str, chain: Node, missing: str
) -> Node | None:
    """The node that ``<arg>-node`` (a node name) or ``<arg>`` (a file name) picks in
    the backing chain from ``chain`` down; None when neither is given."""
    if f"{arg}-node" in a:
        name = a[f"{arg}-node"]
        node = _node(graph, name)
        if not _chain_contains(chain, node):
            raise BlockError(errno.EINVAL, f"'{name}' is not in this backing file chain")
        return node
    if arg in a:
        found = _find_by_filename(chain, a[arg])
        if found is None:
            raise BlockError(errno.EINVAL, missing.format(a[arg]))
        return found
    return None


def _find_by_filename(top: Node, name: str) -> Node | None:
    cur: Node | None = top
    while cur is not None:
        fn = cur.describe_filename()
        if fn == name or os.path.realpath(fn) == os.path.realpath(name):
            return cur
        cur = cur.backing
    return None


async def start_mirror(
    graph: Graph, jobs: JobManager, a: dict[str, Any], fmt: str | None
) -> MirrorJob:
    source = graph.lookup(a["device"])
    check_sync(a["sync"])
    gran = a.get("granularity", 0)
    if gran and (gran < 512 or gran > 64 << 20):
        raise JobError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if gran & (gran - 1):
        raise JobError("Parameter 'granularity' expects a power of 2")
    if a.get("buf-size", 0) < 0:
        raise JobError("Invalid parameter 'buf-size'")
    if a.get("speed", 0) < 0:
        raise JobError("Parameter 'speed' expects a non-negative value")
    if "replaces" in a and a["replaces"] not in graph.nodes:
        raise JobError(f"Failed to find node with node-name='{a['replaces']}'")
    if fmt is not None or "mode" in a:
        # drive-mirror: the target is a file name or an NBD URI of an existing image
        if a.get("mode", "absolute-paths") != "existing":
            raise JobError("blockrep drive-mirror supports mode=existing only")
        tgt = a["target"]
        if fmt is not None and fmt not in graph_drivers():
            raise JobError(f"Unknown file format '{fmt}'")
        if tgt.startswith("nbd:") or tgt.startswith("nbd+"):
            opts: dict[str, Any] = {"driver": "nbd", "filename": tgt}
        else:
            opts = {"driver": fmt or "raw", "file": {"driver": "file", "filename": tgt}}
        if a.get("node-name"):
            opts["node-name"] = a["node-name"]
        target = await graph.add(opts)
        created = True
    else:
        target = graph.lookup(a["target"])
        created = False
    try:
        if target is source:
            raise BlockError(errno.EINVAL, "Can't mirror node into itself")
        _busy(source)
        _busy(target)
        job_id = _job_id(jobs, a, graph, source, a["device"])
    except (BlockError, JobError):
        if created:  # drive-mirror opened it: do not leak it on a refusal
            await graph.close_node(target)
        raise
    job = MirrorJob(
        jobs,
        job_id,
        graph,
        source,
        target,
        on_error=a.get("on-source-error", "report"),
        **_common(a, job_id),
    )
    job.block_nodes(source, target)
    job.start()
    return job
