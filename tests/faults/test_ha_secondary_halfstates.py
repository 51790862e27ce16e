"""The secondary's half-states (issue 11, Why §6).

* A SIGKILLed secondary's hidden/active overlays stay in the buffer dir; the next
  secondary of the same disk removes them at start, and only them: another disk's
  secondary sharing the buffer dir keeps its buffers, and so does a live secondary of
  the same disk (its buffers are locked).
* A refused failover (replication not running yet) leaves the secondary as it was:
  its link is up and a primary pairs with it afterwards; the disks end identical.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from blockrep.testing import MiB
from tests.harness.ha import REPO
from tests.harness.models import random_writes
from tests.harness.tools import sha, sha_file

pytestmark = pytest.mark.timeout(120)

SIZE = 4 * MiB
FAST_S = ["--heartbeat-interval", "0.1"]
FAST_P = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "1.5", "--checkpoint-interval", "0"]


def _buffers(bdir: str, disk: str) -> set[str]:
    stem = os.path.basename(disk)
    return {
        f for f in os.listdir(bdir) if f.startswith(f"blockrep-{stem}-") and f.endswith(".qcow2")
    }


async def test_killed_secondary_buffers_removed_by_next_start_only_its_own(ha):
    rnd = random.Random(21)
    base = ha.make_disks(SIZE, 21, names=("p.raw", "s.raw", "x.raw"))
    bdir = ha.path("buffers")
    os.mkdir(bdir)
    s_disk, x_disk = ha.disk("s.raw"), ha.disk("x.raw")
    buf = ["--buffer-dir", bdir, *FAST_S]

    s1 = ha.secondary(name="s1", disk=s_disk, listen=f"unix:{ha.path('s.ctl')}", extra=buf)
    x = ha.secondary(name="x", disk=x_disk, extra=buf)  # another disk, same buffer dir
    await s1.wait_ready()
    await x.wait_ready()
    first = _buffers(bdir, s_disk)
    x_bufs = _buffers(bdir, x_disk)
    assert len(first) == 2 and len(x_bufs) == 2, os.listdir(bdir)

    s1.kill()  # SIGKILL: no chance to clean up
    assert _buffers(bdir, s_disk) == first  # the leak

    s2 = ha.secondary(name="s2", disk=s_disk, listen=f"unix:{ha.path('s.ctl')}", extra=buf)
    await s2.wait_ready()
    second = _buffers(bdir, s_disk)
    assert len(second) == 2 and not (second & first), (first, second)  # old gone, new there
    assert _buffers(bdir, x_disk) == x_bufs  # the other disk's live secondary keeps its own
    assert "removed the stale buffer" in s2.log_text()

    # a second secondary of the same disk while s2 lives: it must not take s2's buffers
    s3 = ha.secondary(name="s3", disk=s_disk, extra=buf)
    try:
        await s3.wait_ready(20)
    except AssertionError:
        pass  # it may refuse the disk s2 holds; either way s2's buffers stay
    assert second <= _buffers(bdir, s_disk)
    s3.quit()
    assert _buffers(bdir, s_disk) == second

    # the restarted secondary works: pair, write, checkpoint, disks identical
    p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=FAST_P)
    await p.wait_ready()
    pc = await ha.client(p)
    model = bytearray(base)
    await random_writes(pc, rnd, SIZE, 16, model)
    await p.qmp_async("replication-checkpoint")
    assert sha(bytes(await pc.read(0, SIZE))) == sha(model)
    p.quit()
    s2.quit()
    x.quit()
    assert sha_file(p.disk) == sha(model) == sha_file(s_disk)
    assert sha_file(x_disk) == sha(base)
    assert _buffers(bdir, s_disk) == set() and _buffers(bdir, x_disk) == set()  # orderly stops


async def test_refused_failover_leaves_the_link_up(ha):
    rnd = random.Random(22)
    base = ha.make_disks(SIZE, 22)
    s = ha.secondary(extra=FAST_S)
    await s.wait_ready()

    # replication is not running yet: `blockrep failover` is refused ...
    r = subprocess.run(
        [sys.executable, "-m", "blockrep.cli", "failover", "--qmp", f"unix:{s.qmp}"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    st = await s.astatus()
    assert st["peer"] == "connecting" and st["stage"] == "none", st
    assert st["alone-since"] is None

    # ... and changed nothing: a primary pairs with it and checkpoints
    p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=FAST_P)
    await p.wait_ready()
    await s.wait_status(
        lambda x: x["peer"] == "connected" and x["stage"] == "running", 15, "paired"
    )
    pc = await ha.client(p)
    model = bytearray(base)
    for _ in range(3):
        await random_writes(pc, rnd, SIZE, 12, model)
        await p.qmp_async("replication-checkpoint")
    ps = await p.astatus()
    assert ps["peer"] == "connected" and ps["checkpoints"] == 3, ps
    ss = await s.astatus()
    assert ss["epoch-uuid"] == ps["epoch-uuid"] and ss["checkpoints"] >= 3, (ss, ps)
    p.quit()
    s.quit()
    assert sha_file(p.disk) == sha(model) == sha_file(s.disk)
    assert "refused" in r.stderr and "not running" in r.stderr, r.stderr
