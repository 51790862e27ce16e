"""The one QMP session class of the tests, over qemu.qmp's ``QMPClient``.

Every event is recorded in arrival order (timestamps dropped): ``wait`` finds the next
matching one, ``job_trace`` reduces the record to what one job emitted. The HMP
``qemu-io`` checks compare exact output; the replication queries poll with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from blockrep.testing import Process


class QMPSession:
    def __init__(self, path: str, name: str = "qmp", proc: Process | None = None) -> None:
        self.path = path
        self.name = name
        self.proc = proc
        self.c = QMPClient(name)
        self.events: list[dict[str, Any]] = []
        self._task: asyncio.Task | None = None

    @classmethod
    async def connect(cls, name: str, proc: Process) -> QMPSession:
        """A session on a started daemon's QMP socket (``proc.sock``)."""
        assert proc.sock is not None
        return await cls(proc.sock, name, proc).open()

    def _gone(self) -> bool:
        return self.proc is not None and self.proc.proc.poll() is not None

    async def open(self, timeout: float = 20.0) -> QMPSession:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.path):
            if self._gone() or time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no QMP socket {self.path}")
            await asyncio.sleep(0.02)
        listener = EventListener()
        # the socket file appears at bind(), a moment before listen(): retry a refusal
        while True:
            self.c = QMPClient(self.name)
            self.c.register_listener(listener)
            try:
                await asyncio.wait_for(self.c.connect(self.path), 10)
                break
            except Exception:  # qemu.qmp's ConnectError wraps ConnectionRefusedError
                if self._gone() or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

        async def pump() -> None:
            async for ev in listener:
                self.events.append({"event": ev["event"], "data": ev.get("data", {})})

        self._task = asyncio.create_task(pump())
        return self

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        try:
            await asyncio.wait_for(self.c.disconnect(), 5)
        except BaseException:
            pass

    async def quit(self) -> None:
        """Quit the daemon cleanly (everything flushed) and wait until it has exited."""
        try:
            await self.run("quit", timeout=20)
        except BaseException:
            pass
        await self.close()
        if self.proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.proc.proc.wait, 20)

    # -- commands ----------------------------------------------------------------------------

    async def run(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 60) -> Any:
        return await asyncio.wait_for(self.c.execute(cmd, args or {}), timeout)

    async def x(self, cmd: str, **args: Any) -> Any:
        """``run`` with the arguments as keywords (QMP names with dashes need ``**{}``)."""
        return await self.run(cmd, args, timeout=30)

    async def error(self, cmd: str, args: dict[str, Any] | None = None) -> str:
        """Run a command that must fail with GenericError; return its desc."""
        try:
            r = await self.run(cmd, args)
        except ExecuteError as e:
            assert e.error.error.class_ == "GenericError", e.error.error
            return e.error.error.desc
        raise AssertionError(f"{self.name}: {cmd} {args} unexpectedly returned {r!r}")

    async def err(
        self, cmd: str, args: dict[str, Any], desc: str, cls: str = "GenericError"
    ) -> None:
        """Run a command that must fail with exactly this class and desc."""
        with pytest.raises(ExecuteError) as e:
            await self.run(cmd, args, timeout=30)
        got = (e.value.error.error.class_, e.value.error.error.desc)
        assert got == (cls, desc), (cmd, args, got)

    async def hmp(self, line: str) -> str:
        return await self.run("human-monitor-command", {"command-line": line})

    async def io(self, node: str, cmd: str) -> str:
        return await self.hmp(f'qemu-io {node} "{cmd}"')

    # -- qemu-io checks with exact results -------------------------------------------------

    async def read_ok(self, node: str, pattern: int, offset: int, length: int) -> None:
        """Read [offset, offset+length) from ``node``: it must succeed and be exactly ``pattern``."""
        out = await self.io(node, f"read -P {pattern:#x} {offset} {length}")
        assert out.startswith(f"read {length}/{length} bytes at offset {offset}\r\n"), (
            self.name,
            node,
            out,
        )
        assert "Pattern verification failed" not in out, (
            self.name,
            node,
            hex(pattern),
            offset,
            length,
            out,
        )

    async def read_fails(self, node: str, offset: int, length: int) -> str:
        out = await self.io(node, f"read {offset} {length}")
        assert out.startswith("read failed: "), (self.name, node, out)
        return out

    async def write_ok(self, node: str, pattern: int, offset: int, length: int) -> None:
        out = await self.io(node, f"write -P {pattern:#x} {offset} {length}")
        assert out.startswith(f"wrote {length}/{length} bytes at offset {offset}\r\n"), (
            self.name,
            node,
            out,
        )

    async def write_fails(self, node: str, pattern: int, offset: int, length: int) -> str:
        out = await self.io(node, f"write -P {pattern:#x} {offset} {length}")
        assert out.startswith("write failed: "), (self.name, node, out)
        return out

    # -- replication state ----------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        return await self.run("query-xen-replication-status")

    async def rep(self) -> dict[str, Any]:
        """The daemon's one replication node (query-replication)."""
        r = await self.run("query-replication")
        assert len(r) == 1, r
        return r[0]

    async def node_names(self) -> list[str]:
        return sorted(n["node-name"] for n in await self.run("query-named-block-nodes"))

    async def wait_stage(
        self, want: str | tuple[str, ...], timeout: float = 30.0
    ) -> dict[str, Any]:
        wanted = (want,) if isinstance(want, str) else want
        deadline = time.monotonic() + timeout
        while True:
            r = await self.rep()
            if r["stage"] in wanted:
                return r
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: stage {r['stage']!r}, waited for {wanted}: {r}")
            await asyncio.sleep(0.01)

    # -- events ------------------------------------------------------------------------------

    async def wait(self, name: str, timeout: float = 20, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev["event"] == name and all(ev["data"].get(k) == v for k, v in match.items()):
                    return ev["data"]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name} {match}; got {self.events}")
            await asyncio.sleep(0.02)

    async def wait_status(self, job: str, status: str, timeout: float = 20) -> None:
        await self.wait("JOB_STATUS_CHANGE", timeout, id=job, status=status)

    async def settle(self, t: float = 0.2) -> None:
        await asyncio.sleep(t)

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e["event"] == name]

    def job_trace(self, job: str) -> list[str]:
        """Status names and BLOCK_JOB_* event names of one job, in order."""
        out = []
        for e in self.events:
            d = e["data"]
            if e["event"] == "JOB_STATUS_CHANGE" and d.get("id") == job:
                out.append(d["status"])
            elif e["event"].startswith("BLOCK_JOB_") and (
                d.get("device") == job or d.get("id") == job
            ):
                out.append(e["event"])
        return out

    def clear(self) -> None:
        self.events.clear()


def strip_drain_blip(trace: list[str]) -> list[str]:
    """QEMU's backup start shows a paused/running pair from the filter insertion's
    drain (jobs.md 4.2); blockrep has no drain there. Remove that pair."""
    out = list(trace)
    for i in range(len(out) - 1):
        if out[i : i + 3] == ["running", "paused", "running"]:
            del out[i + 1 : i + 3]
            break
    return out
