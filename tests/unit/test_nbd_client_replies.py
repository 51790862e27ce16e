"""The NBD client's reply path (issue 15): replies parsed by a buffered protocol.

After the handshake ``NBDConnection`` hands its socket to ``ReplyReader``, which parses
replies out of a staging buffer, receives read data straight into the request's
buffer and completes requests from the transport's callback. These tests drive it
against a fake server scripted byte by byte (replies split at every boundary, out of
order, structured chunks, hostile replies) and against blockrep's own NBD server
(plain and TLS, reads up to 32 MiB among small writes). ``try_request`` is the fast
path's entry: callback completion, never synchronous, refusing without side effects.
Every data test compares bytes with a model; every test bounds its time.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import random
import struct
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from blockrep.address import SocketAddress
from blockrep.block import Graph
from blockrep.errors import BlockError
from blockrep.export import Export
from blockrep.nbd import proto as p
from blockrep.nbd.client import ConnectionLost, NBDConnection
from blockrep.nbd.server import NBDServer
from blockrep.tls import X509Credentials
from tests.harness.tls import make_pki

MiB = 1 << 20
SIZE = 64 * MiB
STEP = 20.0  # bound on each wait: a hang fails the test, no timing passes it
EXPORT_FLAGS = (
    p.TF_HAS_FLAGS | p.TF_SEND_FLUSH | p.TF_SEND_FUA | p.TF_SEND_TRIM | p.TF_SEND_WRITE_ZEROES
)


def data_chunk(handle: int, offset: int, body: bytes, last: bool) -> bytes:
    flags = p.REPLY_FLAG_DONE if last else 0
    return (
        p.CHUNK.pack(
            p.STRUCTURED_REPLY_MAGIC, flags, p.REPLY_TYPE_OFFSET_DATA, handle, 8 + len(body)
        )
        + struct.pack(">Q", offset)
        + body
    )


def same(got: bytes | bytearray, want: bytes | bytearray, what: str) -> None:
    """Compare large buffers without pytest's diff of megabytes: name the first difference."""
    if got != want:
        at = next((i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y), None)
        pytest.fail(f"{what}: {len(got)} bytes, {len(want)} expected, first difference at {at}")


LOOPS = ["asyncio", "uvloop"]  # the daemon runs on uvloop when installed (a dependency)


def run(main: Callable[[], Awaitable[None]], limit: float = 120, loop: str = "asyncio") -> None:
    factory = uvloop.new_event_loop if loop == "uvloop" else None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(asyncio.wait_for(main(), limit))
    finally:
        # a failed run leaves cycles (transports, futures) whose finalizers, run by a
        # collection inside pytest's report, trip CPython 3.11.7's "AST constructor
        # recursion depth mismatch" and turn a failure into an INTERNALERROR
        gc.collect()


# -- a fake server, scripted by the test --------------------------------------------------


