"""The event loop (blockrep/eventloop.py): uvloop by default, asyncio's own loop with
BLOCKREP_LOOP=asyncio; the same export serves the same bytes on either."""

from __future__ import annotations

import os
import random
import signal
import subprocess

import pytest

from blockrep.testing import blockrep_argv, nbd_client, wait_accepting


def _uses_uvloop(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "uvloop" in f.read()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_daemon_runs_on_the_chosen_loop_and_serves_the_same_bytes(tmp_path, loop):
    disk, sock = str(tmp_path / "d.raw"), str(tmp_path / "nbd.sock")
    data = random.Random(7).randbytes(4 << 20)
    with open(disk, "wb") as f:
        f.write(data)
    env = {**os.environ, "BLOCKREP_LOOP": "" if loop == "uvloop" else "asyncio"}
    argv = blockrep_argv(
        "daemon",
        "--blockdev",
        f"driver=file,node-name=f0,filename={disk}",
        "--blockdev",
        "driver=raw,node-name=disk,file=f0",
        "--nbd-server",
        f"addr.type=unix,addr.path={sock}",
        "--export",
        "type=nbd,id=e0,node-name=disk,name=disk,writable=on",
    )
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_accepting(sock, proc)
        assert _uses_uvloop(proc.pid) is (loop == "uvloop")
        g, node = await nbd_client(sock, "disk")
        model = bytearray(data)
        rnd = random.Random(8)
        for _ in range(32):
            off, n = rnd.randrange(0, len(data) - 70000), rnd.choice((512, 4096, 65536))
            chunk = rnd.randbytes(n)
            await node.write(off, chunk)
            model[off : off + n] = chunk
        assert await node.read(0, len(data)) == bytes(model)
        await g.close_all()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    with open(disk, "rb") as f:
        assert f.read() == bytes(model)
