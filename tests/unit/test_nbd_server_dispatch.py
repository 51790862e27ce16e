"""The NBD server's task-less path (issue 15): writes an export takes through
``try_write`` and reads it serves through ``try_read`` are answered without a task,
with the same replies, accounting and guarantees as the general path.

A fake export decides how each write ends (at once, later, with an error, declined)
and counts which path each request took; every test ends by comparing the export's
bytes with a model.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from typing import Any

import pytest

from blockrep.errors import BlockError
from blockrep.nbd import proto as p
from blockrep.nbd.server import NBDClientConn, NBDServer
from blockrep.nbd.transmission import MAX_IN_FLIGHT
from tests.harness.nbd_wire import STEP, WireClient

SIZE = 1 << 20
Done = Callable[[BlockError | None], None]


class FakeExport:
    """An in-memory export with the fast path; ``mode`` says how try_write ends."""

    def __init__(self, mode: str = "sync", fast_reads: bool = True) -> None:
        self.name = "disk"
        self.description = ""
        self.writable = True
        self.size = SIZE
        self.clients: set[Any] = set()
        self.data = bytearray(SIZE)
        self.mode = mode
        self.fast_reads = fast_reads
        self.pending: list[tuple[int, bytes, Done]] = []
        self.general = 0  # requests that took the general path (enter..leave)
        self.fast_writes = 0
        self.fast_read_calls = 0
        self.active = 0
        EXPORTS.append(self)

    async def enter(self) -> None:
        self.active += 1
        self.general += 1

    def leave(self) -> None:
        self.active -= 1

    async def read(self, offset: int, nbytes: int) -> bytes:
        return bytes(self.data[offset : offset + nbytes])

    async def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        self.data[offset : offset + len(data)] = data

    async def write_zeroes(self, offset: int, nbytes: int, may_unmap: bool, fua: bool) -> None:
        self.data[offset : offset + nbytes] = bytes(nbytes)

    async def discard(self, offset: int, nbytes: int) -> None:
        pass

    async def flush(self) -> None:
        pass

    async def block_status(self, offset: int, nbytes: int) -> list[Any]:
        return []

    def try_write(self, offset: int, data: bytes | memoryview, fua: bool, done: Done) -> bool:
        if self.mode == "refuse":
            return False
        if self.mode == "raise":
            raise RuntimeError("a bug in the export")
        self.fast_writes += 1
        if self.mode == "error":
            done(BlockError(errno.ENOSPC, "no space"))
        elif self.mode == "later":
            self.pending.append((offset, bytes(data), done))
        else:
            self.data[offset : offset + len(data)] = data
            done(None)
            if self.mode == "twice":
                done(None)  # a bug: the server must answer once
        return True

    def complete(self, n: int | None = None) -> None:
        """Complete the first ``n`` (all) pending writes, in order."""
        take = self.pending[:n] if n is not None else list(self.pending)
        del self.pending[: len(take)]
        for offset, data, done in take:
            self.data[offset : offset + len(data)] = data
            done(None)

    def file_range(self, offset: int, nbytes: int) -> tuple[int, int] | None:
        return None  # not file-backed: no sendfile

    def try_read(self, offset: int, nbytes: int) -> bytes | None:
        if not self.fast_reads:
            return None
        self.fast_read_calls += 1
        return bytes(self.data[offset : offset + nbytes])


async def until(cond: Callable[[], bool], what: str) -> None:
    """Wait (bounded) for ``cond``: the state a test waits for, not a time."""
    async with asyncio.timeout(STEP):
        while not cond():
            await asyncio.sleep(0.001)
    assert cond(), what


async def serve(tmp_path: Any, exp: FakeExport) -> tuple[NBDServer, str]:
    srv = NBDServer({"disk": exp})
    path = str(tmp_path / "nbd.sock")
    await srv.listen_unix(path)
    return srv, path


def only_conn(srv: NBDServer) -> NBDClientConn:
    (conn,) = srv.clients
    return conn


def balanced(srv: NBDServer, exp: FakeExport) -> bool:
    conn = only_conn(srv)
    assert conn.requests is not None
    return conn.requests.in_flight == 0 and not conn.busy() and exp.active == 0


def block(i: int, n: int = 4096) -> bytes:
    return bytes([i % 251 + 1]) * n


EXPORTS: list[FakeExport] = []


def run(coro: Any) -> Any:
    async def bounded() -> Any:
        try:
            return await asyncio.wait_for(coro, 60)
        finally:
            # a failed test must not leave the server waiting for writes forever
            for exp in EXPORTS:
                exp.mode = "sync"
                exp.complete()
            EXPORTS.clear()

    return asyncio.run(bounded())


@pytest.mark.parametrize("structured", [False, True])
def test_writes_completed_at_once_are_answered_without_the_general_path(tmp_path, structured):
    async def main() -> None:
        exp = FakeExport("sync")
        srv, path = await serve(tmp_path, exp)
        c = await WireClient.connect(path, structured=structured)
        model = bytearray(SIZE)
        for i in range(40):
            off = (i * 7919 * 512) % (SIZE - 4096)
            c.send(p.CMD_WRITE, i, off, 4096, block(i))
            model[off : off + 4096] = block(i)
        replies = await c.replies(40)
        assert sorted(replies) == list(range(40))
        assert all(r.error == 0 for r in replies.values())
        c.send(p.CMD_READ, 100, 0, SIZE)
        got = await c.reply()
        await until(lambda: balanced(srv, exp), "in-flight accounting balances")
        assert exp.fast_writes == 40 and exp.fast_read_calls == 1
        assert exp.general == 0, "a fast-path request took the general path"
        await c.close()
        await srv.close()
        assert got.error == 0 and got.data == bytes(model) == bytes(exp.data)

    run(main())


def test_writes_completed_later_are_answered_from_the_callback(tmp_path):
    async def main() -> None:
        exp = FakeExport("later")
        srv, path = await serve(tmp_path, exp)
        c = await WireClient.connect(path)
        model = bytearray(SIZE)
        for i in range(5):
            c.send(p.CMD_WRITE, i, i * 8192, 4096, block(i))
            model[i * 8192 : i * 8192 + 4096] = block(i)
        await until(lambda: len(exp.pending) == 5, "the export took every write")
        conn = only_conn(srv)
        assert conn.fast_writes == 5 and not conn.tasks
        assert conn.requests is not None and conn.requests.in_flight == 5
        exp.complete(2)  # out of order with the ones still pending: fine for NBD
        first = await c.replies(2)
        assert sorted(first) == [0, 1] and all(r.error == 0 for r in first.values())
        exp.complete()
        rest = await c.replies(3)
        assert sorted(rest) == [2, 3, 4] and all(r.error == 0 for r in rest.values())
        await until(lambda: balanced(srv, exp), "in-flight accounting balances")
        assert exp.general == 0
        await c.close()
        await srv.close()
        assert bytes(exp.data) == bytes(model)

    run(main())


@pytest.mark.parametrize("structured", [False, True])
def test_write_error_from_the_callback_is_the_general_paths_error_reply(tmp_path, structured):
    async def main() -> None:
        exp = FakeExport("error")
        srv, path = await serve(tmp_path, exp)
        c = await WireClient.connect(path, structured=structured)
        c.send(p.CMD_WRITE, 7, 0, 4096, block(1))
        r = await c.reply()
        await until(lambda: balanced(srv, exp), "in-flight accounting balances")
        assert exp.fast_writes == 1 and exp.general == 0
        await c.close()
        await srv.close()
        assert (r.handle, r.error) == (7, p.NBD_ENOSPC)
        assert bytes(exp.data) == bytes(SIZE)

    run(main())


def test_declined_requests_take_the_general_path(tmp_path):
    async def main() -> None:
        exp = FakeExport("refuse", fast_reads=False)
        srv, path = await serve(tmp_path, exp)
        c = await WireClient.connect(path, structured=True)
        c.send(p.CMD_WRITE, 1, 4096, 4096, block(3))
        c.send(p.CMD_READ, 2, 0, 3 * 4096)
        replies = await c.replies(2)
        await until(lambda: balanced(srv, exp), "in-flight accounting balances")
        assert exp.general == 2 and exp.fast_writes == 0
        await c.close()
        await srv.close()
        assert replies[1].error == 0 and replies[2].error == 0
        assert replies[2].data in (bytes(4096) + block(3) + bytes(4096), bytes(3 * 4096))
        model = bytearray(SIZE)
        model[4096:8192] = block(3)
        assert bytes(exp.data) == bytes(model)

    run(main())


def test_invalid_requests_are_answered_without_reaching_the_export(tmp_path):
    async def main() -> None:
        exp = FakeExport("sync")
        srv, path = await serve(tmp_path, exp)
        c = await WireClient.connect(path)
        c.send(p.CMD_WRITE, 1, SIZE - 512, 4096, block(1))  # past the end
        c.send(p.CMD_READ, 2, SIZE, 512)  # past the end
        c.send(p.CMD_READ, 3, 0, 512, flags=p.CMD_FLAG_FUA)  # a flag READ does not take
        replies = await c.replies(3)
        await until(lambda: balanced(srv, exp), "in-flight accounting balances")
        assert exp.fast_writes == 0 and exp.general == 0 and exp.fast_read_calls == 0
        await c.close()
        await srv.close()
        assert [replies[h].error for h in (1, 2, 3)] == [p.NBD_ENOSPC, p.NBD_EINVAL, p.NBD_EINVAL]
        assert bytes(exp.data) == bytes(SIZE)

    run(main())


def test_max_in_flight_pauses_reading_while_fast_writes_are_pending(tmp_path):
    async def main() -> None:
        exp = FakeExport("later")
        srv, path = await serve(tmp_path, exp)
        c = await WireClient.connect(path)
        total = 4 * MAX_IN_FLIGHT  # more than the server's staging buffer holds
        model = bytearray(SIZE)
        for i in range(total):
            c.send(p.CMD_WRITE, i, i * 4096, 4096, block(i))
            model[i * 4096 : (i + 1) * 4096] = block(i)
        # not drained: the server stops reading at a full window, the socket holds the rest
        conn = only_conn(srv)
        assert conn.requests is not None
        await until(lambda: conn.requests.paused, "a full window paused reading")
        for _ in range(50):
            await asyncio.sleep(0)
        window = len(exp.pending)  # what was already buffered is dispatched, no more
        assert MAX_IN_FLIGHT <= window < total
        for _ in range(50):
            await asyncio.sleep(0)
        assert len(exp.pending) == window and conn.requests.in_flight == window
        replies: dict = {}
        while len(replies) < total:
            await until(lambda: bool(exp.pending), "reading resumed for the rest")
            n = len(exp.pending)
            exp.complete()
            replies.update(await c.replies(n))
        assert sorted(replies) == list(range(total))
        assert all(r.error == 0 for r in replies.values())
        await until(lambda: balanced(srv, exp), "in-flight accounting balances")
        assert exp.general == 0
        await c.close()
        await srv.close()
        assert bytes(exp.data) == bytes(model)

    run(main())


def test_close_waits_for_a_pending_fast_write_and_answers_it(tmp_path):
    async def main() -> None:
        exp = FakeExport("later")
        srv, path = await serve(tmp_path, exp)
        c = await WireClient.connect(path)
        c.send(p.CMD_WRITE, 9, 12288, 4096, block(9))
        await until(lambda: len(exp.pending) == 1, "the export took the write")
        closing = asyncio.create_task(srv.close())
        for _ in range(50):
            await asyncio.sleep(0)
        assert not closing.done(), "close() did not wait for the pending write"
        exp.complete()
        r = await c.reply()
        await asyncio.wait_for(closing, STEP)
        assert await c.at_eof()
        await c.close()
        assert (r.handle, r.error) == (9, 0)
        model = bytearray(SIZE)
        model[12288 : 12288 + 4096] = block(9)
        assert bytes(exp.data) == bytes(model)

    run(main())


def test_disc_answers_pending_fast_writes_first(tmp_path):
    async def main() -> None:
        exp = FakeExport("later")
        srv, path = await serve(tmp_path, exp)
        c = await WireClient.connect(path)
        c.send(p.CMD_WRITE, 1, 0, 4096, block(1))
        c.send(p.CMD_WRITE, 2, 4096, 4096, block(2))
        c.send(p.CMD_DISC, 3, 0, 0)
        await until(lambda: len(exp.pending) == 2, "the export took both writes")
        conn = only_conn(srv)
        assert conn.requests is not None and conn.requests.done  # DISC was read
        for _ in range(50):
            await asyncio.sleep(0)
        assert not conn.requests.closed.done(), "DISC closed before its writes were answered"
        exp.complete()
        replies = await c.replies(2)
        assert await c.at_eof()
        await c.close()
        await srv.close()
        assert sorted(replies) == [1, 2] and all(r.error == 0 for r in replies.values())
        assert bytes(exp.data[:8192]) == block(1) + block(2)
        assert bytes(exp.data[8192:]) == bytes(SIZE - 8192)

    run(main())


@pytest.mark.parametrize("mode", ["raise", "twice"])
def test_a_buggy_export_costs_one_connection_at_most(tmp_path, mode):
    async def main() -> None:
        exp = FakeExport(mode)
        srv, path = await serve(tmp_path, exp)
        c = await WireClient.connect(path)
        c.send(p.CMD_WRITE, 1, 0, 4096, block(1))
        if mode == "twice":
            r = await c.reply()  # answered exactly once
            assert (r.handle, r.error) == (1, 0)
            c.send(p.CMD_WRITE, 2, 4096, 4096, block(2))
            r = await c.reply()
            assert (r.handle, r.error) == (2, 0)
            await until(lambda: balanced(srv, exp), "in-flight accounting balances")
        else:
            assert await c.at_eof()  # the connection with the failed request is dropped
        await c.close()
        # the server still serves a new client, through the general path this time
        exp.mode = "refuse"
        c2 = await WireClient.connect(path)
        c2.send(p.CMD_WRITE, 5, 8192, 4096, block(5))
        r = await c2.reply()
        await c2.close()
        await srv.close()
        assert (r.handle, r.error) == (5, 0)
        assert bytes(exp.data[8192 : 8192 + 4096]) == block(5)
        if mode == "twice":
            assert bytes(exp.data[:8192]) == block(1) + block(2)
        else:
            assert bytes(exp.data[:8192]) == bytes(8192)

    run(main())


def test_large_fast_read_follows_replies_queued_before_it(tmp_path):
    """A fast read of 1 MiB is written at once; the small replies queued earlier in
    the same turn must leave before it (they are flushed first)."""

    async def main() -> None:
        exp = FakeExport("sync")
        exp.data[:] = bytes(range(256)) * (SIZE // 256)
        srv, path = await serve(tmp_path, exp)
        c = await WireClient.connect(path, structured=True)
        c.send(p.CMD_WRITE, 1, 0, 4096, block(1))
        c.send(p.CMD_READ, 2, 0, SIZE)
        replies = [await c.reply(), await c.reply()]
        await until(lambda: balanced(srv, exp), "in-flight accounting balances")
        await c.close()
        await srv.close()
        assert [r.handle for r in replies] == [1, 2]
        model = bytearray(bytes(range(256)) * (SIZE // 256))
        model[:4096] = block(1)
        assert replies[1].data == bytes(model) == bytes(exp.data)

    run(main())
