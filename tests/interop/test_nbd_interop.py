"""NBD interop both ways: libnbd / QEMU tools against blockrep's NBD server, and blockrep's
``nbd`` block driver against qemu-nbd and nbdkit; TLS with x509 certificates made here.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from blockrep.block import Graph
from blockrep.errors import BlockError
from blockrep.objects import TLSCredsX509
from blockrep.testing import free_port
from tests.harness.processes import daemon
from tests.harness.tls import CLIENT_DN, CLIENT_DN_RFC4514, make_pki
from tests.harness.tools import sha_file, tool

pytestmark = pytest.mark.interop

MiB = 1 << 20
GiB = 1 << 30


# -- helpers -------------------------------------------------------------------------


def make_layout_file(path: str, size: int, data_mib: list[int], seed: int = 1) -> bytes:
    """A sparse raw file with random data in the given MiB slots; returns its bytes."""
    import random

    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in data_mib:
            f.seek(i * MiB)
            f.write(rnd.randbytes(MiB))
    with open(path, "rb") as f:
        return f.read()


def daemon_args(
    disk: str,
    *,
    port: int | None = None,
    unix: str | None = None,
    tls: str | None = None,
    authz: str | None = None,
    extra: tuple[str, ...] = (),
) -> list[str]:
    if unix:
        addr = f"addr.type=unix,addr.path={unix}"
    else:
        addr = f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}"
    args = [
        "--blockdev",
        f"driver=file,node-name=f0,filename={disk}",
        "--blockdev",
        "driver=raw,node-name=disk,file=f0",
    ]
    if tls:
        args += ["-object", f"tls-creds-x509,id=tls0,dir={tls},endpoint=server,verify-peer=on"]
        addr += ",tls-creds=tls0"
    if authz:
        args += ["-object", "authz-simple,id=auth0,identity=" + authz.replace(",", ",,")]
        addr += ",tls-authz=auth0"
    args += [
        "--nbd-server",
        addr,
        "--export",
        "type=nbd,id=e0,node-name=disk,name=disk,writable=on",
    ]
    return args + list(extra)


def wait_listening(addr, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until a TCP port (host, port) or unix socket path accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        fam = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
        s = socket.socket(fam)
        try:
            s.settimeout(1)
            s.connect(addr)
            return
        except OSError:
            time.sleep(0.05)
        finally:
            s.close()
    raise TimeoutError(f"nothing listening on {addr}")


@contextmanager
def server_proc(args: list[str], addr, tmp_path, name: str):
    """A reference NBD server (qemu-nbd / nbdkit) in the foreground, stopped by pid."""
    log = open(tmp_path / f"{name}.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_listening(addr, proc=proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log.close()


def qemu_nbd_args(
    path: str, sock: str | None = None, port: int | None = None, export: str = "exp"
) -> list[str]:
    args = ["qemu-nbd", "-f", "raw", "-x", export, "-t", "--cache=writeback"]
    if sock:
        args += ["-k", sock]
    else:
        args += ["-b", "127.0.0.1", "-p", str(port)]
    return [*args, path]


def nbdkit_args(
    *plugin: str, sock: str | None = None, port: int | None = None, filters=()
) -> list[str]:
    args = ["nbdkit", "-f", "--exit-with-parent"]
    args += ["-U", sock] if sock else ["-i", "127.0.0.1", "-p", str(port)]
    for f in filters:
        args.append(f"--filter={f}")
    return [*args, *plugin]


def nbd_uri(port: int, export: str = "disk") -> str:
    return f"nbd://127.0.0.1:{port}/{export}"


async def open_nbd(opts: dict, objects: dict | None = None):
    g = Graph()
    for k, v in (objects or {}).items():
        g.objects[k] = v
    n = await g.add({"driver": "nbd", **opts})
    return g, n


# -- 1. nbdinfo ------------------------------------------------------------------------


def test_nbdinfo_json_fields(tmp_path):
    disk = str(tmp_path / "disk.raw")
    make_layout_file(disk, 64 * MiB, [0, 5])
    port = free_port()
    extra = ("--export", "type=nbd,id=e1,node-name=disk,name=ro,description=read-only view")
    with daemon(tmp_path, *daemon_args(disk, port=port, extra=extra)):
        rw = json.loads(tool("nbdinfo", "--json", nbd_uri(port, "disk")).stdout)
        ro = json.loads(tool("nbdinfo", "--json", nbd_uri(port, "ro")).stdout)
        lst = json.loads(tool("nbdinfo", "--list", "--json", nbd_uri(port, "")).stdout)
        human = tool("nbdinfo", nbd_uri(port, "disk")).stdout
    for info in (rw, ro):
        assert info["protocol"] == "newstyle-fixed"
        assert info["TLS"] is False
        assert info["structured"] is True
        (e,) = info["exports"]
        assert e["export-size"] == 64 * MiB
        assert "base:allocation" in e["contexts"]
        mn, pref, mx = e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"]
        for v in (mn, pref):
            assert v & (v - 1) == 0, e  # powers of two
        assert 1 <= mn <= pref <= mx and mn <= 65536 and 512 <= pref <= 32 * MiB and mx >= MiB
        assert e["can_flush"] is True
        assert e["is_rotational"] is False
    e = rw["exports"][0]
    assert e["export-name"] == "disk"
    assert e["is_read_only"] is False
    for k in ("can_flush", "can_fua", "can_trim", "can_zero"):
        assert e[k] is True, k
    e = ro["exports"][0]
    assert e["export-name"] == "ro"
    assert e["is_read_only"] is True
    assert e["can_trim"] is False and e["can_zero"] is False
    names = {x["export-name"]: x for x in lst["exports"]}
    assert set(names) == {"disk", "ro"}
    assert names["ro"].get("description") == "read-only view"
    assert all(x["export-size"] == 64 * MiB for x in names.values())
    assert "export-size: 67108864" in human


# -- 2. nbdcopy round trip of 1 GiB ----------------------------------------------------------


def test_nbdcopy_1gib_roundtrip(tmp_path):
    src, disk, out = (str(tmp_path / n) for n in ("src.raw", "disk.raw", "out.raw"))
    # half data (distinct random MiB slots), half holes: every byte of the data is checked
    blk = os.urandom(MiB)
    with open(src, "wb") as f:
        f.truncate(GiB)
        for i in range(0, 1024, 2):
            f.seek(i * MiB)
            f.write(blk[:-8] + i.to_bytes(8, "little"))
    with open(disk, "wb") as f:
        f.truncate(GiB)
    sock = str(tmp_path / "nbd.sock")
    uri = f"nbd+unix:///disk?socket={sock}"
    with daemon(tmp_path, *daemon_args(disk, unix=sock)) as d:
        tool("nbdcopy", src, uri, timeout=120)
        tool("nbdcopy", uri, out, timeout=120)
        # and over TCP? the same server code; unix keeps the run short
        assert d.proc.poll() is None
    with ThreadPoolExecutor(3) as ex:
        hs = list(ex.map(sha_file, (src, disk, out)))
    assert hs[0] == hs[1] == hs[2]


# -- 3. qemu-img and qemu-io ------------------------------------------------------------------


def _map_key(entries):
    return [(e["start"], e["length"], e["data"], e["zero"]) for e in entries]


def test_qemu_img_compare_convert_map(tmp_path):
    disk = str(tmp_path / "disk.raw")
    make_layout_file(disk, 64 * MiB, [0, 1, 7, 20, 21, 22, 63])
    port = free_port()
    uri = nbd_uri(port)
    with daemon(tmp_path, *daemon_args(disk, port=port)):
        r = tool("qemu-img", "compare", "-f", "raw", "-F", "raw", disk, uri)
        assert "Images are identical" in r.stdout
        nmap = json.loads(tool("qemu-img", "map", "--output", "json", "-f", "raw", uri).stdout)
        fmap = json.loads(tool("qemu-img", "map", "--output", "json", "-f", "raw", disk).stdout)
        assert _map_key(nmap) == _map_key(fmap)
        assert any(not e["data"] for e in nmap) and any(e["data"] for e in nmap)
        # export -> file
        out = str(tmp_path / "out.raw")
        tool("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out)
        assert sha_file(out) == sha_file(disk)
        out2 = str(tmp_path / "out.qcow2")
        tool("qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, out2)
        tool("qemu-img", "compare", "-f", "qcow2", "-F", "raw", out2, uri)
        # file -> export (no create on an NBD target)
        src2 = str(tmp_path / "src2.raw")
        want = make_layout_file(src2, 64 * MiB, [3, 4, 30, 62], seed=7)
        tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src2, uri)
        r = tool("qemu-img", "compare", "-f", "raw", "-F", "raw", src2, uri, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        # a differing byte is found
        with open(src2, "r+b") as f:
            f.seek(30 * MiB + 12345)
            f.write(b"\xff")
        r = tool("qemu-img", "compare", "-f", "raw", "-F", "raw", src2, uri, check=False)
        # qemu-img reports the 512-byte sector holding the first difference
        sector = (30 * MiB + 12345) // 512 * 512
        assert r.returncode == 1 and f"Content mismatch at offset {sector}!" in r.stdout
    with open(disk, "rb") as f:
        assert f.read() == want


def test_qemu_io_patterns_over_nbd(tmp_path):
    disk = str(tmp_path / "disk.raw")
    make_layout_file(disk, 16 * MiB, [])
    port = free_port()
    uri = nbd_uri(port)
    extra = ("--export", "type=nbd,id=e1,node-name=disk,name=ro")
    cmds = [
        "write -P 0xab 1M 64k",
        "read -P 0xab 1M 64k",
        "write -P 0x11 0 4k",
        "write -P 0x22 4095 2",  # unaligned
        "read -P 0x11 0 4095",
        "read -P 0x22 4095 2",
        "write -z 1M 4k",
        "read -P 0 1M 4k",
        "read -P 0xab 1028k 60k",
        "aio_write -P 0x33 8M 1M",
        "aio_write -P 0x44 9M 1M",
        "aio_flush",
        "read -P 0x33 8M 1M",
        "read -P 0x44 9M 1M",
        "write -f -P 0x55 12M 64k",  # FUA
        "discard 14M 1M",
        "flush",
    ]
    with daemon(tmp_path, *daemon_args(disk, port=port, extra=extra)):
        args = ["qemu-io", "-f", "raw"]
        for c in cmds:
            args += ["-c", c]
        r = tool(*args, uri)
        assert "Pattern verification failed" not in r.stdout + r.stderr
        assert "failed" not in r.stderr.lower(), r.stderr
        # a wrong pattern is detected (proves read -P really compares)
        r = tool("qemu-io", "-f", "raw", "-c", "read -P 0x99 1M 64k", uri, check=False)
        assert "Pattern verification failed" in r.stdout + r.stderr
        # read-only export: qemu-io -r reads, a write is refused
        r = tool("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x33 8M 1M", nbd_uri(port, "ro"))
        assert "Pattern verification failed" not in r.stdout + r.stderr
        r = tool("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", nbd_uri(port, "ro"), check=False)
        assert r.returncode != 0 or "failed" in (r.stdout + r.stderr).lower()
    with open(disk, "rb") as f:
        data = f.read()
    assert data[0:4095] == b"\x11" * 4095
    assert data[4095:4097] == b"\x22\x22"
    assert data[4097 : 4096 * 2] == bytes(4095)
    assert data[MiB : MiB + 4096] == bytes(4096)
    assert data[MiB + 4096 : MiB + 65536] == b"\xab" * (65536 - 4096)
    assert data[8 * MiB : 9 * MiB] == b"\x33" * MiB
    assert data[9 * MiB : 10 * MiB] == b"\x44" * MiB
    assert data[12 * MiB : 12 * MiB + 65536] == b"\x55" * 65536
    assert data[14 * MiB : 15 * MiB] == bytes(MiB)


# -- 4. blockrep's nbd node against qemu-nbd and nbdkit ------------------------------------


async def _exercise_node(n, size: int) -> bytes:
    """Writes, zeroes, discards through the node, reads them back; returns the expected image."""
    img = bytearray(await n.read(0, size))
    assert n.length == size
    pat = os.urandom(3 * MiB + 123)
    await n.write(MiB - 7, pat)
    img[MiB - 7 : MiB - 7 + len(pat)] = pat
    # many requests in flight at once
    writes = [(i * 65536 + 5 * MiB, bytes([i + 1]) * 65536) for i in range(32)]
    await asyncio.gather(*(n.write(o, d) for o, d in writes))
    for o, d in writes:
        img[o : o + len(d)] = d
    await n.write(6 * MiB, b"\x5a" * 4096, fua=True)
    img[6 * MiB : 6 * MiB + 4096] = b"\x5a" * 4096
    await n.write_zeroes(2 * MiB, 65536)
    img[2 * MiB : 2 * MiB + 65536] = bytes(65536)
    await n.flush()
    reads = await asyncio.gather(*(n.read(o, 65536) for o in range(0, 8 * MiB, 65536)))
    assert b"".join(reads) == bytes(img[: 8 * MiB])
    assert await n.read(0, size) == bytes(img)
    ext = await n.block_status(0, size)
    assert ext and ext[0].start == 0 and sum(e.length for e in ext) == size
    return bytes(img)


async def test_node_against_qemu_nbd(tmp_path):
    path = str(tmp_path / "q.raw")
    make_layout_file(path, 16 * MiB, [0, 9])
    sock = str(tmp_path / "q.sock")
    with server_proc(qemu_nbd_args(path, sock=sock), sock, tmp_path, "qemu-nbd"):
        g, n = await open_nbd({"server": {"type": "unix", "path": sock}, "export": "exp"})
        try:
            img = await _exercise_node(n, 16 * MiB)
            # base:allocation from qemu-nbd: a hole in the middle of the file
            ext = await n.block_status(12 * MiB, MiB)
            assert all(not e.data for e in ext), ext
            ext = await n.block_status(9 * MiB, MiB)
            assert all(e.data for e in ext), ext
        finally:
            await g.close_all()
        # qemu-io via the same server sees what the node wrote
        r = tool(
            "qemu-io", "-f", "raw", "-c", "read -P 0x5a 6M 4k", f"nbd+unix:///exp?socket={sock}"
        )
        assert "Pattern verification failed" not in r.stdout
    with open(path, "rb") as f:
        assert f.read() == img
    # over TCP with an nbd:// filename
    port = free_port()
    with server_proc(qemu_nbd_args(path, port=port), ("127.0.0.1", port), tmp_path, "qemu-nbd-tcp"):
        g, n = await open_nbd({"filename": f"nbd://127.0.0.1:{port}/exp"})
        try:
            assert await n.read(0, 16 * MiB) == img
            await n.write(15 * MiB, b"tcp!" * 1024)
        finally:
            await g.close_all()
    with open(path, "rb") as f:
        f.seek(15 * MiB)
        assert f.read(4096) == b"tcp!" * 1024


async def test_node_against_nbdkit_memory(tmp_path):
    sock = str(tmp_path / "k.sock")
    with server_proc(nbdkit_args("memory", "size=16M", sock=sock), sock, tmp_path, "nbdkit"):
        g, n = await open_nbd({"server": {"type": "unix", "path": sock}, "export": ""})
        try:
            img = await _exercise_node(n, 16 * MiB)
            await n.discard(10 * MiB, MiB)  # memory plugin: trimmed range reads as zeroes
            assert await n.read(10 * MiB, MiB) == bytes(MiB)
            img = img[: 10 * MiB] + bytes(MiB) + img[11 * MiB :]
        finally:
            await g.close_all()
        # verify through a second, independent client (nbdcopy from libnbd)
        out = str(tmp_path / "k.out")
        tool("nbdcopy", f"nbd+unix:///?socket={sock}", out)
        with open(out, "rb") as f:
            assert f.read() == img
    port = free_port()
    with server_proc(
        nbdkit_args("memory", "size=1M", port=port), ("127.0.0.1", port), tmp_path, "nbdkit-tcp"
    ):
        g, n = await open_nbd(
            {
                "server": {"type": "inet", "host": "127.0.0.1", "port": str(port)},
                "export": "anything",
            }
        )
        try:
            await n.write(4096, b"\x77" * 8192)
            assert await n.read(0, 16384) == bytes(4096) + b"\x77" * 8192 + bytes(4096)
        finally:
            await g.close_all()


async def test_node_clear_errors(tmp_path):
    port = free_port()
    with pytest.raises(BlockError) as e:
        await open_nbd(
            {"server": {"type": "inet", "host": "127.0.0.1", "port": str(port)}, "export": "x"}
        )
    assert e.value.errno == errno.ECONNREFUSED
    assert f"Failed to connect to '127.0.0.1:{port}'" in e.value.message
    missing = str(tmp_path / "nope.sock")
    with pytest.raises(BlockError) as e:
        await open_nbd({"server": {"type": "unix", "path": missing}, "export": "x"})
    assert e.value.errno == errno.ENOENT and missing in e.value.message
    # a missing export, on qemu-nbd and on blockrep
    path = str(tmp_path / "q.raw")
    make_layout_file(path, MiB, [])
    sock = str(tmp_path / "q.sock")
    with server_proc(qemu_nbd_args(path, sock=sock), sock, tmp_path, "qemu-nbd"):
        with pytest.raises(BlockError) as e:
            await open_nbd({"server": {"type": "unix", "path": sock}, "export": "nosuch"})
        assert e.value.errno == errno.ENOENT
        assert "Requested export not available" in e.value.message
    bsock = str(tmp_path / "b.sock")
    with daemon(tmp_path, *daemon_args(path, unix=bsock)):
        with pytest.raises(BlockError) as e:
            await open_nbd({"server": {"type": "unix", "path": bsock}, "export": "nosuch"})
        assert e.value.errno == errno.ENOENT
        assert "Requested export not available" in e.value.message and "nosuch" in e.value.message
        g, n = await open_nbd({"filename": f"nbd+unix:///disk?socket={bsock}"})
        assert n.length == MiB
        await g.close_all()


async def test_node_connection_break_is_eio(tmp_path):
    sock = str(tmp_path / "k.sock")
    args = nbdkit_args("memory", "size=4M", "rdelay=3", sock=sock, filters=("delay",))
    with server_proc(args, sock, tmp_path, "nbdkit") as proc:
        g, n = await open_nbd({"server": {"type": "unix", "path": sock}, "export": ""})
        try:
            await n.write(0, b"x" * 4096)
            pending = [asyncio.create_task(n.read(i * 4096, 4096)) for i in range(4)]
            await asyncio.sleep(0.5)
            assert not any(t.done() for t in pending)
            t0 = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
            assert time.monotonic() - t0 < 2.5  # failed by the break, not by the delay ending
            for r in results:
                assert isinstance(r, BlockError) and r.errno == errno.EIO, results
            for op in (n.read(0, 512), n.write(0, b"y" * 512), n.flush()):
                with pytest.raises(BlockError) as e:
                    await asyncio.wait_for(op, 10)
                assert e.value.errno == errno.EIO
        finally:
            await g.close_all()


async def test_node_reconnect_delay(tmp_path):
    path = str(tmp_path / "q.raw")
    make_layout_file(path, 4 * MiB, [])
    sock = str(tmp_path / "q.sock")
    proc = None
    g = None
    log = open(tmp_path / "qemu-nbd.log", "wb")

    def start():
        p = subprocess.Popen(qemu_nbd_args(path, sock=sock), stdout=log, stderr=subprocess.STDOUT)
        wait_listening(sock, proc=p)
        return p

    def kill(p):
        p.kill()
        p.wait(10)
        if os.path.exists(sock):
            os.unlink(sock)

    try:
        proc = start()
        g, n = await open_nbd(
            {"server": {"type": "unix", "path": sock}, "export": "exp", "reconnect-delay": 15}
        )
        await n.write(0, b"A" * 65536)
        kill(proc)
        # requests issued while the server is away wait for it ...
        t = asyncio.create_task(n.read(0, 65536))
        w = asyncio.create_task(n.write(65536, b"B" * 65536))
        await asyncio.sleep(1.0)
        assert not t.done() and not w.done()
        proc = await asyncio.to_thread(start)
        # ... and complete once it is back within the delay
        assert await asyncio.wait_for(t, 10) == b"A" * 65536
        await asyncio.wait_for(w, 10)
        assert await n.read(65536, 65536) == b"B" * 65536
        await g.close_all()
        g = None
        with open(path, "rb") as f:
            assert f.read(2 * 65536) == b"A" * 65536 + b"B" * 65536
        # a delay that runs out gives EIO
        g, n = await open_nbd(
            {"server": {"type": "unix", "path": sock}, "export": "exp", "reconnect-delay": 1}
        )
        kill(proc)
        proc = None
        t0 = time.monotonic()
        with pytest.raises(BlockError) as e:
            await asyncio.wait_for(n.read(0, 512), 10)
        assert e.value.errno == errno.EIO
        assert time.monotonic() - t0 < 5
    finally:
        if g is not None:
            await g.close_all()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


# -- 5. TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def qemu_tls(creds_dir: str, port: int, cmd: str, *cargs: str, export: str = "disk"):
    return tool(
        cmd,
        *cargs,
        "--object",
        f"tls-creds-x509,id=tls0,dir={creds_dir},endpoint=client",
        "--image-opts",
        f"driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0",
        check=False,
        timeout=30,
    )


def nbds_uri(port: int, creds_dir: str) -> str:
    return f"nbds://127.0.0.1:{port}/disk?tls-certificates={creds_dir}"


async def _tls_node(port: int, creds_dir: str | None):
    opts = {"server": {"type": "inet", "host": "127.0.0.1", "port": str(port)}, "export": "disk"}
    objs = {}
    if creds_dir:
        opts["tls-creds"] = "tls0"
        objs["tls0"] = TLSCredsX509("tls0", creds_dir, "client", True)
    return await open_nbd(opts, objs)


def test_tls_qemu_and_libnbd(tmp_path, pki):
    disk = str(tmp_path / "disk.raw")
    make_layout_file(disk, 8 * MiB, [1])
    port = free_port()
    with daemon(tmp_path, *daemon_args(disk, port=port, tls=pki["server"])):
        r = qemu_tls(pki["client"], port, "qemu-img", "info", "--output", "json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["virtual-size"] == 8 * MiB
        r = qemu_tls(
            pki["client"],
            port,
            "qemu-io",
            "-c",
            "write -P 0xc3 64k 64k",
            "-c",
            "read -P 0xc3 64k 64k",
        )
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, (
            r.stdout + r.stderr
        )
        r = tool("nbdinfo", "--json", nbds_uri(port, pki["client"]), check=False, timeout=30)
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == 8 * MiB
        # an untrusted client certificate (signed by another CA) is refused
        r = qemu_tls(pki["rogue"], port, "qemu-img", "info")
        assert r.returncode != 0
        r = tool("nbdinfo", "--json", nbds_uri(port, pki["rogue"]), check=False, timeout=30)
        assert r.returncode != 0
        # plaintext clients are refused
        r = tool("qemu-img", "info", nbd_uri(port), check=False, timeout=30)
        assert r.returncode != 0
        r = tool("nbdinfo", "--json", nbd_uri(port), check=False, timeout=30)
        assert r.returncode != 0
        # blockrep's own nbd node: plaintext refused, untrusted refused, TLS works

        async def node_checks():
            with pytest.raises(BlockError) as e:
                await _tls_node(port, None)
            assert "TLS" in e.value.message
            with pytest.raises(BlockError):
                g, n = await _tls_node(port, pki["rogue"])
                try:  # TLS 1.3: a refused client cert shows on the first exchange after the handshake
                    await n.read(0, 512)
                finally:
                    await g.close_all()
            g, n = await _tls_node(port, pki["client"])
            try:
                assert await n.read(64 * 1024, 65536) == b"\xc3" * 65536
                await n.write(3 * MiB, b"tls!" * 4096)
                assert await n.read(3 * MiB, 16384) == b"tls!" * 4096
                await n.flush()
            finally:
                await g.close_all()

        asyncio.run(node_checks())
    with open(disk, "rb") as f:
        f.seek(64 * 1024)
        assert f.read(65536) == b"\xc3" * 65536
        f.seek(3 * MiB)
        assert f.read(16384) == b"tls!" * 4096


def test_tls_authz(tmp_path, pki):
    disk = str(tmp_path / "disk.raw")
    make_layout_file(disk, 4 * MiB, [0])
    port = free_port()
    with daemon(tmp_path, *daemon_args(disk, port=port, tls=pki["server"], authz=CLIENT_DN)):
        r = qemu_tls(pki["client"], port, "qemu-img", "info")
        assert r.returncode == 0, r.stderr
        r = tool("nbdinfo", "--json", nbds_uri(port, pki["client"]), check=False, timeout=30)
        assert r.returncode == 0, r.stderr
        # a valid certificate of the same CA whose DN is not the identity
        r = qemu_tls(pki["other"], port, "qemu-img", "info")
        assert r.returncode != 0
        r = tool("nbdinfo", "--json", nbds_uri(port, pki["other"]), check=False, timeout=30)
        assert r.returncode != 0
        # untrusted CA, even with the authorised CN
        r = qemu_tls(pki["rogue"], port, "qemu-img", "info")
        assert r.returncode != 0

        async def node_checks():
            with pytest.raises(BlockError):
                g, n = await _tls_node(port, pki["other"])
                try:
                    await n.read(0, 512)
                finally:
                    await g.close_all()
            g, n = await _tls_node(port, pki["client"])
            try:
                assert len(await n.read(0, 4096)) == 4096
            finally:
                await g.close_all()

        asyncio.run(node_checks())


def test_tls_authz_dn_format_matches_qemu_nbd(tmp_path, pki):
    """qemu-nbd and blockrep agree on which authz-simple identity admits a client certificate.

    QEMU (gnutls_x509_crt_get_dn) writes the DN in the certificate's RDN order,
    "C=XX,O=blockrep test,CN=client-good"; the RFC 4514 reversed form is refused by both.
    """
    disk = str(tmp_path / "disk.raw")
    make_layout_file(disk, MiB, [])
    for identity, admitted in ((CLIENT_DN, True), (CLIENT_DN_RFC4514, False)):
        port = free_port()
        args = [
            "qemu-nbd",
            "-f",
            "raw",
            "-x",
            "disk",
            "-t",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "--object",
            f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server,verify-peer=on",
            "--object",
            "authz-simple,id=auth0,identity=" + identity.replace(",", ",,"),
            "--tls-creds",
            "tls0",
            "--tls-authz",
            "auth0",
            disk,
        ]
        with server_proc(args, ("127.0.0.1", port), tmp_path, "qemu-nbd-tls"):
            r = qemu_tls(pki["client"], port, "qemu-img", "info")
            assert (r.returncode == 0) == admitted, (identity, r.stderr)
            r = qemu_tls(pki["other"], port, "qemu-img", "info")
            assert r.returncode != 0

            async def node_checks(port=port):  # blockrep's client against QEMU's TLS server
                g, n = await _tls_node(port, pki["client"])
                try:
                    await n.write(0, b"q" * 4096)
                    assert await n.read(0, 4096) == b"q" * 4096
                finally:
                    await g.close_all()

            if admitted:
                asyncio.run(node_checks())
        port = free_port()
        with daemon(tmp_path, *daemon_args(disk, port=port, tls=pki["server"], authz=identity)):
            r = qemu_tls(pki["client"], port, "qemu-img", "info")
            assert (r.returncode == 0) == admitted, (identity, r.stderr)
