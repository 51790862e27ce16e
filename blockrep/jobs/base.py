"""Jobs: QEMU's job state machine, progress, pause/resume, cancel and events.

A job's ``run`` coroutine does the work and calls ``pause_point`` between units
of it; everything around it (state transitions, events, finalisation, dismissal)
is here, once. States and the verbs each accepts follow QEMU's job.c, so QMP
clients see the same sequences of JOB_STATUS_CHANGE events and the same errors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import BlockError, JobCancelled, JobError

if TYPE_CHECKING:
    from ..block.graph import Graph
    from ..block.node import Node

log = logging.getLogger("blockrep.jobs")

# verb -> states that accept it (QEMU job.c JobVerbTable)
VERBS = {
    "cancel": {
        "created",
        "running",
        "paused",
        "ready",
        "standby",
        "waiting",
        "pending",
        "aborting",
    },
    "pause": {"created", "running", "paused", "ready", "standby"},
    "resume": {"created", "running", "paused", "ready", "standby"},
    "set-speed": {"created", "running", "paused", "ready", "standby"},
    "complete": {"ready"},
    "finalize": {"pending"},
    "dismiss": {"concluded"},
}


class Job:
    job_type: ClassVar[str] = ""

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        *,
        device: str | None = None,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
        speed: int = 0,
        internal: bool = False,
    ) -> None:
        self.manager = manager
        self.id = job_id
        self.device = device or job_id
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.speed = speed
        self.internal = internal
        self.status = "undefined"
        self.current = 0
        self.total = 0
        self.error: str | None = None
        self.cancel_requested = False
        self.force_cancel = False
        self.paused_by_user = 0
        self._resume = asyncio.Event()
        self._resume.set()
        self._finalize = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.done = asyncio.Event()
        self.is_ready = False
        self.io_status = "ok"
        self.busy = False
        self._rate_start = time.monotonic()
        self._rate_bytes = 0
        # called with the job when it concluded (replication chains its steps on this)
        self.on_conclude: list[Callable[[Job], None]] = []
        self._blocked: list[Any] = []

    # -- life cycle ----------------------------------------------------------------

    def _transition(self, status: str) -> None:
        self.status = status
        self.manager.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": status})

    def start(self) -> None:
        self.manager.register(self)
        self._transition("created")
        self.task = asyncio.create_task(self._main())

    def block_nodes(self, *nodes: Any) -> None:
        """Forbid management commands on these nodes while the job runs (QEMU's blockers)."""
        reason = f"block device is in use by block job: {self.job_type}"
        for n in nodes:
            if n is not None and not n.op_blocker:
                n.op_blocker = reason
                self._blocked.append(n)

    def _unblock(self) -> None:
        for n in self._blocked:
            if n.op_blocker and n.op_blocker.startswith("block device is in use by block job"):
                n.op_blocker = None
        self._blocked.clear()

    def _block_job_data(self) -> dict[str, Any]:
        return {
            "type": self.job_type,
            "device": self.device,
            "len": self.total,
            "offset": self.current,
            "speed": self.speed,
        }

    async def _main(self) -> None:
        self._transition("running")
        self.busy = True
        failed: str | None = None
        try:
            await self.run()
        except JobCancelled:
            pass
        except BlockError as e:
            failed = e.message
        except Exception as e:  # a bug must fail the job, not the daemon
            log.exception("job %s failed", self.id)
            failed = str(e)
        self.busy = False
        if failed is None and not self.cancel_requested:
            self._transition("waiting")
            self._transition("pending")
            if not self.auto_finalize:
                self.manager.emit("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})
                await self._finalize.wait()
            try:
                if not self.cancel_requested:
                    await self.prepare()
            except BlockError as e:
                failed = e.message
        if failed is None and not self.cancel_requested:
            await self.commit()
            self.manager.emit("BLOCK_JOB_COMPLETED", self._block_job_data())
        else:
            # QEMU's job info shows strerror(ECANCELED) for a cancelled job
            self.error = failed if failed is not None else "Operation canceled"
            self._transition("aborting")
            try:
                await self.abort()
            except BlockError as e:
                log.error("job %s abort failed: %s", self.id, e.message)
            if failed is None:
                self.manager.emit("BLOCK_JOB_CANCELLED", self._block_job_data())
            else:
                self.manager.emit(
                    "BLOCK_JOB_COMPLETED", {**self._block_job_data(), "error": failed}
                )
        try:
            await self.clean()
        except BlockError as e:
            log.error("job %s clean-up failed: %s", self.id, e.message)
        self._unblock()
        self._transition("concluded")
        for cb in list(self.on_conclude):
            cb(self)
        self.done.set()
        if self.auto_dismiss:
            self._dismiss()

    def _dismiss(self) -> None:
        self._transition("null")
        self.manager.unregister(self)

    # -- hooks for subclasses ----------------------------------------------------------

    async def run(self) -> None:
        raise NotImplementedError

    async def prepare(self) -> None:
        """Finalisation that may still fail the job (graph changes)."""

    async def commit(self) -> None:
        """Success path after prepare."""

    async def abort(self) -> None:
        """Failure or cancel path."""

    async def clean(self) -> None:
        """Always, last."""

    # -- used by run() ------------------------------------------------------------------

    async def pause_point(self) -> None:
        if self.cancel_requested:
            raise JobCancelled()
        if not self._resume.is_set():
            before = self.status
            self._transition("standby" if before == "ready" else "paused")
            self.busy = False
            await self._resume.wait()
            self.busy = True
            if self.cancel_requested:
                raise JobCancelled()
            self._transition(before)

    async def progress(self, nbytes: int) -> None:
        """Account work done and keep to the speed limit."""
        self.current += nbytes
        if self.speed > 0:
            self._rate_bytes += nbytes
        # sleep until back under the limit; re-check often, as set-speed, cancel
        # and pause may come in meanwhile (speed=1 keeps a job at its first chunk)
        while self.speed > 0 and not self.cancel_requested and self._resume.is_set():
            ahead = self._rate_bytes / self.speed - (time.monotonic() - self._rate_start)
            if ahead <= 0:
                break
            await asyncio.sleep(min(ahead, 0.05))

    def transition_to_ready(self) -> None:
        if self.is_ready:
            return
        self.is_ready = True
        self._transition("ready")
        self.manager.emit("BLOCK_JOB_READY", self._block_job_data())

    def report_error(self, operation: str, action: str) -> None:
        self.manager.emit(
            "BLOCK_JOB_ERROR", {"device": self.device, "operation": operation, "action": action}
        )

    # -- verbs --------------------------------------------------------------------------

    def _verb(self, verb: str) -> None:
        if self.status not in VERBS[verb]:
            raise JobError(
                f"Job '{self.id}' in state '{self.status}' cannot accept command verb '{verb}'"
            )

    def cancel(self, force: bool = False) -> None:
        self._verb("cancel")
        self.cancel_requested = True
        self.force_cancel = self.force_cancel or force
        self._resume.set()
        self._finalize.set()
        self.wake()

    def pause(self) -> None:
        self._verb("pause")
        self.paused_by_user += 1
        self._resume.clear()
        self.wake()

    def resume(self) -> None:
        self._verb("resume")
        if self.paused_by_user == 0:
            raise JobError(f"Job '{self.id}' is not paused")
        self.paused_by_user -= 1
        if self.paused_by_user == 0:
            self._resume.set()

    def complete(self) -> None:
        self._verb("complete")
        self.request_complete()

    def request_complete(self) -> None:
        raise JobError(f"The active block job '{self.id}' cannot be completed")

    def finalize(self) -> None:
        self._verb("finalize")
        self._finalize.set()

    def dismiss(self) -> None:
        self._verb("dismiss")
        self._dismiss()

    def set_speed(self, speed: int) -> None:
        self._verb("set-speed")
        if speed < 0:
            raise JobError("Parameter 'speed' expects a non-negative value")
        self.speed = speed
        self._rate_start = time.monotonic()
        self._rate_bytes = 0

    def wake(self) -> None:
        """Interrupt an idle wait in run() (overridden by jobs that sleep)."""

    # -- queries --------------------------------------------------------------------------

    def job_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "id": self.id,
            "type": self.job_type,
            "status": self.status,
            "current-progress": self.current,
            "total-progress": self.total,
        }
        if self.error:
            info["error"] = self.error
        return info

    def block_job_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "type": self.job_type,
            "device": self.device,
            "len": self.total,
            "offset": self.current,
            "busy": self.busy,
            "paused": self.paused_by_user > 0,
            "speed": self.speed,
            "io-status": self.io_status,
            "ready": self.is_ready,
            "status": self.status,
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self.error:
            info["error"] = self.error
        return info


class CopyJob(Job):
    """A job that copies from ``source`` to ``target``, nodes of ``graph``, and
    sleeps in ``run`` until ``wake`` says there is something to do."""

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        graph: Graph,
        source: Node,
        target: Node,
        **kw: Any,
    ) -> None:
        super().__init__(manager, job_id, **kw)
        self.graph = graph
        self.source = source
        self.target = target
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        self._wakeup.set()


class JobManager:
    def __init__(self, emit: Callable[[str, dict[str, Any]], None]) -> None:
        self.jobs: dict[str, Job] = {}
        self.emit = emit

    def register(self, job: Job) -> None:
        if job.id in self.jobs:
            raise JobError(f"Job ID '{job.id}' already in use")
        self.jobs[job.id] = job

    def unregister(self, job: Job) -> None:
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]

    def find(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise JobError("Job not found")
        return job

    def find_block_job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise JobError(f"Block job '{job_id}' not found", "DeviceNotActive")
        return job

    def check_id(self, job_id: str) -> None:
        if job_id in self.jobs:
            raise JobError(f"Job ID '{job_id}' already in use")
        if (
            not job_id
            or not (job_id[0].isalpha())
            or any(not (ch.isalnum() or ch in "-._") for ch in job_id)
        ):
            raise JobError("Invalid job ID '%s'" % job_id)

    async def cancel_all(self) -> None:
        for job in list(self.jobs.values()):
            if job.status in VERBS["cancel"]:
                job.cancel(force=True)
        for job in list(self.jobs.values()):
            await job.done.wait()
