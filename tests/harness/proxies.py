"""Fault-injecting proxies between the processes under test.

``BlackholeProxy``: a TCP proxy on 127.0.0.1 that can blackhole the HA control link.
``blackhole()`` stops forwarding in both directions without closing anything: bytes
stay in the kernel buffers, new connections are accepted and then left hanging --
what a partitioned network looks like to both ends. ``heal()`` closes the stalled
connections (as TCP would after a long partition) and forwards new ones again.

``CrashProxy``: an NBD-aware unix-socket proxy between P's replication link and S's ``hidden_disk0``
export, for the shared-disk crash-ordering tests.

Once ``armed`` (the link idle, in the transmission phase), the proxy parses the
stream in both directions and calls the test's hooks at exact protocol points:

* ``on_request(index, header, payload)`` for every request P sends (pre-image
  writes, flushes); it may answer ``("partial", nbytes)`` to pass only the first
  ``nbytes`` of the message on and cut the link (after ``kill``).
* ``on_reply(index, message)`` for every reply S sends (an acknowledged
  pre-image); it may answer ``"hold"`` (never pass it on: S stored the pre-image,
  P never learns it) or ``("ack", delay)`` (pass it on, wait ``delay`` seconds,
  then ``kill``), or ``None`` to just pass it on.

``kill`` is the test's callback that SIGKILLs P; after it, every connection closes.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any


class BlackholeProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.blackholed = False
        self.closed = False
        self.lock = threading.Lock()
        self.conns: list[list[socket.socket]] = []
        self.accepted = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                r, _, _ = select.select([self.lsock], [], [], 0.05)
                if not r:
                    continue
                c, _ = self.lsock.accept()
            except OSError:
                return
            self.accepted += 1
            with self.lock:
                if self.blackholed:
                    self.conns.append([c])  # held open, never forwarded
                    continue
            try:
                u = socket.create_connection(self.target, timeout=5)
            except OSError:
                c.close()
                continue
            pair = [c, u]
            with self.lock:
                self.conns.append(pair)
            threading.Thread(target=self._pump, args=(pair,), daemon=True).start()

    def _pump(self, pair: list[socket.socket]) -> None:
        c, u = pair
        peer = {c: u, u: c}
        try:
            while not self.closed and pair in self.conns:
                if self.blackholed:
                    threading.Event().wait(0.02)
                    continue
                r, _, _ = select.select([c, u], [], [], 0.05)
                if self.blackholed:
                    continue  # read nothing more: the data stays where it is
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        raise OSError("eof")
                    peer[s].sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            self._drop(pair)

    def _drop(self, pair: list[socket.socket]) -> None:
        with self.lock:
            if pair in self.conns:
                self.conns.remove(pair)
        for s in pair:
            try:
                s.close()
            except OSError:
                pass

    def blackhole(self) -> None:
        self.blackholed = True

    def heal(self) -> None:
        """Close the stalled connections, forward new ones.

        The stalled connections leave the list and forwarding is switched on in
        one locked step: a connection accepted in between would otherwise be
        neither dropped nor forwarded, and its client would wait forever. A pump
        whose pair left the list stops before it forwards anything stale."""
        with self.lock:
            old = list(self.conns)
            self.conns.clear()
            self.blackholed = False
        for pair in old:
            self._drop(pair)

    def close(self) -> None:
        self.closed = True
        self.heal()
        try:
            self.lsock.close()
        except OSError:
            pass


REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
CMD_WRITE = 1


class CrashProxy:
    def __init__(self, listen: str, target: str, kill: Callable[[], None]) -> None:
        self.listen = listen
        self.target = target
        self.kill = kill
        self.armed = False
        self.killed = False
        self.on_request: Callable[[int, tuple, bytes], Any] | None = None
        self.on_reply: Callable[[int, bytes], Any] | None = None
        self.slow_reply = 0.0  # seconds each armed reply is held back (a slow export)
        self.requests = 0
        self.replies = 0
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._accept, self.listen)

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        sreader, swriter = await asyncio.open_unix_connection(self.target)
        self.writers += [cwriter, swriter]
        t1 = asyncio.ensure_future(self._pump(creader, swriter, self._requests))
        t2 = asyncio.ensure_future(self._pump(sreader, cwriter, self._replies))
        self.tasks += [t1, t2]

    def do_kill(self) -> None:
        if not self.killed:
            self.killed = True
            self.kill()
            for w in self.writers:
                w.close()

    async def _pump(self, reader, writer, parse) -> None:
        buf = bytearray()
        try:
            while not self.killed:
                data = await reader.read(1 << 20)
                if not data:
                    break
                if self.killed:
                    return
                if not self.armed and not buf:
                    writer.write(data)
                    await writer.drain()
                    continue
                buf += data
                await parse(buf, writer)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _requests(self, buf: bytearray, writer: asyncio.StreamWriter) -> None:
        while len(buf) >= 28 and not self.killed:
            magic, flags, typ, handle, offset, length = struct.unpack(">IHHQQI", buf[:28])
            assert magic == REQUEST_MAGIC, hex(magic)
            total = 28 + (length if typ == CMD_WRITE else 0)
            if len(buf) < total:
                return
            msg = bytes(buf[:total])
            del buf[:total]
            idx = self.requests
            self.requests += 1
            act = self.on_request(idx, (typ, offset, length), msg) if self.on_request else None
            if isinstance(act, tuple) and act[0] == "partial":
                writer.write(msg[: act[1]])
                await writer.drain()
                await asyncio.sleep(0.005)  # let S read the fragment before the link drops
                self.do_kill()
                return
            writer.write(msg)
            await writer.drain()

    async def _replies(self, buf: bytearray, writer: asyncio.StreamWriter) -> None:
        while len(buf) >= 4 and not self.killed:
            (magic,) = struct.unpack(">I", buf[:4])
            if magic == SIMPLE_REPLY_MAGIC:
                total = 16
            elif magic == STRUCTURED_REPLY_MAGIC:
                if len(buf) < 20:
                    return
                total = 20 + struct.unpack(">I", buf[16:20])[0]
            else:
                raise AssertionError(f"bad reply magic {magic:#x}")
            if len(buf) < total:
                return
            msg = bytes(buf[:total])
            del buf[:total]
            idx = self.replies
            self.replies += 1
            act = self.on_reply(idx, msg) if self.on_reply else None
            if self.slow_reply:
                await asyncio.sleep(self.slow_reply)
            if act == "hold":
                self.do_kill()
                return
            writer.write(msg)
            await writer.drain()
            if isinstance(act, tuple) and act[0] == "ack":
                delay = act[1]
                if delay > 0:
                    end = time.monotonic() + delay
                    while time.monotonic() < end:  # spin: sub-millisecond precision
                        pass
                self.do_kill()
                return

    async def close(self) -> None:
        self.killed = True
        for w in self.writers:
            w.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
