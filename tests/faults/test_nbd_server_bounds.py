"""Hostile clients against the NBD server's bounds (issue 12, Why 4 and Deliver 4).

* plaintext a client (or a man in the middle) sends after NBD_OPT_STARTTLS, before the
  TLS handshake, is never read as if it had come over TLS: the connection is dropped;
* a ``blockrep daemon`` limited to 256 descriptors, flooded with 300 idle NBD
  connections, keeps a reserve: QMP answers, a new node (a file) opens, its log stays
  small, and a legitimate NBD client reads and writes once the idle ones are gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import ssl
import struct
import sys
import time

from blockrep.address import SocketAddress
from blockrep.block import Graph
from blockrep.export import Export
from blockrep.nbd import proto as p
from blockrep.nbd.client import NBDConnection
from blockrep.nbd.server import NBDServer
from blockrep.testing import Process
from blockrep.tls import X509Credentials
from tests.harness.tls import make_pki

MiB = 1 << 20
SIZE = 4 * MiB
STEP = 10.0  # bound on each wait: a hang fails the test, no timing passes it


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return out


def test_plaintext_sent_after_starttls_is_not_read_as_tls(tmp_path):
    creds = make_pki(str(tmp_path))
    disk = str(tmp_path / "disk.raw")
    with open(disk, "wb") as f:
        f.write(bytes(SIZE))
    client_ctx = X509Credentials(creds["client"]).client_context(require_cert=True)

    def inject(path: str) -> bytes:
        """STARTTLS and, in the same packet, a plaintext NBD_OPT_LIST; then TLS. What
        the server sends under TLS without being asked (b"" if it drops us)."""
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(STEP)
        s.connect(path)
        recv_exact(s, 18)
        s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        s.sendall(
            p.OPTION.pack(p.IHAVEOPT, p.OPT_STARTTLS, 0) + p.OPTION.pack(p.IHAVEOPT, p.OPT_LIST, 0)
        )
        magic, opt, rep, length = p.OPTION_REPLY.unpack(recv_exact(s, p.OPTION_REPLY.size))
        assert (magic, opt, rep, length) == (p.OPT_REPLY_MAGIC, p.OPT_STARTTLS, p.REP_ACK, 0)
        try:
            t = client_ctx.wrap_socket(s)
            return t.recv(4096)
        except (ssl.SSLError, OSError):
            return b""
        finally:
            s.close()

    async def main() -> tuple[bytes, list[tuple[int, int]]]:
        g = Graph()
        node = await g.add({"driver": "raw", "file": {"driver": "file", "filename": disk}})
        exp = Export("disk", node, writable=True)
        srv = NBDServer({"disk": exp}, tls=X509Credentials(creds["server"]).server_context())
        path = str(tmp_path / "nbd.sock")
        await srv.listen_unix(path)
        try:
            unasked = await asyncio.wait_for(asyncio.to_thread(inject, path), 3 * STEP)
            # the server still serves a client that does it right, over TLS
            c = NBDConnection()
            await c.connect(SocketAddress.from_str(f"unix:{path}"), "disk", tls=client_ctx)
            await c.request(p.CMD_WRITE, MiB, 4096, payload=b"\x5a" * 4096)
            got = await c.request(p.CMD_READ, MiB, 4096)
            await c.close()
            assert bytes(got.data) == b"\x5a" * 4096
            return unasked, []
        finally:
            await srv.close()
            exp.release()

    unasked, _ = asyncio.run(asyncio.wait_for(main(), 120))
    assert unasked == b"", f"the server answered plaintext as if it came over TLS: {unasked!r}"
    model = bytearray(SIZE)
    model[MiB : MiB + 4096] = b"\x5a" * 4096
    with open(disk, "rb") as f:
        assert f.read() == bytes(model)


# -- descriptors -------------------------------------------------------------------------------

NOFILE = 256
IDLE = 300

# blockrep daemon at a 256-descriptor limit; failed accepts are reported through the
# filter the daemon's entry points install (limits.install_accept_error_filter)
BOOT = f"""
import asyncio, resource, runpy, sys
from blockrep import limits
resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE}))
class Policy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self):
        loop = super().new_event_loop()
        limits.install_accept_error_filter(loop)
        return loop
