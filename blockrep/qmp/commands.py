"""The QMP command table: argument checks with QEMU's texts, then a call into the daemon."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..block.node import Node
from ..block.options import check
from ..errors import BlockError, JobError, OptionError, QMPError
from .hmp import run_hmp

if TYPE_CHECKING:
    from ..daemon import Daemon

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def args_of(
    schema: dict[str, Any], args: dict[str, Any], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    try:
        return check(schema, args, typed=True, required=required)
    except OptionError as e:
        raise QMPError(e.message) from None


def image_info(node: Node, flat: bool = False) -> dict[str, Any]:
    """QAPI ImageInfo of a node (recursing into the backing chain unless flat)."""
    fmt_node = node
    info: dict[str, Any] = {
        "filename": fmt_node.describe_filename(),
        "format": fmt_node.driver_name,
        "virtual-size": fmt_node.length,
        "dirty-flag": False,
    }
    f = fmt_node.file
    if f is not None and hasattr(f, "allocated_size"):
        info["actual-size"] = f.allocated_size()
    extra = fmt_node.info()
    if "cluster-size" in extra:
        info["cluster-size"] = extra["cluster-size"]
    if "format-specific" in extra:
        info["format-specific"] = extra["format-specific"]
    b = fmt_node.backing
    if b is not None:
        info["backing-filename"] = b.describe_filename()
        info["full-backing-filename"] = b.describe_filename()
        info["backing-filename-format"] = b.driver_name
        if not flat:
            info["backing-image"] = image_info(b)
    return info


def block_device_info(node: Node, flat: bool = False) -> dict[str, Any]:
    depth = 0
    cur = node.backing
    while cur is not None:
        depth += 1
        cur = cur.backing
    cache = node.options.get("cache", {})
    info: dict[str, Any] = {
        "file": node.describe_filename(),
        "node-name": node.node_name,
        "ro": node.read_only,
        "drv": node.driver_name,
        "encrypted": False,
        "detect_zeroes": node.options.get("detect-zeroes", "off"),
        "bps": 0,
        "bps_rd": 0,
        "bps_wr": 0,
        "iops": 0,
        "iops_rd": 0,
        "iops_wr": 0,
        "image": image_info(node, flat),
        "cache": {
            "writeback": True,
            "direct": bool(cache.get("direct", False)),
            "no-flush": bool(cache.get("no-flush", False)),
        },
        "write_threshold": 0,
        "backing_file_depth": depth,
    }
    if node.backing is not None:
        info["backing_file"] = node.backing.describe_filename()
    return info


SOCKET_ADDR = {
    "type": "str",
    "data": "any",
    "host": "str",
    "port": "any",
    "path": "str",
    "ipv4": "bool",
    "ipv6": "bool",
    "numeric": "bool",
    "to": "int",
    "keep-alive": "bool",
    "str": "str",
    "fdname": "str",
    "abstract": "bool",
    "tight": "bool",
}


def build_commands(d: Daemon) -> dict[str, Handler]:
    table: dict[str, Handler] = {}

    def command(name: str) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            table[name] = fn
            return fn

        return deco

    def guard(exc: Exception) -> QMPError:
        if isinstance(exc, BlockError):
            return QMPError(exc.message, getattr(exc, "qmp_class", "GenericError"))
        return QMPError(str(exc))

    @command("query-version")
    async def query_version(args: dict[str, Any]) -> Any:
        args_of({}, args)
        return {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": f"blockrep {__version__}"}

    @command("query-commands")
    async def query_commands(args: dict[str, Any]) -> Any:
        args_of({}, args)
        return [{"name": n} for n in sorted([*table, "qmp_capabilities"])]

    @command("quit")
    async def quit_(args: dict[str, Any]) -> Any:
        args_of({}, args)
        d.request_shutdown("host-qmp-quit")
        return {}

    @command("blockdev-add")
    async def blockdev_add(args: dict[str, Any]) -> Any:
        if "node-name" not in args:
            raise QMPError("'node-name' must be specified for the root node")
        try:
            await d.graph.add(args, typed=True, monitor=True)
        except BlockError as e:
            raise guard(e) from None
        return {}

    async def _blockdev_del(args: dict[str, Any]) -> Any:
        a = args_of({"node-name": "str"}, args, ("node-name",))
        try:
            await d.blockdev_del(a["node-name"])
        except BlockError as e:
            raise guard(e) from None
        return {}

    table["blockdev-del"] = _blockdev_del
    table["x-blockdev-del"] = _blockdev_del

    @command("query-named-block-nodes")
    async def query_named_block_nodes(args: dict[str, Any]) -> Any:
        a = args_of({"flat": "bool"}, args)
        return [block_device_info(n, a.get("flat", False)) for n in d.graph.nodes.values()]

    @command("query-block")
    async def query_block(args: dict[str, Any]) -> Any:
        args_of({}, args)
        out = []
        for dev, node in d.graph.devices.items():
            out.append(
                {
                    "device": dev,
                    "locked": False,
                    "removable": False,
                    "type": "unknown",
                    "inserted": block_device_info(node),
                }
            )
        return out

    @command("nbd-server-start")
    async def nbd_server_start(args: dict[str, Any]) -> Any:
        a = args_of(
            {"addr": "any", "tls-creds": "str", "tls-authz": "str", "max-connections": "int"},
            args,
            ("addr",),
        )
        try:
            await d.nbd_server_start(
                a["addr"], a.get("tls-creds"), a.get("tls-authz"), a.get("max-connections", 0)
            )
        except BlockError as e:
            raise guard(e) from None
        return {}

    @command("nbd-server-add")
    async def nbd_server_add(args: dict[str, Any]) -> Any:
        a = args_of(
            {
                "device": "str",
                "name": "str",
                "description": "str",
                "writable": "bool",
                "bitmap": "str",
            },
            args,
            ("device",),
        )
        if "bitmap" in a:
            raise QMPError("blockrep does not export dirty bitmaps")
        name = a.get("name", a["device"])
        try:
            await d.export_add(
                name,
                a["device"],
                name,
                a.get("writable", False),
                a.get("description", ""),
                legacy=True,
            )
        except BlockError as e:
            raise guard(e) from None
        return {}

    @command("nbd-server-remove")
    async def nbd_server_remove(args: dict[str, Any]) -> Any:
        a = args_of({"name": "str", "mode": ("enum", ("safe", "hard"))}, args, ("name",))
        try:
            await d.export_del_by_name(a["name"], a.get("mode", "safe"))
        except BlockError as e:
            raise guard(e) from None
        return {}

    @command("nbd-server-stop")
    async def nbd_server_stop(args: dict[str, Any]) -> Any:
        args_of({}, args)
        try:
            await d.nbd_server_stop()
        except BlockError as e:
            raise guard(e) from None
        return {}

    @command("block-export-add")
    async def block_export_add(args: dict[str, Any]) -> Any:
        a = args_of(
            {
                "type": ("enum", ("nbd",)),
                "id": "str",
                "node-name": "str",
                "name": "str",
                "description": "str",
                "writable": "bool",
                "writethrough": "bool",
                "fixed-iothread": "bool",
                "iothread": "str",
                "bitmaps": "any",
                "allocation-depth": "bool",
            },
            args,
            ("type", "id", "node-name"),
        )
        try:
            await d.export_add(
                a["id"],
                a["node-name"],
                a.get("name", a["node-name"]),
                a.get("writable", False),
                a.get("description", ""),
            )
        except BlockError as e:
            raise guard(e) from None
        return {}

    @command("block-export-del")
    async def block_export_del(args: dict[str, Any]) -> Any:
        a = args_of({"id": "str", "mode": ("enum", ("safe", "hard"))}, args, ("id",))
        try:
            await d.export_del(a["id"], a.get("mode", "safe"))
        except BlockError as e:
            raise guard(e) from None
        return {}

    @command("query-block-exports")
    async def query_block_exports(args: dict[str, Any]) -> Any:
        args_of({}, args)
        return [
            {"type": "nbd", "id": e.id, "node-name": e.node.node_name, "shutting-down": False}
            for e in d.exports.values()
        ]

    @command("x-blockdev-change")
    async def x_blockdev_change(args: dict[str, Any]) -> Any:
        a = args_of({"parent": "str", "child": "str", "node": "str"}, args, ("parent",))
        try:
            d.blockdev_change(a["parent"], a.get("child"), a.get("node"))
        except BlockError as e:
            raise guard(e) from None
        return {}

    @command("x-blkdebug-set-rules")
    async def x_blkdebug_set_rules(args: dict[str, Any]) -> Any:
        from ..block.blkdebug import BlkdebugNode, parse_rules

        a = args_of({"node-name": "str", "inject-error": ("list", "any")}, args, ("node-name",))
        try:
            node = d.graph.lookup(a["node-name"])
            if not isinstance(node, BlkdebugNode):
                raise QMPError(f"Node '{a['node-name']}' is not a blkdebug node")
            node.set_rules(parse_rules(a.get("inject-error", []), True))
        except BlockError as e:
            raise guard(e) from None
        return {}

    # -- jobs ------------------------------------------------------------------------

    def job_call(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except JobError as e:
            raise QMPError(e.message, e.qmp_class) from None

    @command("query-jobs")
    async def query_jobs(args: dict[str, Any]) -> Any:
        args_of({}, args)
        return [j.job_info() for j in d.jobs.jobs.values()]

    @command("query-block-jobs")
    async def query_block_jobs(args: dict[str, Any]) -> Any:
        args_of({}, args)
        return [j.block_job_info() for j in d.jobs.jobs.values()]

    def _job_verb(verb: str, block: bool) -> Handler:
        key = "device" if block else "id"

        async def handler(args: dict[str, Any]) -> Any:
            schema: dict[str, Any] = {key: "str"}
            if verb == "cancel" and block:
                schema["force"] = "bool"
            a = args_of(schema, args, (key,))
            job = job_call(lambda: (d.jobs.find_block_job if block else d.jobs.find)(a[key]))
            if verb == "cancel":
                job_call(lambda: job.cancel(force=a.get("force", False) if block else True))
            else:
                job_call(getattr(job, verb))
            return {}

        return handler

    for verb in ("cancel", "complete", "dismiss", "finalize", "pause", "resume"):
        table[f"job-{verb}"] = _job_verb(verb, False)
        table[f"block-job-{verb}"] = _job_verb(verb, True)

    @command("block-job-set-speed")
    async def block_job_set_speed(args: dict[str, Any]) -> Any:
        a = args_of({"device": "str", "speed": "int"}, args, ("device", "speed"))
        job = job_call(lambda: d.jobs.find_block_job(a["device"]))
        job_call(lambda: job.set_speed(a["speed"]))
        return {}

    common_job = {
        "job-id": "str",
        "speed": "int",
        "auto-finalize": "bool",
        "auto-dismiss": "bool",
        "filter-node-name": "str",
    }
    error_enum = ("enum", ("report", "ignore", "enospc", "stop", "auto"))

    @command("blockdev-backup")
    async def blockdev_backup(args: dict[str, Any]) -> Any:
        a = args_of(
            {
                **common_job,
                "device": "str",
                "target": "str",
                "sync": ("enum", ("full", "none", "top", "incremental", "bitmap")),
                "bitmap": "str",
                "bitmap-mode": "str",
                "compress": "bool",
                "on-source-error": error_enum,
                "on-target-error": error_enum,
                "x-perf": "any",
                "discard-source": "bool",
            },
            args,
            ("device", "target", "sync"),
        )
        try:
            await d.start_backup(a)
        except (BlockError, JobError) as e:
            raise (
                guard(e) if isinstance(e, BlockError) else QMPError(e.message, e.qmp_class)
            ) from None
        return {}

    @command("block-commit")
    async def block_commit(args: dict[str, Any]) -> Any:
        a = args_of(
            {
                **common_job,
                "device": "str",
                "base-node": "str",
                "base": "str",
                "top-node": "str",
                "top": "str",
                "backing-file": "str",
                "on-error": error_enum,
                "backing-mask-protocol": "bool",
            },
            args,
            ("device",),
        )
        try:
            await d.start_commit(a)
        except (BlockError, JobError) as e:
            raise (
                guard(e) if isinstance(e, BlockError) else QMPError(e.message, e.qmp_class)
            ) from None
        return {}

    mirror_schema = {
        **common_job,
        "device": "str",
        "target": "str",
        "replaces": "str",
        "sync": ("enum", ("full", "top", "none", "incremental", "bitmap")),
        "granularity": "int",
        "buf-size": "int",
        "on-source-error": error_enum,
        "on-target-error": error_enum,
        "copy-mode": ("enum", ("background", "write-blocking")),
        "unmap": "bool",
    }

    @command("blockdev-mirror")
    async def blockdev_mirror(args: dict[str, Any]) -> Any:
        a = args_of(mirror_schema, args, ("device", "target", "sync"))
        try:
            await d.start_mirror(a, None)
        except (BlockError, JobError) as e:
            raise (
                guard(e) if isinstance(e, BlockError) else QMPError(e.message, e.qmp_class)
            ) from None
        return {}

    @command("drive-mirror")
    async def drive_mirror(args: dict[str, Any]) -> Any:
        a = args_of(
            {
                **mirror_schema,
                "format": "str",
                "node-name": "str",
                "mode": ("enum", ("existing", "absolute-paths")),
            },
            args,
            ("device", "target", "sync"),
        )
        try:
            await d.start_mirror(a, a.get("format"))
        except (BlockError, JobError) as e:
            raise (
                guard(e) if isinstance(e, BlockError) else QMPError(e.message, e.qmp_class)
            ) from None
        return {}

    # -- replication ----------------------------------------------------------------

    from ..block.replication import PRIMARY, SECONDARY
    from ..errors import ReplicationError

    @command("xen-set-replication")
    async def xen_set_replication(args: dict[str, Any]) -> Any:
        a = args_of(
            {"enable": "bool", "primary": "bool", "failover": "bool"}, args, ("enable", "primary")
        )
        mode = PRIMARY if a["primary"] else SECONDARY
        if "failover" in a and a["enable"]:
            raise QMPError("Parameter 'failover' is only for stopping replication")
        try:
            if a["enable"]:
                await d.replication.start_all(mode)
            elif a.get("failover"):
                # QEMU drops every error of a failover stop; so does blockrep, but
                # query-replication shows them per node
                try:
                    await d.replication.stop_all(True)
                except ReplicationError:
                    pass
            else:
                await d.replication.stop_all(False)
        except ReplicationError as e:
            raise QMPError(str(e)) from None
        return {}

    @command("xen-colo-do-checkpoint")
    async def xen_colo_do_checkpoint(args: dict[str, Any]) -> Any:
        args_of({}, args)
        try:
            await d.replication.do_checkpoint_all()
        except ReplicationError as e:
            raise QMPError(str(e)) from None
        return {}

    @command("query-xen-replication-status")
    async def query_xen_replication_status(args: dict[str, Any]) -> Any:
        args_of({}, args)
        try:
            d.replication.get_error_all()
        except ReplicationError as e:
            return {"error": True, "desc": str(e)}
        return {"error": False}

    @command("query-replication")
    async def query_replication(args: dict[str, Any]) -> Any:
        args_of({}, args)
        return [await d.replication.status(n) for n in d.replication.nodes]

    @command("human-monitor-command")
    async def human_monitor_command(args: dict[str, Any]) -> Any:
        a = args_of({"command-line": "str", "cpu-index": "int"}, args, ("command-line",))

        def lookup(name: str) -> Node:
            return d.graph.lookup(name)

        return await run_hmp(a["command-line"], lookup, d.drive_add_node, d.drive_del)

    return table
