"""Issue 12, Why 3: one NBD client that stops reading its replies must not hold the others.

An export of a file is served by ``NBDServer`` on a unix socket, in this process, so the
test can quiesce and resume it as a checkpoint does. Client A negotiates, sends many
1 MiB reads and never reads a reply. Client B (blockrep's own NBD client) keeps
writing. On the old server A's reads stayed "in flight" on the export while their
replies waited for A, so a checkpoint's quiesce and B's writes hung for ever.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time

from blockrep.address import SocketAddress
from blockrep.block import Graph
from blockrep.export import Export
from blockrep.nbd import proto as p
from blockrep.nbd.client import NBDConnection
from blockrep.nbd.server import NBDServer
from tests.harness.stalled import stalled_client

MiB = 1 << 20
SIZE = 8 * MiB
B_REGION = (4 * MiB, SIZE)  # client B writes only here
STEP = 10.0  # bound on each quiesce and each write: a hang fails the test, no timing passes it


async def serve(tmp_path, initial: bytes, send_timeout: float) -> tuple[Export, NBDServer, str]:
    disk = str(tmp_path / "disk.raw")
    with open(disk, "wb") as f:
        f.write(initial)
    g = Graph()
    node = await g.add({"driver": "raw", "file": {"driver": "file", "filename": disk}})
    exp = Export("disk", node, writable=True)
    srv = NBDServer({"disk": exp}, send_timeout=send_timeout)
    path = str(tmp_path / "nbd.sock")
    await srv.listen_unix(path)
    return exp, srv, path


async def writer_b(path: str, model: bytearray, stop: asyncio.Event, done: list[int]) -> None:
    b = NBDConnection()
    await b.connect(SocketAddress.from_str(f"unix:{path}"), "disk")
    rnd = random.Random(12)
    try:
        while not stop.is_set() or len(done) < 20:
            off = rnd.randrange(B_REGION[0], B_REGION[1] - 65536, 4096)
            data = rnd.randbytes(65536)
            await asyncio.wait_for(b.request(p.CMD_WRITE, off, len(data), payload=data), STEP)
            model[off : off + len(data)] = data
            done.append(off)
        await asyncio.wait_for(b.request(p.CMD_FLUSH, 0, 0), STEP)
    finally:
        await b.close()


async def checkpoints(exp: Export, n: int) -> None:
    """What a checkpoint does to an export: hold new requests, wait for the others."""
    for _ in range(n):
        try:
            await asyncio.wait_for(exp.quiesce(), STEP)
        finally:
            exp.resume()
        await asyncio.sleep(0.05)


def test_stalled_reader_holds_neither_checkpoints_nor_other_clients(tmp_path):
    initial = random.Random(3).randbytes(SIZE)
    model = bytearray(initial)

    async def main() -> None:
        # no send timeout: A stays connected and stalled for the whole test
        exp, srv, path = await serve(tmp_path, initial, send_timeout=0)
        a = await asyncio.to_thread(stalled_client, path, 400, SIZE)
        try:
            (conn_a,) = srv.clients
            stop = asyncio.Event()
            done: list[int] = []
            b = asyncio.create_task(writer_b(path, model, stop, done))
            await asyncio.sleep(0.3)  # A's reads are computed and their replies stuck
            assert conn_a.tasks, "A has no request waiting on its replies"
            await checkpoints(exp, 8)
            stop.set()
            await asyncio.wait_for(b, 4 * STEP)
            assert len(done) >= 20
            # A is still connected and still stalled: nothing above waited for it
            assert conn_a in srv.clients and conn_a.tasks
        finally:
            a.close()
            await asyncio.wait_for(srv.close(), 4 * STEP)
            exp.release()

    asyncio.run(asyncio.wait_for(main(), 120))
    with open(tmp_path / "disk.raw", "rb") as f:
        assert f.read() == bytes(model)


def test_client_that_does_not_read_is_dropped_and_the_export_goes_on(tmp_path):
    initial = random.Random(4).randbytes(SIZE)
    model = bytearray(initial)

    async def main() -> None:
        exp, srv, path = await serve(tmp_path, initial, send_timeout=1.0)
        a = await asyncio.to_thread(stalled_client, path, 400, SIZE)
        try:
            stop = asyncio.Event()
            done: list[int] = []
            b = asyncio.create_task(writer_b(path, model, stop, done))
            await checkpoints(exp, 3)
            deadline = time.monotonic() + 6 * STEP
            while len(srv.clients) > 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert len(srv.clients) == 1, "the stalled client was not dropped"
            # A sees its connection end: what the kernel still holds, then EOF
            assert await asyncio.to_thread(read_to_end, a), "A's socket never saw EOF"
            await checkpoints(exp, 3)
            stop.set()
            await asyncio.wait_for(b, 4 * STEP)
        finally:
            a.close()
            await asyncio.wait_for(srv.close(), 4 * STEP)
            exp.release()

    asyncio.run(asyncio.wait_for(main(), 120))
    with open(tmp_path / "disk.raw", "rb") as f:
        assert f.read() == bytes(model)


def read_to_end(s: socket.socket) -> bool:
    s.setblocking(True)
    s.settimeout(STEP)
    try:
        while s.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_handshake_that_never_finishes_is_dropped(tmp_path):
    async def main() -> None:
        exp, srv, path = await serve(tmp_path, bytes(SIZE), send_timeout=0)
        srv.handshake_timeout = 0.5
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE))  # and nothing more
            assert await asyncio.to_thread(read_to_end, s)
            assert not srv.clients
        finally:
            s.close()
            await srv.close()
            exp.release()

    asyncio.run(asyncio.wait_for(main(), 60))
    with open(tmp_path / "disk.raw", "rb") as f:
        assert f.read() == bytes(SIZE)
