"""QMP wire protocol, server side (QEMU docs/interop/qmp-spec).

Greeting, capabilities negotiation, ``execute`` with ``id`` echoed, errors with
QEMU's classes and texts, and asynchronous events with timestamps, for any
number of clients on unix and TCP sockets. Input is a stream of JSON objects
with no framing, so ``JSONSplitter`` cuts whole values out of it (as QEMU's
json-streamer does, by counting brackets) before any is parsed; a malformed one
is answered with an error and the connection stays up.

Bounds: no idle timeout (an operator keeps a monitor open), but at most
``max_connections`` sessions, each admitted against the process's descriptor
budget with the operator's share (``limits``); one command at a time per session,
in order, as QEMU's monitor runs them, and the next input is read only when the
previous command has answered, so a client pipelining without end is held back
by its own socket; a session whose unread output passes MAX_OUTPUT is dropped.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from typing import Any

from .. import __version__, limits
from ..errors import BlockrepError
from .table import CommandTable

log = logging.getLogger("blockrep.qmp")

MAX_INPUT = 16 << 20  # a client that sends more than this without a complete object is dropped
MAX_NESTING = 1024  # QEMU's json-streamer.c MAX_NESTING
MAX_OUTPUT = 16 << 20  # unread replies and events before a session is dropped
MAX_CONNECTIONS = 64
YIELD_EVERY = 32  # commands answered from one read before other clients get a turn


def event_message(name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    now = time.time()
    msg: dict[str, Any] = {"event": name}
    if data is not None:
        msg["data"] = data
    msg["timestamp"] = {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}
    return msg


class QMPServer:
    def __init__(self, commands: CommandTable, *, max_connections: int = MAX_CONNECTIONS) -> None:
        """``max_connections``: 0 is no cap (the descriptor budget still applies)."""
        self.commands = commands
        self.max_connections = max_connections
        self.refused = 0  # connections closed at accept (the cap or the descriptor budget)
        self.sessions: set[QMPSession] = set()
        self.servers: list[asyncio.AbstractServer] = []

    async def listen_unix(self, path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)
        old = os.umask(0o177)  # the socket is created mode 0600
        try:
            srv = await asyncio.start_unix_server(self._accept, path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.servers.append(srv)

    async def listen_tcp(self, host: str, port: int) -> None:
        self.servers.append(
            await asyncio.start_server(self._accept, host, port, reuse_address=True)
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.max_connections and len(self.sessions) >= self.max_connections:
            self.refused += 1
            log.debug("QMP connection refused: %d sessions open", len(self.sessions))
            writer.transport.abort()
            return
        if not limits.admit_connection(limits.Share.OPERATOR):
            self.refused += 1
            log.debug("QMP connection refused: descriptor reserve reached")
            writer.transport.abort()
            return
        session = QMPSession(self, reader, writer)
        session.task = asyncio.current_task()
        self.sessions.add(session)
        try:
            await session.run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("QMP session failed")
        finally:
            limits.release_connection()
            self.sessions.discard(session)
            writer.close()

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        msg = event_message(name, data)
        for s in list(self.sessions):
            if s.negotiated:
                s.send_nowait(msg)

    async def close(self) -> None:
        for srv in self.servers:
            srv.close()
        sessions = list(self.sessions)
        for s in sessions:
            s.writer.close()
        # let each session see its end and return, so nothing is left to cancel
        tasks = [
            s.task for s in sessions if s.task is not None and s.task is not asyncio.current_task()
        ]
        if tasks:
            await asyncio.wait(tasks, timeout=5)


class QMPSession:
    def __init__(
        self, server: QMPServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        # an integer too long for Python's int() (4,300 digits) is read as a number, as
        # QEMU reads any integer that does not fit its int64 (a double)
        self.decoder = json.JSONDecoder(parse_int=_parse_int)
        self.task: asyncio.Task | None = None

    def send_nowait(self, msg: dict[str, Any]) -> None:
        if self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() > MAX_OUTPUT:
            # events are written without waiting; a client that never reads them
            # must not grow the process
            log.warning("QMP client dropped: %d bytes of output unread", MAX_OUTPUT)
            self.writer.transport.abort()
            return
        self.writer.write(json.dumps(msg).encode() + b"\r\n")

    async def send(self, msg: dict[str, Any]) -> None:
        self.send_nowait(msg)
        await self.writer.drain()

    async def run(self) -> None:
        major, minor, micro = 7, 2, 0
        await self.send(
            {
                "QMP": {
                    "version": {
                        "qemu": {"micro": micro, "minor": minor, "major": major},
                        "package": f"blockrep {__version__}",
                    },
                    "capabilities": [],
                }
            }
        )
        splitter = JSONSplitter()
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        answered = 0
        while True:
            chunk = await self.reader.read(65536)
            if not chunk:
                return
            splitter.feed(text.decode(chunk))
            if splitter.pending() > MAX_INPUT:
                return
            for value in splitter.values():
                if value is None:
                    await self.send(_error("JSON nesting depth limit exceeded"))
                    continue
                try:
                    obj = self.decoder.decode(value)
                except RecursionError:
                    # QEMU's parser limit (json-streamer.c MAX_NESTING), same words
                    await self.send(_error("JSON nesting depth limit exceeded"))
                    splitter.skip_line()
                    continue
                except json.JSONDecodeError as e:
                    await self.send(_error(f"JSON parse error, {e.msg}"))
                    # resynchronise at the next line, as QEMU's lexer resets on errors
                    splitter.skip_line()
                    continue
                await self.dispatch(obj)
                answered += 1
                if answered % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a long pipeline must not starve other clients

    async def dispatch(self, req: Any) -> None:
        if not isinstance(req, dict):
            await self.send(_error("QMP input must be a JSON object"))
            return
        rid = req.get("id")
        reply_extra = {"id": rid} if "id" in req else {}
        for key in req:
            if key not in ("execute", "exec-oob", "arguments", "id"):
                await self.send(
                    {**_error(f"QMP input member '{key}' is unexpected"), **reply_extra}
                )
                return
        cmd = req.get("execute")
        if cmd is None:
            await self.send({**_error("QMP input lacks member 'execute'"), **reply_extra})
            return
        if not isinstance(cmd, str):
            await self.send(
                {**_error("QMP input member 'execute' must be a string"), **reply_extra}
            )
            return
        args = req.get("arguments", {})
        if not isinstance(args, dict):
            await self.send(
                {**_error("QMP input member 'arguments' must be an object"), **reply_extra}
            )
            return
        if not self.negotiated:
            if cmd != "qmp_capabilities":
                await self.send(
                    {
                        **_error(
                            "Expecting capabilities negotiation with 'qmp_capabilities'",
                            "CommandNotFound",
                        ),
                        **reply_extra,
                    }
                )
                return
            enable = args.get("enable", [])
            if enable:
                await self.send(
                    {**_error(f"Capability '{enable[0]}' not available"), **reply_extra}
                )
                return
            self.negotiated = True
            await self.send({"return": {}, **reply_extra})
            return
        if cmd == "qmp_capabilities":
            await self.send(
                {
                    **_error(
                        "Capabilities negotiation is already complete, command ignored",
                        "CommandNotFound",
                    ),
                    **reply_extra,
                }
            )
            return
        handler = self.server.commands.get(cmd)
        if handler is None:
            await self.send(
                {
                    **_error(f"The command {cmd} has not been found", "CommandNotFound"),
                    **reply_extra,
                }
            )
            return
        try:
            result = await handler(args)
        except BlockrepError as e:
            # the one place where blockrep's errors become QMP errors
            await self.send({**_error(e.message, e.qmp_class), **reply_extra})
            return
        except Exception as e:  # a bug in one command must not end the session
            log.exception("command %s failed", cmd)
            await self.send({**_error(f"Internal error: {e}"), **reply_extra})
            return
        await self.send({"return": {} if result is None else result, **reply_extra})


def _parse_int(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _error(desc: str, cls: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


_STRING_SPECIAL = re.compile(r'["\\]')
_STRUCTURE = re.compile(r'[{}\[\]"]')
_NON_SPACE = re.compile(r"\S")
_SCALAR_END = re.compile(r'[\s{}\[\]",:]')


class JSONSplitter:
    """Cuts a stream of JSON texts into one text per top-level value (no I/O).

    Like QEMU's json-streamer, it counts brackets outside strings, so a value split
    over any number of reads is parsed once, whole, and each byte is scanned once.
    ``values`` yields each complete value's text, or None for a value nested past
    MAX_NESTING (the rest of its line is skipped); what is left waits for ``feed``.
    """

    def __init__(self, max_nesting: int = MAX_NESTING) -> None:
        self.max_nesting = max_nesting
        self.buf = ""
        self.pos = 0  # scanned up to here
        self.start = -1  # where the value being scanned begins; -1 between values
        self.depth = 0
        self.in_string = False
        self.in_scalar = False
        self.skipping = False  # dropping input up to the next newline

    def feed(self, text: str) -> None:
        self.buf += text

    def pending(self) -> int:
        """Characters held for a value not yet complete."""
        return len(self.buf) - (self.start if self.start >= 0 else self.pos)

    def skip_line(self) -> None:
        """Drop the input up to the next newline (after an error, as QEMU resyncs)."""
        self.start, self.depth = -1, 0
        self.in_string = self.in_scalar = False
        self.skipping = True

    def values(self) -> Iterator[str | None]:
        while True:
            complete, v = self._next()
            if not complete:
                break
            yield v
        keep = self.start if self.start >= 0 else self.pos
        self.buf = self.buf[keep:]
        self.pos -= keep
        if self.start >= 0:
            self.start = 0

    def _cut(self, end: int) -> tuple[bool, str]:
        text = self.buf[self.start : end]
        self.start, self.pos = -1, end
        return True, text

    def _next(self) -> tuple[bool, str | None]:
        """(True, the next value or None when too deep) or (False, None): more input."""
        buf, n = self.buf, len(self.buf)
        while self.pos < n:
            i = self.pos
            if self.skipping:
                nl = buf.find("\n", i)
                if nl < 0:
                    self.pos = n
                    break
                self.pos, self.skipping = nl + 1, False
            elif self.in_string:
                m = _STRING_SPECIAL.search(buf, i)
                if m is None:
                    self.pos = n
                    break
                j = m.start()
                if buf[j] == "\\":
                    if j + 1 >= n:
                        self.pos = j
                        break  # the escaped character has not come yet
                    self.pos = j + 2
                    continue
                self.in_string = False
                if self.depth == 0:
                    return self._cut(j + 1)
                self.pos = j + 1
            elif self.in_scalar:
                m = _SCALAR_END.search(buf, i)
                if m is None:
                    self.pos = n
                    break
                self.in_scalar = False
                return self._cut(max(m.start(), self.start + 1))
            elif self.start < 0:
                m = _NON_SPACE.search(buf, i)
                if m is None:
                    self.pos = n
                    break
                j = m.start()
                self.start, self.pos = j, j + 1
                if buf[j] in "{[":
                    self.depth = 1
                elif buf[j] == '"':
                    self.in_string = True
                else:
                    self.pos = j
                    self.in_scalar = True
            else:
                m = _STRUCTURE.search(buf, i)
                if m is None:
                    self.pos = n
                    break
                j = m.start()
                self.pos = j + 1
                c = buf[j]
                if c == '"':
                    self.in_string = True
                elif c in "{[":
                    self.depth += 1
                    if self.depth > self.max_nesting:
                        self.skip_line()
                        return True, None
                else:
                    self.depth -= 1
                    if self.depth == 0:
                        return self._cut(j + 1)
        return False, None