class FakeServer:
    """One connection: a minimal fixed-newstyle handshake, then the test reads requests
    and writes replies itself (``send`` splits them into pieces of ``piece`` bytes)."""

    def __init__(self, structured: bool = True) -> None:
        self.structured = structured
        self.conn: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None
        self.server: asyncio.AbstractServer | None = None
        self.path = ""

    async def start(self, path: str) -> None:
        self.path = path
        self.conn = asyncio.get_running_loop().create_future()
        self.server = await asyncio.start_unix_server(self._handshake, path)

    async def _handshake(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        assert self.conn is not None
        w.write(p.pack_greeting())
        await r.readexactly(4)
        while True:
            _, opt, length = p.OPTION.unpack(await r.readexactly(p.OPTION.size))
            await r.readexactly(length)
            if opt == p.OPT_STRUCTURED_REPLY:
                rep = p.REP_ACK if self.structured else p.REP_ERR_UNSUP
                w.write(p.pack_option_reply(opt, rep))
            elif opt == p.OPT_SET_META_CONTEXT:
                w.write(
                    p.pack_option_reply(
                        opt, p.REP_META_CONTEXT, p.pack_meta_context(1, p.META_BASE_ALLOCATION)
                    )
                )
                w.write(p.pack_option_reply(opt, p.REP_ACK))
            elif opt == p.OPT_GO:
                w.write(
                    p.pack_option_reply(opt, p.REP_INFO, p.pack_info_export(SIZE, EXPORT_FLAGS))
                )
                w.write(p.pack_option_reply(opt, p.REP_ACK))
                await w.drain()
                self.conn.set_result((r, w))
                return
            await w.drain()

    async def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert self.conn is not None
        return await asyncio.wait_for(asyncio.shield(self.conn), STEP)

    async def close(self) -> None:
        if self.conn is not None and self.conn.done():
            self.conn.result()[1].close()
        if self.server is not None:
            self.server.close()


async def read_request(r: asyncio.StreamReader) -> tuple[p.Request, bytes]:
    req = p.parse_request(await asyncio.wait_for(r.readexactly(p.REQUEST.size), STEP))
    payload = b""
    if req.type == p.CMD_WRITE:
        payload = await asyncio.wait_for(r.readexactly(req.length), STEP)
    return req, payload


async def send(w: asyncio.StreamWriter, data: bytes, piece: int = 0) -> None:
    """Write ``data`` in pieces, letting the client's loop run between them."""
    piece = piece or len(data) or 1
    for i in range(0, len(data), piece):
        w.write(data[i : i + piece])
        await w.drain()
        await asyncio.sleep(0)


async def connect_fake(tmp_path, structured: bool = True) -> tuple[FakeServer, NBDConnection]:
    srv = FakeServer(structured)
    await srv.start(str(tmp_path / "fake.sock"))
    conn = NBDConnection()
    await asyncio.wait_for(conn.connect(SocketAddress.unix(srv.path), "disk"), STEP)
    assert conn.structured == structured
    return srv, conn


class Calls:
    """Records each try_request callback, and whether it ran inside try_request."""

    def __init__(self) -> None:
        self.results: dict[str, list[BaseException | None]] = {}
        self.inside = False
        self.synchronous: list[str] = []

    def done(self, name: str) -> Callable[[BaseException | None], None]:
        self.results[name] = []

        def cb(err: BaseException | None) -> None:
            if self.inside:
                self.synchronous.append(name)
            self.results[name].append(err)

        return cb

    def submit(self, conn: NBDConnection, name: str, typ: int, off: int, data: bytes) -> bool:
        self.inside = True
        try:
            return conn.try_request(typ, off, len(data), 0, data, self.done(name))
        finally:
            self.inside = False

    async def wait(self, *names: str) -> None:
        async with asyncio.timeout(STEP):
            while not all(self.results[n] for n in names):
                await asyncio.sleep(0.001)


# -- replies out of order, split anywhere ------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
def test_out_of_order_replies_split_byte_by_byte_complete_their_own_requests(tmp_path, structured):
    rnd = random.Random(1)
    disk = bytearray(rnd.randbytes(2 * MiB))

    async def main() -> None:
        srv, conn = await connect_fake(tmp_path, structured)
        r, w = await srv.accept()
        try:
            sizes = [(0, 4096), (8192, 512), (MiB, 300 * 1024), (100, 1)]
            reads = [asyncio.ensure_future(conn.request(p.CMD_READ, off, n)) for off, n in sizes]
            wdata = rnd.randbytes(8192)
            write = asyncio.ensure_future(conn.request(p.CMD_WRITE, 65536, len(wdata), 0, wdata))
            reqs = [await read_request(r) for _ in range(5)]
            assert reqs[4][1] == wdata
            disk[65536 : 65536 + len(wdata)] = wdata
            # the write first, then the reads in reverse, each split at every byte for
            # the small ones and in odd pieces for the large one
            await send(w, p.pack_simple_reply(reqs[4][0].handle), piece=1)
            await asyncio.wait_for(write, STEP)
            assert not any(t.done() for t in reads)
            for req, _ in reversed(reqs[:4]):
                body = bytes(disk[req.offset : req.offset + req.length])
                if structured:
                    reply = p.pack_offset_data_header(req.handle, req.offset, req.length) + body
                else:
                    reply = p.pack_simple_reply(req.handle) + body
                await send(w, reply, piece=1 if req.length < 8192 else 4093)
            for (off, n), t in zip(sizes, reads, strict=True):
                same((await asyncio.wait_for(t, STEP)).data, disk[off : off + n], f"read {off}+{n}")
        finally:
            await conn.close()
            await srv.close()

    run(main)


def test_replies_packed_in_one_segment_complete_every_request(tmp_path):
    """Many small replies in one write: the staging buffer holds several at once."""
    rnd = random.Random(2)
    disk = rnd.randbytes(MiB)

    async def main() -> None:
        srv, conn = await connect_fake(tmp_path)
        r, w = await srv.accept()
        try:
            offs = [rnd.randrange(0, MiB - 4096) for _ in range(200)]
            reads = [asyncio.ensure_future(conn.request(p.CMD_READ, o, 4096)) for o in offs]
            reqs = [(await read_request(r))[0] for _ in offs]
            rnd.shuffle(reqs)
            blob = b"".join(
                p.pack_offset_data_header(q.handle, q.offset, q.length)
                + disk[q.offset : q.offset + q.length]
                for q in reqs
            )
            await send(w, blob)
            for o, t in zip(offs, reads, strict=True):
                same((await asyncio.wait_for(t, STEP)).data, disk[o : o + 4096], f"read {o}")
        finally:
            await conn.close()
            await srv.close()

    run(main)


def test_simple_error_reply_to_a_read_carries_no_payload(tmp_path):
    """Without structured replies an error reply to a read has no data after it: the
    next reply's header is parsed right after it, in the same segment."""

    async def main() -> None:
        srv, conn = await connect_fake(tmp_path, structured=False)
        r, w = await srv.accept()
        try:
            bad = asyncio.ensure_future(conn.request(p.CMD_READ, 0, 4096))
            good = asyncio.ensure_future(conn.request(p.CMD_READ, 4096, 4096))
            rb, rg = [(await read_request(r))[0] for _ in range(2)]
            body = random.Random(7).randbytes(4096)
            await send(
                w, p.pack_simple_reply(rb.handle, p.NBD_EIO) + p.pack_simple_reply(rg.handle) + body
            )
            with pytest.raises(BlockError) as e:
                await asyncio.wait_for(bad, STEP)
            assert e.value.errno == errno.EIO
            same((await asyncio.wait_for(good, STEP)).data, body, "read after an error reply")
        finally:
            await conn.close()
            await srv.close()

    run(main)


# -- structured read chunks -------------------------------------------------------------------


def test_structured_chunks_data_hole_and_error_complete_reads_byte_exact(tmp_path):
    rnd = random.Random(3)
    big = 3 * MiB + 5  # larger than the staging buffer: received in place

    async def main() -> None:
        srv, conn = await connect_fake(tmp_path)
        r, w = await srv.accept()
        try:
            a = asyncio.ensure_future(conn.request(p.CMD_READ, 4096, big))
            b = asyncio.ensure_future(conn.request(p.CMD_READ, 0, 8192))
            c = asyncio.ensure_future(conn.request(p.CMD_READ, 0, 4096))
            ra, rb, rc = [(await read_request(r))[0] for _ in range(3)]
            model = bytearray(big)
            # a: data at the end first, a hole in the middle, data at the start; the
            # chunks of a, b and c interleaved
            tail = rnd.randbytes(MiB)
            model[big - MiB :] = tail
            head = rnd.randbytes(big - MiB - 65536)
            model[: len(head)] = head
            await send(w, data_chunk(ra.handle, 4096 + big - MiB, tail, False), piece=70001)
            w.write(data_chunk(rb.handle, 4096, b"\xbb" * 4096, False))
            w.write(p.pack_error_chunk(rc.handle, p.NBD_ENOSPC, "no room here"))
            w.write(p.pack_offset_hole(ra.handle, 4096 + len(head), 65536, flags=0))
            w.write(p.pack_offset_hole(rb.handle, 0, 4096))
            await send(w, data_chunk(ra.handle, 4096, head, True), piece=1 << 16)
            same((await asyncio.wait_for(a, STEP)).data, model, "read a")
            assert bytes((await asyncio.wait_for(b, STEP)).data) == bytes(4096) + b"\xbb" * 4096
            with pytest.raises(BlockError) as e:
                await asyncio.wait_for(c, STEP)
            assert e.value.errno == errno.ENOSPC and "no room here" in str(e.value)
            # the connection goes on
            d = asyncio.ensure_future(conn.request(p.CMD_READ, 0, 16))
            rd, _ = await read_request(r)
            await send(w, p.pack_offset_data_header(rd.handle, 0, 16) + b"0123456789abcdef")
            assert bytes((await asyncio.wait_for(d, STEP)).data) == b"0123456789abcdef"
        finally:
            await conn.close()
            await srv.close()

    run(main)


def test_block_status_chunk_larger_than_the_staging_buffer(tmp_path):
    extents = [(4096, i % 4) for i in range(40000)]  # 320 000 bytes of descriptors

    async def main() -> None:
        srv, conn = await connect_fake(tmp_path)
        r, w = await srv.accept()
        try:
            t = asyncio.ensure_future(conn.request(p.CMD_BLOCK_STATUS, 0, 4096 * 40000))
            req, _ = await read_request(r)
            await send(w, p.pack_block_status(req.handle, 1, extents), piece=50000)
            assert (await asyncio.wait_for(t, STEP)).extents == extents
        finally:
            await conn.close()
            await srv.close()

    run(main)


# -- try_request ------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_try_request_calls_back_once_never_synchronously(tmp_path, loop):
    rnd = random.Random(4)

    async def main() -> None:
        srv, conn = await connect_fake(tmp_path)
        r, w = await srv.accept()
        calls = Calls()
        try:
            data = {n: rnd.randbytes(4096 * (i + 1)) for i, n in enumerate("abcd")}
            for i, (name, d) in enumerate(data.items()):
                assert calls.submit(conn, name, p.CMD_WRITE, i * MiB, d)
            assert calls.submit(conn, "flush", p.CMD_FLUSH, 0, b"")
            assert all(v == [] for v in calls.results.values())
            reqs = {}
            for name in [*data, "flush"]:
                req, payload = await read_request(r)
                reqs[name] = req
                if name in data:  # the bytes on the wire are the caller's, in order
                    assert (req.type, req.offset, payload) == (
                        p.CMD_WRITE,
                        list(data).index(name) * MiB,
                        data[name],
                    )
            assert reqs["flush"].type == p.CMD_FLUSH
            # out of order: success (simple), error (simple), error (structured), success
            # (structured NONE chunk)
            await send(w, p.pack_simple_reply(reqs["c"].handle), piece=3)
            await send(w, p.pack_simple_reply(reqs["a"].handle, p.NBD_EPERM))
            await send(w, p.pack_error_chunk(reqs["flush"].handle, p.NBD_EIO, "disk gone"))
            await send(w, p.pack_chunk(reqs["b"].handle, p.REPLY_TYPE_NONE))
            await calls.wait("a", "b", "c", "flush")
            assert calls.results["c"] == [None] and calls.results["b"] == [None]
            (ea,) = calls.results["a"]
            assert isinstance(ea, BlockError) and ea.errno == errno.EPERM
            (ef,) = calls.results["flush"]
            assert isinstance(ef, BlockError) and ef.errno == errno.EIO
            assert "disk gone" in str(ef)
            # d is pending when the server goes away: ConnectionLost, once
            w.close()
            await calls.wait("d")
            (ed,) = calls.results["d"]
            assert isinstance(ed, ConnectionLost)
            await asyncio.sleep(0.05)
            assert all(len(v) == 1 for v in calls.results.values())
            assert calls.synchronous == []
            assert conn.closed and not conn.pending
            # a closed connection refuses, with no callback
            assert not calls.submit(conn, "late", p.CMD_WRITE, 0, b"x" * 512)
            await asyncio.sleep(0.01)
            assert calls.results["late"] == []
        finally:
            await conn.close()
            await srv.close()

    run(main, loop=loop)


def test_try_request_and_request_share_the_wire_in_write_order(tmp_path):
    async def main() -> None:
        srv, conn = await connect_fake(tmp_path)
        r, w = await srv.accept()
        calls = Calls()
        try:
            t1 = asyncio.ensure_future(conn.request(p.CMD_WRITE, 0, 512, 0, b"1" * 512))
            await asyncio.sleep(0)  # t1 has written and released the lock
            assert calls.submit(conn, "two", p.CMD_WRITE, 512, b"2" * 512)
            t3 = asyncio.ensure_future(conn.request(p.CMD_WRITE, 1024, 512, 0, b"3" * 512))
            got = [await read_request(r) for _ in range(3)]
            assert [pl for _, pl in got] == [b"1" * 512, b"2" * 512, b"3" * 512]
            for req, _ in reversed(got):
                await send(w, p.pack_simple_reply(req.handle))
            await asyncio.wait_for(asyncio.gather(t1, t3), STEP)
            await calls.wait("two")
            assert calls.results["two"] == [None]
        finally:
            await conn.close()
            await srv.close()

    run(main)


@pytest.mark.parametrize("loop", LOOPS)
def test_try_request_refuses_without_side_effects_while_the_write_side_is_busy(tmp_path, loop):
    async def main() -> None:
        srv, conn = await connect_fake(tmp_path)
        r, w = await srv.accept()
        calls = Calls()
        try:
            # 1. a sender holds the lock
            async with conn.wlock:
                before = (dict(conn.pending), next(conn.handles))
                assert not calls.submit(conn, "locked", p.CMD_WRITE, 0, b"x" * 4096)
                assert (dict(conn.pending), next(conn.handles)) == (before[0], before[1] + 1)
            # 2. the server does not read: a big request() waits in drain, holding the lock
            big = asyncio.ensure_future(
                conn.request(p.CMD_WRITE, 0, 32 * MiB, 0, b"\x01" * (32 * MiB))
            )
            await asyncio.sleep(0.1)
            assert conn.wlock.locked() and not big.done()
            assert not calls.submit(conn, "draining", p.CMD_WRITE, 0, b"x" * 4096)
            # the server takes the big write; then fill the transport with try_request
            # until it refuses (above the high-water mark), the server still not reading
            req, payload = await read_request(r)
            assert payload == b"\x01" * (32 * MiB)
            await send(w, p.pack_simple_reply(req.handle))
            await asyncio.wait_for(big, STEP)
            accepted = []
            for i in range(200):
                name = f"w{i}"
                if not calls.submit(conn, name, p.CMD_WRITE, i * MiB % SIZE, b"%d" % i * MiB):
                    break
                accepted.append(name)
            else:
                pytest.fail("try_request never refused with the transport full")
            n_pending = len(conn.pending)
            assert n_pending == len(accepted)
            assert calls.results[name] == [] and not calls.submit(conn, name, p.CMD_FLUSH, 0, b"")
            assert len(conn.pending) == n_pending
            # the server catches up: every accepted request completes once, with success
            for i in range(len(accepted)):
                req, payload = await read_request(r)
                assert payload == b"%d" % i * MiB
                w.write(p.pack_simple_reply(req.handle))
            await calls.wait(*accepted)
            assert all(calls.results[a] == [None] for a in accepted)
            assert calls.results["locked"] == [] and calls.results["draining"] == []
            assert calls.synchronous == []
            with pytest.raises(ValueError):
                conn.try_request(p.CMD_READ, 0, 4096, 0, b"", calls.done("read"))
        finally:
            await conn.close()
            await srv.close()

    run(main, loop=loop)


# -- hostile replies tear the connection down --------------------------------------------------


BAD_REPLIES: dict[str, Callable[[int], bytes]] = {
    "unknown handle (simple)": lambda h: p.pack_simple_reply(h + 1000),
    "unknown handle (chunk)": lambda h: p.pack_chunk(h + 1000, p.REPLY_TYPE_NONE),
    "bad magic": lambda h: struct.pack(">IIQ", 0x12345678, 0, h),
    "oversize chunk": lambda h: p.CHUNK.pack(
        p.STRUCTURED_REPLY_MAGIC, 1, p.REPLY_TYPE_OFFSET_DATA, h, p.MAX_BUFFER + 65
    ),
    "data outside the request": lambda h: p.pack_offset_data_header(h, 1 << 30, 16) + bytes(16),
    "data chunk too short": lambda h: p.pack_chunk(h, p.REPLY_TYPE_OFFSET_DATA, b"abc"),
    "hole chunk too short": lambda h: p.pack_chunk(h, p.REPLY_TYPE_OFFSET_HOLE, b"abc"),
}


@pytest.mark.parametrize("bad", list(BAD_REPLIES))
@pytest.mark.parametrize("loop", LOOPS)
def test_hostile_reply_fails_every_pending_request_with_connection_lost(tmp_path, bad, loop):
    async def main() -> None:
        srv, conn = await connect_fake(tmp_path)
        r, w = await srv.accept()
        calls = Calls()
        try:
            rd = asyncio.ensure_future(conn.request(p.CMD_READ, 0, 4096))
            wr = asyncio.ensure_future(conn.request(p.CMD_WRITE, 0, 512, 0, bytes(512)))
            await asyncio.sleep(0)
            assert calls.submit(conn, "cb", p.CMD_WRITE, 512, bytes(512))
            reqs = [(await read_request(r))[0] for _ in range(3)]
            await send(w, BAD_REPLIES[bad](reqs[0].handle))
            for t in (rd, wr):
                with pytest.raises(ConnectionLost):
                    await asyncio.wait_for(t, STEP)
            await calls.wait("cb")
            assert isinstance(calls.results["cb"][0], ConnectionLost)
            assert len(calls.results["cb"]) == 1 and calls.synchronous == []
            assert conn.closed and not conn.pending
            with pytest.raises(ConnectionLost):
                await conn.request(p.CMD_READ, 0, 512)
            # the client closed its side
            assert await asyncio.wait_for(r.read(), STEP) == b""
        finally:
            await conn.close()
            await srv.close()

    run(main, loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_close_sends_disc_and_ends_the_connection(tmp_path, loop):
    async def main() -> None:
        srv, conn = await connect_fake(tmp_path)
        r, w = await srv.accept()
        try:
            t = asyncio.ensure_future(conn.request(p.CMD_WRITE, 0, 512, 0, b"z" * 512))
            req, _ = await read_request(r)
            await send(w, p.pack_simple_reply(req.handle))
            await asyncio.wait_for(t, STEP)
            await asyncio.wait_for(conn.close(), STEP)
            req, _ = await read_request(r)
            assert req.type == p.CMD_DISC
            assert await asyncio.wait_for(r.read(), STEP) == b""
            assert conn.closed and conn.replies is not None and conn.replies.ended.done()
        finally:
            await srv.close()

    run(main, loop=loop)


# -- against blockrep's NBD server --------------------------------------------------------------


async def serve(tmp_path, initial: bytes, tls=None) -> tuple[Export, NBDServer, str]:
    disk = str(tmp_path / "disk.raw")
    with open(disk, "wb") as f:
        f.write(initial)
    g = Graph()
    node = await g.add({"driver": "raw", "file": {"driver": "file", "filename": disk}})
    exp = Export("disk", node, writable=True)
    srv = NBDServer({"disk": exp}, tls=tls)
    path = str(tmp_path / "nbd.sock")
    await srv.listen_unix(path)
    return exp, srv, path


async def mixed_traffic(conn: NBDConnection, model: bytearray, rnd: random.Random) -> None:
    """Large reads (1 MiB, 32 MiB) in flight with small writes (coroutine and callback)
    to other regions; every read compared with the model."""
    calls = Calls()
    for rounds in range(3):
        reads = {
            (0, 32 * MiB): asyncio.ensure_future(conn.request(p.CMD_READ, 0, 32 * MiB)),
        }
        for i in range(8):
            off = 32 * MiB + i * MiB
            reads[(off, MiB)] = asyncio.ensure_future(conn.request(p.CMD_READ, off, MiB))
        writes = []
        for i in range(64):
            off = 48 * MiB + rnd.randrange(0, 16 * MiB - 4096, 4096)
            data = rnd.randbytes(4096)
            model[off : off + 4096] = data
            name = f"{rounds}.{i}"
            if i % 2 or not calls.submit(conn, name, p.CMD_WRITE, off, data):
                calls.results.pop(name, None)  # refused (or not tried): the coroutine path
                writes.append(asyncio.ensure_future(conn.request(p.CMD_WRITE, off, 4096, 0, data)))
            await asyncio.sleep(0)
        snapshot = bytes(model[: 48 * MiB])
        for (off, n), t in reads.items():
            same((await asyncio.wait_for(t, STEP)).data, snapshot[off : off + n], f"read {off}+{n}")
        await asyncio.wait_for(asyncio.gather(*writes), STEP)
        await calls.wait(*calls.results)
        assert all(v == [None] for v in calls.results.values())
    assert calls.synchronous == []
    got = bytearray()
    for off in range(0, SIZE, 32 * MiB):
        got += (await conn.request(p.CMD_READ, off, 32 * MiB)).data
    same(got, model, "whole disk")


@pytest.mark.parametrize("loop", LOOPS)
def test_large_reads_among_small_writes_against_blockrep_server(tmp_path, loop):
    rnd = random.Random(5)
    initial = rnd.randbytes(SIZE)
    model = bytearray(initial)

    async def main() -> None:
        exp, srv, path = await serve(tmp_path, initial)
        conn = NBDConnection()
        try:
            await asyncio.wait_for(conn.connect(SocketAddress.unix(path), "disk"), STEP)
            await mixed_traffic(conn, model, rnd)
            await conn.request(p.CMD_FLUSH, 0, 0)
        finally:
            await conn.close()
            await asyncio.wait_for(srv.close(), STEP)
            exp.release()

    run(main, 240, loop)
    with open(tmp_path / "disk.raw", "rb") as f:
        same(f.read(), model, "disk file")


@pytest.mark.parametrize("loop", LOOPS)
def test_large_reads_among_small_writes_over_tls(tmp_path, loop):
    creds = make_pki(str(tmp_path))
    rnd = random.Random(6)
    initial = rnd.randbytes(SIZE)
    model = bytearray(initial)

    async def main() -> None:
        tls = X509Credentials(creds["server"]).server_context()
        exp, srv, path = await serve(tmp_path, initial, tls=tls)
        client_ctx = X509Credentials(creds["client"]).client_context(require_cert=True)
        conn = NBDConnection()
        try:
            await asyncio.wait_for(
                conn.connect(SocketAddress.unix(path), "disk", tls=client_ctx), STEP
            )
            assert conn.writer is not None and conn.writer.get_extra_info("ssl_object")
            await mixed_traffic(conn, model, rnd)
            await conn.request(p.CMD_FLUSH, 0, 0)
        finally:
            await conn.close()
            await asyncio.wait_for(srv.close(), STEP)
            exp.release()

    run(main, 240, loop)
    with open(tmp_path / "disk.raw", "rb") as f:
        same(f.read(), model, "disk file")
