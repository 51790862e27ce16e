"""A bare NBD client for tests of the server: requests and replies as bytes on a socket.

No pipelining logic, no retries: a test sends exactly the requests it names and reads
exactly the replies it expects, so it sees what the server put on the wire.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from blockrep.nbd import proto as p

STEP = 10.0  # bound on each wait: a hang fails the test, no timing passes it


@dataclass
class Reply:
    handle: int
    error: int
    data: bytes = b""


class WireClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.structured = False
        self.size = 0
        self.reads: dict[int, int] = {}  # handle -> length of each READ in flight

    @classmethod
    async def connect(cls, path: str, name: str = "disk", structured: bool = False) -> WireClient:
        """``path``: a unix socket's path, or ``tcp:HOST:PORT``."""
        if path.startswith("tcp:"):
            host, port = path[4:].rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port), limit=64 << 20)
        else:
            reader, writer = await asyncio.open_unix_connection(path, limit=64 << 20)
        c = cls(reader, writer)
        await c._exact(p.HEADER.size)
        writer.write(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        if structured:
            writer.write(p.OPTION.pack(p.IHAVEOPT, p.OPT_STRUCTURED_REPLY, 0))
            _, opt, rep, length = p.OPTION_REPLY.unpack(await c._exact(p.OPTION_REPLY.size))
            assert (opt, rep, length) == (p.OPT_STRUCTURED_REPLY, p.REP_ACK, 0)
            c.structured = True
        raw = name.encode()
        writer.write(p.OPTION.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, len(raw)) + raw)
        c.size, _flags = struct.unpack(">QH", await c._exact(10))
        return c

    async def _exact(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), STEP)

    def send(
        self, typ: int, handle: int, offset: int, length: int, payload: bytes = b"", flags: int = 0
    ) -> None:
        if typ == p.CMD_READ:
            self.reads[handle] = length
        self.writer.write(
            p.REQUEST.pack(p.REQUEST_MAGIC, flags, typ, handle, offset, length) + payload
        )

    async def reply(self) -> Reply:
        """The next reply; a structured read's chunks are joined into one."""
        magic = struct.unpack(">I", await self._exact(4))[0]
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", await self._exact(12))
            n = self.reads.pop(handle, 0)
            return Reply(handle, error, await self._exact(n) if n and not error else b"")
        assert magic == p.STRUCTURED_REPLY_MAGIC, hex(magic)
        data = bytearray()
        while True:
            flags, typ, handle, length = struct.unpack(">HHQI", await self._exact(16))
            body = await self._exact(length)
            if typ == p.REPLY_TYPE_OFFSET_DATA:
                data += body[8:]
            elif typ & (1 << 15):
                self.reads.pop(handle, None)
                return Reply(handle, struct.unpack(">I", body[:4])[0])
            if flags & p.REPLY_FLAG_DONE:
                self.reads.pop(handle, None)
                return Reply(handle, 0, bytes(data))
            # OFFSET_DATA chunks of one reply are sent in one piece by blockrep
            magic = struct.unpack(">I", await self._exact(4))[0]
            assert magic == p.STRUCTURED_REPLY_MAGIC

    async def replies(self, n: int) -> dict[int, Reply]:
        out: dict[int, Reply] = {}
        for _ in range(n):
            r = await self.reply()
            out[r.handle] = r
        return out

    async def at_eof(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), STEP) == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass
