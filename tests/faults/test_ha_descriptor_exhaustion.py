"""1,100 idle connections to a secondary held at 1,024 descriptors (issue 12, Why 4).

On the old main the next checkpoint failed half-way, QMP stopped answering and state
saves failed silently. Now idle strangers are dropped or refused before they eat the
reserve: checkpoints, QMP status and a failover still work, and the disks end equal
to the consumer's model.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess

from blockrep.testing import MiB, free_port
from tests.harness.ha import failover_cli, log_size
from tests.harness.models import random_writes
from tests.harness.tools import sha, sha_file

SIZE = 4 * MiB
IDLE = 1100
FAST_S = ["--heartbeat-interval", "0.1"]
FAST_P = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "3", "--checkpoint-interval", "0"]


def _idle_connections(ports: list[int], n: int) -> list[socket.socket]:
    socks = []
    for i in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", ports[i % len(ports)]))
        except BlockingIOError:
            pass
        socks.append(s)
    return socks


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_idle_connection_flood_leaves_checkpoints_qmp_and_failover_working(ha):
    base = ha.make_disks(SIZE, 31)
    port, lport = free_port(), free_port()
    s = ha.secondary(listen=f"127.0.0.1:{port}", extra=[*FAST_S, "--link-port", str(lport)])
    p = ha.primary(f"127.0.0.1:{port}", extra=FAST_P)
    await s.wait_ready()
    await p.wait_ready()
    await p.wait_status(lambda x: x["peer"] == "connected", 30, "paired")
    subprocess.run(["prlimit", "--pid", str(s.pid), "--nofile=1024:1024"], check=True)
    pc = await ha.client(p)
    model = bytearray(base)
    await random_writes(pc, random.Random(31), SIZE, 16, model=model)
    await p.qmp_async("replication-checkpoint")
    log_before = log_size(s.log)

    socks = _idle_connections([port, lport], IDLE)
    try:
        for round_ in range(3):  # strangers keep their sockets open throughout
            await random_writes(pc, random.Random(40 + round_), SIZE, 16, model=model)
            await p.qmp_async("replication-checkpoint")
            st = await s.astatus()
            assert st["peer"] == "connected" and not st["replication-error"], st
            assert _fds(s.pid) < 1024
        assert (await s.astatus())["epoch"] == (await p.astatus())["epoch"]
        grown = log_size(s.log) - log_before
        assert grown < 64 * 1024, f"the log grew by {grown} bytes"
        assert "Traceback" not in s.log_text()
        # the primary dies: the operator fails S over, still under the flood
        p.kill()
        await s.wait_status(lambda x: x["peer"] != "connected", 30, "S lost P")
        failover_cli(s)
        st = await s.wait_status(lambda x: x["peer"] == "failed-over", 30, "failed over")
        assert not st["replication-error"], st
    finally:
        for x in socks:
            x.close()
    for g in ha.graphs:
        await g.close_all()
    ha.graphs.clear()
    s.quit()
    assert await s.wait_exit(30) == 0, s.log_text()
    assert sha_file(s.disk) == sha(bytes(model))  # the last checkpoint: every write
