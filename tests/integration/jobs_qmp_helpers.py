"""QMP session helpers for the job/quorum acceptance tests (blockrep daemon and qemu-storage-daemon).

``Session`` wraps a qemu.qmp ``QMPClient``: every event is recorded in arrival
order (timestamps dropped), ``wait`` finds the next matching one, and
``job_trace`` reduces the record to what a job emitted, in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import time
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

MiB = 1 << 20


class Session:
    def __init__(self, sock: str) -> None:
        self.sock = sock
        self.c = QMPClient("jobs-test")
        self.events: list[dict[str, Any]] = []
        self._task: asyncio.Task | None = None

    async def open(self) -> Session:
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if time.monotonic() > deadline:
                raise TimeoutError(self.sock)
            await asyncio.sleep(0.02)
        listener = EventListener()
        self.c.register_listener(listener)
        await asyncio.wait_for(self.c.connect(self.sock), 10)

        async def pump() -> None:
            async for ev in listener:
                self.events.append({"event": ev["event"], "data": ev.get("data", {})})

        self._task = asyncio.create_task(pump())
        return self

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        try:
            await self.c.disconnect()
        except Exception:
            pass

    async def x(self, cmd: str, **args: Any) -> Any:
        return await asyncio.wait_for(self.c.execute(cmd, args), 30)

    async def err(
        self, cmd: str, args: dict[str, Any], desc: str, cls: str = "GenericError"
    ) -> None:
        with pytest.raises(ExecuteError) as e:
            await asyncio.wait_for(self.c.execute(cmd, args), 30)
        got = (e.value.error.error.class_, e.value.error.error.desc)
        assert got == (cls, desc), (cmd, args, got)

    async def hmp(self, line: str) -> str:
        return await self.x("human-monitor-command", **{"command-line": line})

    async def qemu_io(self, node: str, cmd: str) -> str:
        return await self.hmp(f'qemu-io {node} "{cmd}"')

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


def run_tool(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check)


def qcow2(
    path: str, size: int = 4 * MiB, backing: str | None = None, cluster: int | None = None
) -> str:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    if cluster:
        args += ["-o", f"cluster_size={cluster}"]
    run_tool(*args, path, str(size))
    return path


def raw(path: str, size: int = 4 * MiB) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def qio(path: str, fmt: str, *cmds: str) -> str:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    r = run_tool(*args, path)
    assert "failed" not in r.stdout, r.stdout
    return r.stdout


def logical_sha256(path: str, fmt: str) -> str:
    """sha256 of an image's guest-visible bytes (qemu-img convert to raw)."""
    out = path + ".logical.raw"
    run_tool("qemu-img", "convert", "-f", fmt, "-O", "raw", path, out)
    h = hashlib.sha256()
    with open(out, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    os.unlink(out)
    return h.hexdigest()


def check_clean(path: str) -> None:
    r = run_tool("qemu-img", "check", path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def file_opts(path: str) -> dict[str, Any]:
    return {"driver": "file", "filename": path}


def fmt_opts(name: str, path: str, fmt: str = "qcow2", **extra: Any) -> dict[str, Any]:
    return {"driver": fmt, "node-name": name, "file": file_opts(path), **extra}


class QSD:
    """qemu-storage-daemon with a QMP monitor on a unix socket, stopped by pid."""

    def __init__(self, dirpath: str, name: str = "qsd", extra: list[str] | None = None) -> None:
        self.sock = os.path.join(dirpath, f"{name}.qmp")
        self.log = open(os.path.join(dirpath, f"{name}.log"), "wb")
        self.proc = subprocess.Popen(
            [
                "qemu-storage-daemon",
                "--chardev",
                f"socket,id=m0,path={self.sock},server=on,wait=off",
                "--monitor",
                "chardev=m0",
                *(extra or []),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
