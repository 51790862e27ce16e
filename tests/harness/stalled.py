"""An NBD client that stops reading its replies (issue 12, Why 3): it negotiates,
asks for many 1 MiB reads and reads nothing back."""

from __future__ import annotations

import socket
import struct
import time

from blockrep.nbd import proto as p

MiB = 1 << 20
STEP = 10.0


def stalled_client(path: str, reads: int, size: int, name: bytes = b"disk") -> socket.socket:
    """Client A: negotiate the export, send ``reads`` 1 MiB reads, read nothing back."""
    s = socket.socket(socket.AF_UNIX)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(STEP)
    s.connect(path)
    greeting = b""
    while len(greeting) < 18:
        greeting += s.recv(18 - len(greeting))
    assert struct.unpack(">QQ", greeting[:16]) == (p.NBDMAGIC, p.IHAVEOPT)
    s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
    s.sendall(p.OPTION.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, len(name)) + name)
    reply = b""
    while len(reply) < 10:  # size + transmission flags (no zeroes)
        reply += s.recv(10 - len(reply))
    assert struct.unpack(">Q", reply[:8]) == (size,)
    s.setblocking(False)
    reqs = b"".join(
        p.pack_request(p.CMD_READ, h, (h % 4) * MiB, MiB, 0) for h in range(1, reads + 1)
    )
    sent = 0
    deadline = time.monotonic() + STEP
    while sent < len(reqs) and time.monotonic() < deadline:
        try:
            sent += s.send(reqs[sent:])
        except BlockingIOError:
            break  # the server stopped reading A: enough is queued
    return s
