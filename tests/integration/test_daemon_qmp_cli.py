"""``blockrep daemon`` driven over QMP with the qemu.qmp client, and its command line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import time

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from blockrep.testing import free_port
from tests.harness.processes import BLOCKREP, DaemonProc, daemon
from tests.harness.tools import tool

ISSUE_COMMANDS = [
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "quit",
    "blockdev-add",
    "blockdev-del",
    "x-blockdev-del",
    "query-named-block-nodes",
    "query-block",
    "nbd-server-start",
    "nbd-server-add",
    "nbd-server-remove",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "human-monitor-command",
]


async def client(sock: str) -> QMPClient:
    c = QMPClient("test")
    await asyncio.wait_for(c.connect(sock), 10)
    return c


async def expect_error(
    c: QMPClient, cmd: str, args: dict | None, desc: str, cls: str = "GenericError"
) -> None:
    with pytest.raises(ExecuteError) as e:
        await c.execute(cmd, args or {})
    assert e.value.error.error.class_ == cls
    assert e.value.error.error.desc == desc


def hmp(line: str) -> dict:
    return {"command-line": line}


@pytest.fixture
def raw_disk(tmp_path):
    p = tmp_path / "disk.raw"
    with open(p, "wb") as f:
        f.truncate(16 << 20)
    return str(p)


def test_query_commands_lists_every_command(tmp_path):
    async def go(sock):
        c = await client(sock)
        names = {x["name"] for x in await c.execute("query-commands")}
        ver = await c.execute("query-version")
        await c.disconnect()
        return names, ver

    with daemon(tmp_path) as d:
        names, ver = asyncio.run(go(d.qmp_sock))
    for n in ISSUE_COMMANDS:
        assert n in names, n
    assert ver["qemu"]["major"] == 7 and "blockrep" in ver["package"]


def test_qmp_socket_is_private(tmp_path):
    with daemon(tmp_path) as d:
        mode = stat.S_IMODE(os.stat(d.qmp_sock).st_mode)
    assert mode == 0o600


def _raw_qmp(sock: str, payloads: list[bytes], replies: int) -> list[dict]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock)
    f = s.makefile("rb")
    greeting = json.loads(f.readline())
    assert "QMP" in greeting
    out = []
    for p in payloads:
        s.sendall(p)
    for _ in range(replies):
        out.append(json.loads(f.readline()))
    s.close()
    return out


def test_qmp_protocol_errors_keep_the_connection(tmp_path):
    with daemon(tmp_path) as d:
        r = _raw_qmp(
            d.qmp_sock,
            [
                b'{"execute": "query-version"}',  # before negotiation
                b'{"execute": "qmp_capabilities", "id": 1}',
                b"{ not json }\n",
                b"[1, 2]",
                b'{"arguments": {}}',
                b'{"execute": "no-such-command", "id": "x"}',
                b'{"execute": "query-version", "id": {"deep": [1]}}',
                b'{"execute": "query-version", "bogus": 1}',
                b'{"execute": "qmp_capabilities"}',
                # one object split over two writes
                b'{"execute": "query-ver',
                b'sion", "id": 7}',
            ],
            10,
        )
    assert r[0]["error"]["class"] == "CommandNotFound"
    assert "qmp_capabilities" in r[0]["error"]["desc"]
    assert r[1] == {"return": {}, "id": 1}
    assert r[2]["error"]["class"] == "GenericError" and "JSON parse error" in r[2]["error"]["desc"]
    assert r[3]["error"]["desc"] == "QMP input must be a JSON object"
    assert r[4]["error"]["desc"] == "QMP input lacks member 'execute'"
    assert r[5] == {
        "error": {
            "class": "CommandNotFound",
            "desc": "The command no-such-command has not been found",
        },
        "id": "x",
    }
    assert r[6]["id"] == {"deep": [1]} and "return" in r[6]
    assert r[7]["error"]["desc"] == "QMP input member 'bogus' is unexpected"
    assert r[8]["error"]["class"] == "CommandNotFound"
    assert r[9]["id"] == 7 and r[9]["return"]["package"].startswith("blockrep")


def test_qmp_hostile_json_is_answered_and_the_connection_kept(tmp_path):
    """Issue 12, Why 6: JSON nested 100,000 deep and numbers of more than 4,300 digits
    dropped the connection with a traceback; QEMU answers its limits with an error."""
    with daemon(tmp_path) as d:
        r = _raw_qmp(
            d.qmp_sock,
            [
                b'{"execute": "qmp_capabilities"}',
                b'{"execute": "query-version", "id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
                b'{"execute": "query-version", "id": ' + b"9" * 5000 + b"}\n",
                b'{"execute": "query-version", "id": "after"}',
            ],
            4,
        )
        log = d.output()
    assert r[0] == {"return": {}}
    assert r[1]["error"] == {
        "class": "GenericError",
        "desc": "JSON nesting depth limit exceeded",
    }, r[1]
    # a number too long for an integer is a (rounded) number, as QEMU reads it
    assert "return" in r[2] and isinstance(r[2]["id"], float), r[2]
    assert r[3]["id"] == "after" and "return" in r[3]
    assert "Traceback" not in log


def test_blockdev_add_del_and_queries(tmp_path, raw_disk):
    async def go(sock):
        c = await client(sock)
        await expect_error(
            c, "blockdev-add", {"driver": "raw"}, "'node-name' must be specified for the root node"
        )
        await c.execute("blockdev-add", {"driver": "file", "node-name": "f0", "filename": raw_disk})
        await c.execute("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "f0"})
        await expect_error(
            c,
            "blockdev-add",
            {"driver": "raw", "node-name": "r1", "file": "nothere"},
            "Cannot find device='nothere' nor node-name='nothere'",
        )
        await expect_error(
            c,
            "blockdev-add",
            {"driver": "raw", "node-name": "r0", "file": "f0"},
            "Duplicate nodes with node-name='r0'",
        )
        await expect_error(
            c,
            "blockdev-add",
            {"driver": "file", "node-name": "x", "filename": raw_disk, "bogus": 1},
            "Parameter 'bogus' is unexpected",
        )
        nodes = await c.execute("query-named-block-nodes", {"flat": True})
        by = {n["node-name"]: n for n in nodes}
        assert by["r0"]["drv"] == "raw" and by["r0"]["image"]["virtual-size"] == 16 << 20
        assert by["f0"]["file"] == raw_disk
        await expect_error(c, "blockdev-del", {"node-name": "f0"}, "Node f0 is in use")
        await c.execute("blockdev-del", {"node-name": "r0"})
        await c.execute("x-blockdev-del", {"node-name": "f0"})
        assert await c.execute("query-named-block-nodes") == []
        await expect_error(
            c, "blockdev-del", {"node-name": "r0"}, "Failed to find node with node-name='r0'"
        )
        await c.disconnect()

    with daemon(tmp_path) as d:
        asyncio.run(go(d.qmp_sock))


def test_nbd_server_and_exports(tmp_path, raw_disk):
    nbd_sock = str(tmp_path / "nbd.sock")

    async def go(sock):
        c = await client(sock)
        await expect_error(c, "nbd-server-add", {"device": "parent0"}, "NBD server not running")
        await expect_error(c, "nbd-server-stop", {}, "NBD server not running")
        # SocketAddressLegacy with port as a string, as REFERENCE-QEMU.md and the seed write it
        await c.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd_sock}}})
        await expect_error(
            c,
            "nbd-server-start",
            {"addr": {"type": "unix", "path": nbd_sock}},
            "NBD server already running",
        )
        await c.execute("nbd-server-add", {"device": "parent0", "writable": True})
        await expect_error(
            c,
            "nbd-server-add",
            {"device": "parent0"},
            "Block export id 'parent0' is already in use",
        )
        exports = await c.execute("query-block-exports")
        assert exports == [
            {
                "type": "nbd",
                "id": "parent0",
                "node-name": exports[0]["node-name"],
                "shutting-down": False,
            }
        ]
        r = tool(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 4096 8192",
            f"nbd+unix:///parent0?socket={nbd_sock}",
        )
        assert "wrote 8192/8192" in r.stdout
        out = await c.execute(
            "human-monitor-command", hmp('qemu-io parent0 "read -P 0x3c 4096 8192"')
        )
        assert (
            "read 8192/8192 bytes at offset 4096" in out
            and "Pattern verification failed" not in out
        )
        out = await c.execute(
            "human-monitor-command", hmp('qemu-io parent0 "read -P 0x3d 4096 8192"')
        )
        assert "Pattern verification failed at offset 4096, 8192 bytes" in out
        await c.execute("nbd-server-remove", {"name": "parent0"})
        await expect_error(
            c, "nbd-server-remove", {"name": "parent0"}, "Export 'parent0' is not found"
        )
        await c.execute(
            "block-export-add", {"type": "nbd", "id": "e1", "node-name": "parent0", "name": "disk"}
        )
        info = json.loads(tool("nbdinfo", "--json", f"nbd+unix:///disk?socket={nbd_sock}").stdout)
        assert info["exports"][0]["is_read_only"] is True
        assert info["exports"][0]["export-size"] == 16 << 20
        await c.execute("block-export-del", {"id": "e1"})
        assert await c.execute("query-block-exports") == []
        await c.execute("nbd-server-stop")
        # flat SocketAddress and an integer port
        port = free_port()
        await c.execute(
            "nbd-server-start", {"addr": {"type": "inet", "host": "127.0.0.1", "port": port}}
        )
        await c.execute("nbd-server-add", {"device": "parent0", "name": "p"})
        r = tool(
            "qemu-io",
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x3c 4096 8192",
            f"nbd://127.0.0.1:{port}/p",
        )
        assert "read 8192/8192" in r.stdout and "verification failed" not in r.stdout
        await c.execute("nbd-server-stop")
        await c.disconnect()

    with daemon(tmp_path, "-drive", f"if=none,id=parent0,driver=raw,file.filename={raw_disk}") as d:
        asyncio.run(go(d.qmp_sock))
    with open(raw_disk, "rb") as f:
        f.seek(4096)
        assert f.read(8192) == b"\x3c" * 8192


def test_hmp_reports_failures_in_the_reply(tmp_path, raw_disk):
    async def go(sock):
        c = await client(sock)
        out = await c.execute(
            "human-monitor-command", hmp('qemu-io disk0 "write -P 0x11 16777000 4096"')
        )
        assert out.startswith("write failed:")
        out = await c.execute("human-monitor-command", hmp('qemu-io nodisk "read 0 512"'))
        assert "Cannot find device='nodisk' nor node-name='nodisk'" in out
        out = await c.execute("human-monitor-command", hmp('qemu-io disk0 "write -z 0 65536"'))
        assert "wrote 65536/65536" in out
        out = await c.execute("human-monitor-command", hmp('qemu-io disk0 "discard 0 65536"'))
        assert "discard 65536/65536" in out
        assert await c.execute("human-monitor-command", hmp('qemu-io disk0 "flush"')) == ""
        # drive_add -n creates a node; drive_del removes a drive
        out = await c.execute(
            "human-monitor-command",
            hmp(
                f"drive_add -n buddy driver=raw,file.driver=file,file.filename={raw_disk},file.locking=off,node-name=extra0"
            ),
        )
        assert out == ""
        names = {n["node-name"] for n in await c.execute("query-named-block-nodes")}
        assert "extra0" in names
        assert await c.execute("human-monitor-command", hmp("drive_del disk0")) == ""
        assert await c.execute("query-block") == []
        out = await c.execute("human-monitor-command", hmp("drive_del disk0"))
        assert "Device 'disk0' not found" in out
        await c.disconnect()

    with daemon(tmp_path, "--drive", f"if=virtio,id=disk0,format=raw,file={raw_disk}") as d:
        asyncio.run(go(d.qmp_sock))


def test_events_reach_every_client(tmp_path, raw_disk):
    nbd_sock = str(tmp_path / "n.sock")

    async def go(sock):
        a, b = await client(sock), await client(sock)
        listener = EventListener()
        b.register_listener(listener)
        await a.execute("nbd-server-start", {"addr": {"type": "unix", "path": nbd_sock}})
        await a.execute("block-export-add", {"type": "nbd", "id": "e", "node-name": "disk0"})
        await a.execute("block-export-del", {"id": "e"})
        ev = await asyncio.wait_for(listener.get(), 10)
        assert ev["event"] == "BLOCK_EXPORT_DELETED" and ev["data"] == {"id": "e"}
        assert set(ev["timestamp"]) == {"seconds", "microseconds"}
        await a.disconnect()
        await b.disconnect()

    with daemon(tmp_path, "-drive", f"if=none,id=disk0,driver=raw,file.filename={raw_disk}") as d:
        asyncio.run(go(d.qmp_sock))


def test_sigterm_drains_flushes_and_exits_zero(tmp_path, raw_disk):
    nbd_sock = str(tmp_path / "n.sock")
    qcow = str(tmp_path / "t.qcow2")
    tool("qemu-img", "create", "-q", "-f", "qcow2", qcow, "16M")
    d = DaemonProc(
        [
            "--blockdev",
            f"driver=qcow2,node-name=q0,file.driver=file,file.filename={qcow}",
            "--nbd-server",
            f"addr.type=unix,addr.path={nbd_sock}",
            "--export",
            "type=nbd,id=e0,node-name=q0,name=q,writable=on",
            "--pidfile",
            str(tmp_path / "pid"),
        ],
        None,
        str(tmp_path / "log"),
    )
    try:
        d.wait_ready(nbd_sock)
        tool("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 1M", f"nbd+unix:///q?socket={nbd_sock}")
        assert int(open(tmp_path / "pid").read()) == d.proc.pid
    finally:
        rc = d.stop(signal.SIGTERM)
    assert rc == 0, d.output()
    assert not os.path.exists(tmp_path / "pid")
    assert tool("qemu-img", "check", qcow, check=False).returncode == 0
    r = tool("qemu-io", "-f", "qcow2", "-c", "read -P 0x77 0 1M", qcow)
    assert "verification failed" not in r.stdout


def test_daemonize_returns_when_ready(tmp_path, raw_disk):
    sock = str(tmp_path / "q.sock")
    pidfile = str(tmp_path / "pid")
    r = subprocess.run(
        [
            *BLOCKREP,
            "daemon",
            "--daemonize",
            "--pidfile",
            pidfile,
            "-qmp",
            f"unix:{sock},server=on,wait=off",
        ],
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert os.path.exists(sock)
    pid = int(open(pidfile).read())
    os.kill(pid, signal.SIGTERM)
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("daemonized process did not exit on SIGTERM")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["-device", "virtio-blk-pci,drive=x"],
            "option '-device' is not supported by blockrep daemon",
        ),
        (["-machine", "q35"], "only '-machine none' is accepted"),
        (["-drive", "if=ide,file=x"], "if=ide is not supported"),
        (
            ["-drive", "if=none,id=a,driver=raw,file.filename=/nonexistent/x"],
            "Could not open '/nonexistent/x'",
        ),
        (
            ["-drive", "if=none,id=a,driver=file,filename=/dev/null,bogus=1"],
            "Block format 'file' does not support the option 'bogus'",
        ),
        (
            ["-blockdev", "driver=file,node-name=f,filename=/dev/null,bogus=1"],
            "Parameter 'bogus' is unexpected",
        ),
        (
            ["-drive", "if=none,id=a,driver=raw,file.filename=/dev/null,snapshot=on"],
            "snapshot=on is not supported",
        ),
        (["--export", "type=nbd,id=e,node-name=n"], "NBD server not running"),
    ],
)
def test_bad_command_lines_are_refused_by_name(args, message):
    r = subprocess.run([*BLOCKREP, "daemon", *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert message in r.stderr


def test_reference_command_lines_parse(tmp_path):
    """REFERENCE-QEMU.md's secondary and primary command lines, with blockrep daemon.

    Both run as written and build the documented graphs.
    """
    sec = tmp_path / "sec.raw"
    prim = tmp_path / "prim.raw"
    for p in (sec, prim):
        with open(p, "wb") as f:
            f.truncate(64 << 20)
    for img in ("hidden", "active"):
        tool("qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / f"{img}.qcow2"), "64M")
    primary = [
        "-machine",
        "none",
        "-nodefaults",
        "-display",
        "none",
        "-qmp",
        f"unix:{tmp_path}/P.qmp,server=on,wait=off",
        "-drive",
        f"if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0.file.filename={prim},children.0.driver=raw",
    ]
    d = DaemonProc(primary, f"{tmp_path}/P.qmp", str(tmp_path / "P.log"))
    try:
        d.wait_ready()

        async def check(sock):
            c = await client(sock)
            blocks = await c.execute("query-block")
            await c.disconnect()
            return blocks

        blocks = asyncio.run(check(f"{tmp_path}/P.qmp"))
        assert blocks[0]["device"] == "colo-disk0" and blocks[0]["inserted"]["drv"] == "quorum"
    finally:
        assert d.stop() == 0
    secondary = [
        "-qmp",
        f"unix:{tmp_path}/S.qmp,server=on,wait=off",
        "-drive",
        f"if=none,id=parent0,driver=raw,file.filename={sec}",
        "-drive",
        "if=none,id=childs0,driver=replication,mode=secondary,top-id=colo-disk0,"
        f"file.driver=qcow2,file.node-name=active0,file.file.filename={tmp_path}/active.qcow2,"
        f"file.backing.driver=qcow2,file.backing.node-name=hidden0,file.backing.file.filename={tmp_path}/hidden.qcow2,"
        "file.backing.backing=parent0",
        "-drive",
        "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0=childs0",
    ]
    d = DaemonProc(secondary, f"{tmp_path}/S.qmp", str(tmp_path / "S.log"))
    try:
        d.wait_ready()

        async def check_s(sock):
            c = await client(sock)
            nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
            blocks = {b["device"]: b for b in await c.execute("query-block")}
            await c.disconnect()
            return nodes, blocks

        nodes, blocks = asyncio.run(check_s(f"{tmp_path}/S.qmp"))
        assert nodes["active0"]["drv"] == "qcow2" and nodes["hidden0"]["drv"] == "qcow2"
        assert blocks["childs0"]["inserted"]["drv"] == "replication"
        assert blocks["colo-disk0"]["inserted"]["drv"] == "quorum"
    finally:
        assert d.stop() == 0
