"""Job commands: the job-* and block-job-* verbs, blockdev-backup, block-commit, mirrors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from ..jobs import launch
from .table import CommandTable, Handler, args_of

if TYPE_CHECKING:
    from ..block import Graph
    from ..jobs.base import JobManager


class JobsContext(Protocol):
    """What the job commands use: the graph the jobs run on and the job list."""

    graph: Graph
    jobs: JobManager


COMMON_JOB = {
    "job-id": "str",
    "speed": "int",
    "auto-finalize": "bool",
    "auto-dismiss": "bool",
    "filter-node-name": "str",
}
ON_ERROR = ("enum", ("report", "ignore", "enospc", "stop", "auto"))
BACKUP = {
    **COMMON_JOB,
    "device": "str",
    "target": "str",
    "sync": ("enum", ("full", "none", "top", "incremental", "bitmap")),
    "bitmap": "str",
    "bitmap-mode": "str",
    "compress": "bool",
    "on-source-error": ON_ERROR,
    "on-target-error": ON_ERROR,
    "x-perf": "any",
    "discard-source": "bool",
}
COMMIT = {
    **COMMON_JOB,
    "device": "str",
    "base-node": "str",
    "base": "str",
    "top-node": "str",
    "top": "str",
    "backing-file": "str",
    "on-error": ON_ERROR,
    "backing-mask-protocol": "bool",
}
MIRROR = {
    **COMMON_JOB,
    "device": "str",
    "target": "str",
    "replaces": "str",
    "sync": ("enum", ("full", "top", "none", "incremental", "bitmap")),
    "granularity": "int",
    "buf-size": "int",
    "on-source-error": ON_ERROR,
    "on-target-error": ON_ERROR,
    "copy-mode": ("enum", ("background", "write-blocking")),
    "unmap": "bool",
}
DRIVE_MIRROR = {
    **MIRROR,
    "format": "str",
    "node-name": "str",
    "mode": ("enum", ("existing", "absolute-paths")),
}
VERBS = ("cancel", "complete", "dismiss", "finalize", "pause", "resume")


def register(table: CommandTable, ctx: JobsContext) -> None:
    @table.command("query-jobs")
    async def query_jobs(args: dict[str, Any]) -> Any:
        args_of({}, args)
        return [j.job_info() for j in ctx.jobs.jobs.values()]

    @table.command("query-block-jobs")
    async def query_block_jobs(args: dict[str, Any]) -> Any:
        args_of({}, args)
        return [j.block_job_info() for j in ctx.jobs.jobs.values()]

    def job_verb(verb: str, block: bool) -> Handler:
        # block-job-* name the job "device" and may cancel softly; job-* say "id"
        key = "device" if block else "id"
        schema: dict[str, Any] = {key: "str"}
        if verb == "cancel" and block:
            schema["force"] = "bool"

        async def handler(args: dict[str, Any]) -> Any:
            a = args_of(schema, args, (key,))
            job = (ctx.jobs.find_block_job if block else ctx.jobs.find)(a[key])
            if verb == "cancel":
                job.cancel(force=a.get("force", False) if block else True)
            else:
                getattr(job, verb)()
            return {}

        return handler

    for verb in VERBS:
        table.register(f"job-{verb}", job_verb(verb, False))
        table.register(f"block-job-{verb}", job_verb(verb, True))

    @table.command("block-job-set-speed")
    async def block_job_set_speed(args: dict[str, Any]) -> Any:
        a = args_of({"device": "str", "speed": "int"}, args, ("device", "speed"))
        ctx.jobs.find_block_job(a["device"]).set_speed(a["speed"])
        return {}

    @table.command("blockdev-backup")
    async def blockdev_backup(args: dict[str, Any]) -> Any:
        a = args_of(BACKUP, args, ("device", "target", "sync"))
        await launch.start_backup(ctx.graph, ctx.jobs, a)
        return {}

    @table.command("block-commit")
    async def block_commit(args: dict[str, Any]) -> Any:
        a = args_of(COMMIT, args, ("device",))
        await launch.start_commit(ctx.graph, ctx.jobs, a)
        return {}

    @table.command("blockdev-mirror")
    async def blockdev_mirror(args: dict[str, Any]) -> Any:
        a = args_of(MIRROR, args, ("device", "target", "sync"))
        await launch.start_mirror(ctx.graph, ctx.jobs, a, None)
        return {}

    @table.command("drive-mirror")
    async def drive_mirror(args: dict[str, Any]) -> Any:
        a = args_of(DRIVE_MIRROR, args, ("device", "target", "sync"))
        await launch.start_mirror(ctx.graph, ctx.jobs, a, a.get("format"))
        return {}