asyncio.set_event_loop_policy(Policy())
sys.argv = ["blockrep", *sys.argv[1:]]
runpy.run_module("blockrep.cli", run_name="__main__")
"""


def qmp(path: str, *cmds: tuple[str, dict]) -> list[dict]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(STEP)
    s.connect(path)
    f = s.makefile("rb")
    assert "QMP" in json.loads(f.readline())
    out = []
    for name, args in [("qmp_capabilities", {}), *cmds]:
        s.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        while True:
            msg = json.loads(f.readline())
            if "event" not in msg:
                out.append(msg)
                break
    s.close()
    return out[1:]


def test_idle_connection_flood_leaves_the_descriptor_reserve(tmp_path):
    disk, extra = str(tmp_path / "disk.raw"), str(tmp_path / "extra.raw")
    initial = random.Random(5).randbytes(SIZE)
    with open(disk, "wb") as f:
        f.write(initial)
    with open(extra, "wb") as f:
        f.write(bytes(MiB))
    nbd_sock, qmp_sock = str(tmp_path / "nbd.sock"), str(tmp_path / "qmp.sock")
    log_path = str(tmp_path / "d.log")
    d = Process(
        [
            sys.executable,
            "-c",
            BOOT,
            "daemon",
            "--blockdev",
            f"driver=file,node-name=f0,filename={disk}",
            "--blockdev",
            "driver=raw,node-name=disk,file=f0",
            "--nbd-server",
            f"addr.type=unix,addr.path={nbd_sock}",
            "--export",
            "type=nbd,id=e0,node-name=disk,writable=on",
            "-qmp",
            f"unix:{qmp_sock},server=on,wait=off",
        ],
        log_path,
        sock=qmp_sock,
    )
    idle: list[socket.socket] = []
    try:
        d.wait_ready()
        log_before = os.path.getsize(log_path)
        for _ in range(IDLE):
            s = socket.socket(socket.AF_UNIX)
            idle.append(s)
            deadline = time.monotonic() + STEP
            while True:
                try:
                    s.connect(nbd_sock)
                    break
                except BlockingIOError:  # the listen backlog is full: try again
                    assert time.monotonic() < deadline, "the daemon stopped accepting"
                    time.sleep(0.01)
        time.sleep(1.0)  # let the daemon accept what it will
        # the operator still gets in, and the daemon can still open a file
        r = qmp(
            qmp_sock,
            ("query-version", {}),
            (
                "blockdev-add",
                {"driver": "file", "node-name": "extra", "filename": extra},
            ),
            ("query-named-block-nodes", {}),
        )
        assert "return" in r[0], r
        assert r[1] == {"return": {}}, r
        assert "extra" in {n["node-name"] for n in r[2]["return"]}
        for s in idle:
            s.close()
        idle.clear()

        # a legitimate client once the idle ones are gone; its bytes, checked against a model
        async def client() -> bytes:
            c = NBDConnection()
            await c.connect(SocketAddress.from_str(f"unix:{nbd_sock}"), "disk")
            await c.request(p.CMD_WRITE, 2 * MiB, 65536, payload=b"\xa5" * 65536)
            await c.request(p.CMD_FLUSH, 0, 0)
            got = await c.request(p.CMD_READ, 0, SIZE)
            await c.close()
            return bytes(got.data)

        got = asyncio.run(asyncio.wait_for(client(), 3 * STEP))
        model = bytearray(initial)
        model[2 * MiB : 2 * MiB + 65536] = b"\xa5" * 65536
        assert got == bytes(model)
        grown = os.path.getsize(log_path) - log_before
        assert grown < 4096, d.output()[-4000:]
        assert "Traceback" not in d.output()
    finally:
        for s in idle:
            s.close()
        d.stop()
    with open(disk, "rb") as f:
        assert f.read() == bytes(model)
