"""Helpers for the replication tests (test_replication_port.py, faults/test_replication_failures.py).

A thin async layer over the qemu.qmp client for ``blockrep daemon`` processes, plus
the reference tools (qemu-img, qemu-io) run on the image files afterwards.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient

from tests.daemon_harness import DaemonProc
from tests.helpers import tool

MiB = 1 << 20


class Q:
    """One QMP connection to one daemon."""

    def __init__(self, name: str, client: QMPClient, proc: DaemonProc) -> None:
        self.name = name
        self.c = client
        self.proc = proc

    @classmethod
    async def connect(cls, name: str, proc: DaemonProc) -> Q:
        # the socket file appears at bind(), a moment before listen(): retry a refusal
        deadline = time.monotonic() + 10
        while True:
            c = QMPClient(name)
            try:
                await asyncio.wait_for(c.connect(proc.qmp_sock), 10)
                return cls(name, c, proc)
            except ConnectError:
                if time.monotonic() > deadline or proc.proc.poll() is not None:
                    raise
                await asyncio.sleep(0.05)

    async def run(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 60) -> Any:
        return await asyncio.wait_for(self.c.execute(cmd, args or {}), timeout)

    async def error(self, cmd: str, args: dict[str, Any] | None = None) -> str:
        """Run a command that must fail with GenericError; return its desc."""
        try:
            r = await self.run(cmd, args)
        except ExecuteError as e:
            assert e.error.error.class_ == "GenericError", e.error.error
            return e.error.error.desc
        raise AssertionError(f"{self.name}: {cmd} {args} unexpectedly returned {r!r}")

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

    async def rep(self, index: int = 0) -> dict[str, Any]:
        return (await self.run("query-replication"))[index]

    async def wait_stage(
        self, want: str | tuple[str, ...], timeout: float = 30.0, index: int = 0
    ) -> dict[str, Any]:
        wanted = (want,) if isinstance(want, str) else want
        deadline = time.monotonic() + timeout
        while True:
            r = await self.rep(index)
            if r["stage"] in wanted:
                return r
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: stage {r['stage']!r}, waited for {wanted}: {r}")
            await asyncio.sleep(0.02)

    async def quit(self) -> None:
        """Quit the daemon cleanly (everything flushed) and wait until it has exited."""
        try:
            await self.run("quit", timeout=20)
        except Exception:
            pass
        try:
            await self.c.disconnect()
        except Exception:
            pass
        await asyncio.get_running_loop().run_in_executor(None, self.proc.proc.wait, 20)


def run_async(coro, timeout: float = 120) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- reference tools on image files -----------------------------------------------------------


def qemu_img_create(path, size: int, fmt: str = "qcow2") -> None:
    tool("qemu-img", "create", "-q", "-f", fmt, str(path), str(size))


def assert_check_clean(path) -> None:
    r = tool("qemu-img", "check", "--output=json", str(path), check=False)
    assert r.returncode == 0, (str(path), r.stdout, r.stderr)
    info = json.loads(r.stdout)
    assert info.get("check-errors", 0) == 0 and info.get("corruptions", 0) == 0, info
    assert info.get("leaks", 0) == 0, info


def assert_file_pattern(path, fmt: str, pattern: int, offset: int, length: int) -> None:
    """qemu-io on a file (the daemon that wrote it has exited): exactly ``pattern`` there."""
    r = tool(
        "qemu-io",
        "-r",
        "-f",
        fmt,
        "-c",
        f"read -P {pattern:#x} {offset} {length}",
        str(path),
        check=False,
    )
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, (
        str(path),
        r.stdout,
        r.stderr,
    )
    assert f"read {length}/{length} bytes at offset {offset}" in r.stdout, (
        str(path),
        r.stdout,
        r.stderr,
    )


def allocated_ranges(path, fmt: str = "qcow2") -> list[tuple[int, int]]:
    """Ranges an image holds in its own layer (qemu-img map, depth 0 data)."""
    r = tool("qemu-img", "map", "--output=json", "-f", fmt, str(path))
    out = []
    for e in json.loads(r.stdout):
        if e.get("depth", 0) == 0 and e.get("data") and e.get("present", True):
            out.append((e["start"], e["length"]))
    return out
