"""READ replies of a raw file export leave by os.sendfile (issue 15), byte for byte.

A real graph (raw over file) served by the NBD server on uvloop and on asyncio's
loop; a bare client reads many sizes at many offsets, aligned and not, structured
and simple, while another client writes; every reply and, at the end, the file are
compared with a model. os.sendfile is counted, so the test knows the replies went
that way, and a flood of unread replies makes sendfile stop part-way and the
transport carry the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import sys
from typing import Any

import pytest
import uvloop

from blockrep.address import SocketAddress
from blockrep.block import Graph
from blockrep.export import Export
from blockrep.nbd import proto as p
from blockrep.nbd.client import NBDConnection
from blockrep.nbd.server import NBDServer
from blockrep.tls import X509Credentials
from tests.harness.fast_path import fast_path_on
from tests.harness.nbd_wire import WireClient
from tests.harness.tls import make_pki


@pytest.fixture(autouse=True)
def _fast_path_on():
    """sendfile is the fast path's: on here also under ``BLOCKREP_FAST_PATH=0``."""
    with fast_path_on():
        yield


MiB = 1 << 20
SIZE = 16 * MiB

SIZES = [64 << 10, (64 << 10) + 1, 100_000, MiB - 1, MiB, MiB + 513, 3 * MiB + 7, 4 * MiB]
OFFSETS = [0, 1, 511, 4096, 4097, 65535, SIZE // 2 + 3]


class Sendfiles:
    """os.sendfile, counted: calls and how many of them sent less than asked."""

    def __init__(self) -> None:
        self.real = os.sendfile
        self.calls = 0
        self.short = 0
        self.bytes = 0

    def __call__(self, out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        self.calls += 1
        try:
            n = self.real(out_fd, in_fd, offset, count)
        except BlockingIOError:
            self.short += 1
            raise
        self.bytes += n
        if n < count:
            self.short += 1
        return n


# a reader in its own process (no GIL shared with the server): it drains the socket
# while the server is still answering, so space opens under a reply queued earlier
FLOOD = """
import asyncio, hashlib, json, sys
from blockrep.nbd import proto as p
from tests.harness.nbd_wire import WireClient
async def main(path, ranges):
    c = await WireClient.connect(path)
    for i, (off, n) in enumerate(ranges):
        c.send(p.CMD_READ, i, off, n)
    got = await c.replies(len(ranges))
    await c.close()
    print(json.dumps([got[i].error or hashlib.sha256(got[i].data).hexdigest() for i in sorted(got)]))
asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


async def flood_reads(path: str, ranges: list[tuple[int, int]]) -> list[str]:
    """Each reply's sha256, in request order, read by another process."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        FLOOD,
        path,
        json.dumps(ranges),
        cwd=root,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    return list(json.loads(out))


def loop_factory(name: str) -> Any:
    return uvloop.new_event_loop if name == "uvloop" else asyncio.new_event_loop


@pytest.mark.parametrize(
    ("loop", "transport"), [("uvloop", "unix"), ("uvloop", "tcp"), ("asyncio", "unix")]
)
def test_sendfile_read_replies_are_the_files_bytes(tmp_path, monkeypatch, loop, transport):
    rng = random.Random(15)
    disk = str(tmp_path / "disk.raw")
    model = bytearray(rng.randbytes(SIZE))
    with open(disk, "wb") as f:
        f.write(model)
    counted = Sendfiles()
    monkeypatch.setattr(os, "sendfile", counted)

    async def writer(c: WireClient, rounds: int, span: tuple[int, int]) -> None:
        """Writes inside ``span`` (the reads of this phase stay outside it)."""
        for r in range(rounds):
            batch: list[tuple[int, bytes]] = []
            # requests in flight together have no order: a batch's writes never overlap
            slot = (span[1] - span[0]) // 8
            for i in range(8):
                n = rng.choice([512, 4096, 65536, 200_000])
                off = span[0] + i * slot + rng.randrange(slot - n)
                data = rng.randbytes(n)
                c.send(p.CMD_WRITE, r * 8 + i, off, n, data)
                batch.append((off, data))
            replies = await c.replies(len(batch))
            assert all(x.error == 0 for x in replies.values())
            for off, data in batch:  # acknowledged: from now on reads must see them
                model[off : off + len(data)] = data

    async def reads(c: WireClient, ranges: list[tuple[int, int]], base: int) -> None:
        for i, (off, n) in enumerate(ranges):
            c.send(p.CMD_READ, base + i, off, n)
        got = await c.replies(len(ranges))
        for i, (off, n) in enumerate(ranges):
            r = got[base + i]
            assert r.error == 0
            assert r.data == bytes(model[off : off + n]), f"read {n} at {off}"

    async def main() -> None:
        g = Graph()
        node = await g.add({"driver": "raw", "file": {"driver": "file", "filename": disk}})
        exp = Export("disk", node, writable=True)
        srv = NBDServer({"disk": exp})
        if transport == "tcp":
            listener = await srv.listen_tcp("127.0.0.1", 0)
            path = "tcp:127.0.0.1:%d" % listener.sockets[0].getsockname()[1]
        else:
            path = str(tmp_path / "nbd.sock")
            await srv.listen_unix(path)
        try:
            simple = await WireClient.connect(path)
            structured = await WireClient.connect(path, structured=True)
            w = await WireClient.connect(path)
            lower = [(o, n) for n in SIZES for o in OFFSETS if o + n <= SIZE // 2]
            # phase 1: writes in the upper half while the lower half is read both ways
            await asyncio.gather(
                writer(w, 6, (SIZE // 2, SIZE)),
                reads(simple, lower, 1000),
                reads(structured, lower, 1000),
            )
            before = counted.calls
            assert before > 0, "no read reply went by sendfile"
            # phase 2: the upper half, written above, read back (page cache == model)
            upper = [(SIZE // 2 + o, n) for n in SIZES for o in OFFSETS if o + n <= SIZE // 2]
            await asyncio.gather(
                writer(w, 6, (0, SIZE // 2)),
                reads(structured, upper, 5000),
                reads(simple, upper, 5000),
            )
            # phase 3: 60 MiB of replies asked for in one send, so the server answers
            # them in one turn while a client on another thread reads: the socket fills
            # and drains under the server, sendfile stops part-way, the transport
            # carries the rest, and no reply may overtake bytes queued before it
            flood = [(i * MiB + 7, (4 if i % 5 == 0 else 1) * MiB) for i in range(15)] * 3
            want = [hashlib.sha256(model[o : o + n]).hexdigest() for o, n in flood]
            for _ in range(3):  # each round another chance for a reply to overtake
                assert await flood_reads(path, flood) == want
            whole = [(0, SIZE)]
            await reads(structured, whole, 20000)
            for c in (simple, structured, w):
                await c.close()
        finally:
            await srv.close()
            exp.release()
            await g.close_all()

    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        runner.run(asyncio.wait_for(main(), 120))
    assert counted.calls > 0 and counted.bytes > 0
    assert counted.short > 0, "the flood never found the socket full"
    with open(disk, "rb") as f:
        assert f.read() == bytes(model)


def test_tls_read_replies_never_use_sendfile(tmp_path, monkeypatch):
    """Under TLS the socket carries records, not the file's bytes: sendfile would
    put plaintext into the stream."""
    creds = make_pki(str(tmp_path))
    rng = random.Random(16)
    disk = str(tmp_path / "disk.raw")
    model = rng.randbytes(4 * MiB)
    with open(disk, "wb") as f:
        f.write(model)
    counted = Sendfiles()
    monkeypatch.setattr(os, "sendfile", counted)

    async def main() -> list[bytes]:
        g = Graph()
        node = await g.add({"driver": "raw", "file": {"driver": "file", "filename": disk}})
        exp = Export("disk", node, writable=True)
        srv = NBDServer({"disk": exp}, tls=X509Credentials(creds["server"]).server_context())
        path = str(tmp_path / "nbd.sock")
        await srv.listen_unix(path)
        try:
            c = NBDConnection()
            ctx = X509Credentials(creds["client"]).client_context(require_cert=True)
            await c.connect(SocketAddress.from_str(f"unix:{path}"), "disk", tls=ctx)
            got = [bytes((await c.request(p.CMD_READ, o, n)).data) for o, n in TLS_READS]
            await c.close()
            return got
        finally:
            await srv.close()
            exp.release()
            await g.close_all()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        got = runner.run(asyncio.wait_for(main(), 120))
    assert counted.calls == 0
    assert got == [model[o : o + n] for o, n in TLS_READS]


TLS_READS = [(0, MiB), (4097, MiB + 3), (3 * MiB, MiB)]
