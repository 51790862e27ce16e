"""Secure links (issue 12): nobody but the paired peer reads, writes or drives a pair.

A stranger on loopback (this test, without the pair's secret or certificates) tries
what reproduced each "why" on the old main: verbs on the control channel, the
replication link's exports (listed, or opened by the names the old link used), and
keeping a dead primary alive. Each attempt must fail, and the pair must end with
identical disks equal to the consumer's model.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import stat
import subprocess
import time

import pytest

from blockrep.block.graph import Graph
from blockrep.ha import auth
from blockrep.testing import MiB, blockrep_argv, free_port
from tests.harness.ha import HA
from tests.harness.models import random_writes
from tests.harness.tools import sha, sha_file

SIZE = 4 * MiB
FAST_S = ["--heartbeat-interval", "0.1"]
FAST_P = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "1.5", "--checkpoint-interval", "0"]


def _tls_dir(ha: HA) -> str:
    d = ha.path("tls")
    r = subprocess.run(blockrep_argv("tls-init", d), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return d


def _auth_args(ha: HA, method: str) -> list[str]:
    return ["--psk-file", ha.psk_file()] if method == "psk" else ["--tls-dir", _tls_dir(ha)]


async def _tcp_pair(ha: HA, method: str, s_extra=(), p_extra=(), shared: bool = False):
    port, lport = free_port(), free_port()
    sec = _auth_args(ha, method)
    mode = ["--shared"] if shared else []
    disk = ha.disk("p.raw") if shared else None  # shared: one disk, both nodes
    s = ha.secondary(
        listen=f"127.0.0.1:{port}",
        disk=disk,
        extra=[*FAST_S, *sec, *mode, "--link-port", str(lport), *s_extra],
    )
    p = ha.primary(f"127.0.0.1:{port}", extra=[*FAST_P, *sec, *mode, *p_extra])
    await s.wait_ready()
    await p.wait_ready()
    await p.wait_status(lambda x: x["peer"] == "connected", 30, "paired")
    return p, s, port, lport


async def _stop_and_compare(ha: HA, model: bytearray, *nodes) -> None:
    """Stop the nodes in order (orderly) and compare each disk with the model."""
    for g in ha.graphs:
        await g.close_all()
    ha.graphs.clear()
    for n in nodes:
        n.quit()
        assert await n.wait_exit(30) == 0, n.log_text()
    for n in nodes:
        assert sha_file(n.disk) == sha(bytes(model)), n.name


async def _read_all(reader: asyncio.StreamReader, timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
        except (TimeoutError, ConnectionError):
            break
        if not chunk:
            return out
        out += chunk
    raise AssertionError(f"the connection stayed open after {timeout} s: {out[:200]!r}")


async def _stranger_verbs(port: int, method: str) -> None:
    """Every verb a stranger sends is refused: the connection ends with no answer."""
    verbs = [
        {"id": 1, "op": "checkpoint", "gen": "00000000-0000-0000-0000-000000000000"},
        {"id": 2, "op": "start", "history": []},
        {"id": 3, "op": "heartbeat"},
    ]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    if method == "psk":
        greeting = json.loads(await asyncio.wait_for(r.readline(), 10))
        assert greeting["auth"] == "psk" and len(bytes.fromhex(greeting["nonce"])) == 32
    w.write(b"".join(json.dumps(v).encode() + b"\n" for v in verbs))
    await w.drain()
    rest = await _read_all(r, 20)
    assert b'"ok": true' not in rest and b'"ok":true' not in rest, rest
    w.close()
    if method == "psk":
        # a proper challenge-response, with the wrong secret
        r, w = await asyncio.open_connection("127.0.0.1", port)
        greeting = json.loads(await asyncio.wait_for(r.readline(), 10))
        nonce = os.urandom(32)
        mac = auth.client_mac(b"not the pair's secret!", bytes.fromhex(greeting["nonce"]), nonce)
        w.write(json.dumps({"nonce": nonce.hex(), "mac": mac.hex()}).encode() + b"\n")
        await w.drain()
        assert json.loads(await asyncio.wait_for(r.readline(), 10)) == {"auth": "refused"}
        assert await _read_all(r, 10) == b""
        w.close()


async def _stranger_link(lport: int) -> None:
    """The link lists nothing and opens under no name a stranger can know."""
    listed = subprocess.run(
        ["nbdinfo", "--list", f"nbd://127.0.0.1:{lport}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    for name in ("parent0", "hidden_disk0", "colo-disk0", "active-disk0"):
        assert name not in listed.stdout, listed.stdout
    for name in ("parent0", "hidden_disk0", ""):
        g = Graph()
        server = {"type": "inet", "host": "127.0.0.1", "port": str(lport)}
        with pytest.raises(Exception):  # noqa: B017 -- any refusal will do, none may open
            await asyncio.wait_for(g.add({"driver": "nbd", "server": server, "export": name}), 20)
        await g.close_all()


@pytest.mark.parametrize("method,shared", [("psk", False), ("tls", False), ("psk", True)])
async def test_stranger_cannot_drive_read_or_write_a_pair(ha, method, shared):
    base = ha.make_disks(SIZE, 21)
    p, s, port, lport = await _tcp_pair(ha, method, shared=shared)
    pc = await ha.client(p)
    model = bytearray(base)
    await random_writes(pc, random.Random(21), SIZE, 24, model=model)
    await p.qmp_async("replication-checkpoint")
    epoch = (await s.astatus())["epoch"]

    await _stranger_verbs(port, method)
    await _stranger_link(lport)

    st = await s.astatus()
    assert st["epoch"] == epoch and st["peer"] == "connected", st
    assert (await p.astatus())["security"] == method
    await random_writes(pc, random.Random(22), SIZE, 24, model=model)
    await p.qmp_async("replication-checkpoint")
    assert (await s.astatus())["epoch"] == epoch + 1
    await _stop_and_compare(ha, model, s, p)


async def test_a_stranger_cannot_keep_a_dead_primary_alive(ha):
    base = ha.make_disks(SIZE, 23)
    opts = ["--auto-failover", "--fence-command", "true", "--failover-timeout", "1.0"]
    p, s, port, _ = await _tcp_pair(ha, "psk", s_extra=opts)
    pc = await ha.client(p)
    model = bytearray(base)
    await random_writes(pc, random.Random(23), SIZE, 16, model=model)
    await p.qmp_async("replication-checkpoint")
    os.kill(p.pid, signal.SIGKILL)

    async def chatter() -> None:  # heartbeats, empty lines, garbage: as fast as it can
        while True:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b'{"id": 1, "op": "heartbeat"}\n\n{}\nxx\n' * 50)
                await w.drain()
                await asyncio.sleep(0.1)
                w.close()
            except OSError:
                await asyncio.sleep(0.05)

    t = asyncio.create_task(chatter())
    try:
        st = await s.wait_status(lambda x: x["peer"] == "failed-over", 30, "S failed over")
    finally:
        t.cancel()
    assert st["role"] == "primary" or st["peer"] == "failed-over"
    await _stop_and_compare(ha, model, s)  # the last checkpoint, nothing else


async def test_link_binds_where_the_peer_arrived_on_a_fixed_port(ha):
    base = ha.make_disks(SIZE, 25)
    port, lport = free_port(), free_port()
    sec = ["--psk-file", ha.psk_file()]
    s = ha.secondary(listen=f"0.0.0.0:{port}", extra=[*FAST_S, *sec, "--link-port", str(lport)])
    p = ha.primary(f"127.0.0.1:{port}", extra=[*FAST_P, *sec])
    await s.wait_ready()
    await p.wait_ready()
    await p.wait_status(lambda x: x["peer"] == "connected", 30, "paired")
    assert (await s.astatus())["link"] == f"127.0.0.1:{lport}"
    # bound to 127.0.0.1 only, never the wildcard the control channel listens on
    other = socket.socket()
    with pytest.raises(ConnectionRefusedError):
        other.connect(("127.0.0.2", lport))
    other.close()
    pc = await ha.client(p)
    model = bytearray(base)
    await random_writes(pc, random.Random(25), SIZE, 16, model=model)
    await p.qmp_async("replication-checkpoint")
    await _stop_and_compare(ha, model, s, p)


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(blockrep_argv(*argv), capture_output=True, text=True, timeout=60)


def test_a_pair_on_tcp_without_authentication_is_refused(ha):
    ha.make_disks(SIZE, 27)
    port = free_port()
    common = ["--disk", ha.disk("s.raw"), "--export", f"unix:{ha.path('x.nbd')}"]
    r = _run("secondary", *common, "--listen", f"127.0.0.1:{port}")
    assert r.returncode == 1 and "--psk-file" in r.stderr and "--tls-dir" in r.stderr, r.stderr
    assert "--insecure" in r.stderr
    r = _run("primary", *common, "--secondary", f"127.0.0.1:{port}")
    assert r.returncode == 1 and "--psk-file" in r.stderr, r.stderr
    # a secret others may read is refused, and so is one too short to be a secret
    loose = ha.path("loose.psk")
    with open(loose, "w") as f:
        f.write("x" * 40)
    os.chmod(loose, 0o644)
    r = _run("secondary", *common, "--listen", f"127.0.0.1:{port}", "--psk-file", loose)
    assert r.returncode == 1 and "readable by others" in r.stderr, r.stderr
    os.chmod(loose, 0o600)
    with open(loose, "w") as f:
        f.write("short")
    r = _run("secondary", *common, "--listen", f"127.0.0.1:{port}", "--psk-file", loose)
    assert r.returncode == 1 and "at least 16 bytes" in r.stderr, r.stderr
    # a resource file on TCP without [security]
    res = ha.path("tcp.toml")
    with open(res, "w") as f:
        f.write(
            '[resource]\nname = "r0"\nmode = "separate"\n'
            f'[nodes.a]\naddress = "127.0.0.1:{port}"\nqmp = "unix:{ha.path("a.qmp")}"\n'
            f'disks = ["{ha.disk("p.raw")}"]\nexports = ["unix:{ha.path("a.nbd")}"]\n'
            f'[nodes.b]\naddress = "127.0.0.1:{port + 2}"\nqmp = "unix:{ha.path("b.qmp")}"\n'
            f'disks = ["{ha.disk("s.raw")}"]\nexports = ["unix:{ha.path("b.nbd")}"]\n'
        )
    r = _run("up", res, "--node", "a")
    assert r.returncode == 1 and "psk-file" in r.stderr and "[security]" in r.stderr, r.stderr
    # nothing was created or changed by the refusals
    assert not os.path.exists(ha.path("x.nbd"))
    assert not os.path.exists(ha.path("a.qmp"))


async def test_unix_sockets_of_a_pair_are_private(ha):
    base = ha.make_disks(SIZE, 29)
    s = ha.secondary(extra=FAST_S)
    p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=FAST_P)
    await s.wait_ready()
    await p.wait_ready()
    await p.wait_status(lambda x: x["peer"] == "connected", 30, "paired")
    for path in (ha.path("s.ctl"), ha.path("s.ctl.nbd"), s.qmp, p.qmp):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o077 == 0, f"{path} has mode {mode:04o}"
    pc = await ha.client(p)
    model = bytearray(base)
    await random_writes(pc, random.Random(29), SIZE, 8, model=model)
    await p.qmp_async("replication-checkpoint")
    await _stop_and_compare(ha, model, s, p)


async def test_a_resource_on_tcp_pairs_with_its_security_and_link_ports(ha):
    """``blockrep up`` on TCP: [security] psk-file, each node's link-port; a stranger's
    wrong secret is refused while the pair protects; the disks end equal."""
    base = ha.make_disks(SIZE, 35, names=("a.raw", "b.raw"))
    ports = {n: (free_port(), free_port()) for n in ("a", "b")}
    lines = ['[resource]\nname = "r0"\nmode = "separate"\ncheckpoint-interval = 0.5']
    lines.append(f'[security]\npsk-file = "{ha.psk_file()}"')
    for n, (port, lport) in ports.items():
        lines.append(
            f'[nodes.{n}]\naddress = "127.0.0.1:{port}"\nlink-port = {lport}\n'
            f'qmp = "unix:{ha.path(n + ".qmp")}"\ndisks = ["{ha.disk(n + ".raw")}"]\n'
            f'exports = ["unix:{ha.path(n + ".nbd")}"]'
        )
    res = ha.path("tcp.toml")
    with open(res, "w") as f:
        f.write("\n".join(lines) + "\n")
    a, b = ha.up(res, "a"), ha.up(res, "b")
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    r = _run("promote", res, "--node", "a")
    assert r.returncode == 0, r.stderr
    st = await a.wait_status(lambda x: x["replication"] == "Protected", 30, "Protected")
    assert st["security"] == "psk"
    sb = await b.wait_status(lambda x: x["role"] == "secondary", 10, "b secondary")
    assert sb["link"] == f"127.0.0.1:{ports['b'][1]}", sb
    await _stranger_verbs(ports["b"][0], "psk")
    pc = await ha.client(a)
    model = bytearray(base)
    await random_writes(pc, random.Random(35), SIZE, 24, model=model)
    await a.qmp_async("replication-checkpoint")
    for g in ha.graphs:
        await g.close_all()
    ha.graphs.clear()
    for n in (a, b):  # the primary first: a clean handover
        assert _run("down", "--qmp", f"unix:{n.qmp}").returncode == 0
        assert await n.wait_exit(30) == 0, n.log_text()
    assert sha_file(a.disk) == sha_file(b.disk) == sha(bytes(model))
