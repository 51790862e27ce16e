"""Issue 11, Why 6 (the primary's half-states).

* The first pairing fails on the data path after the handshake (the secondary's
  replication link is gone): before the fix P exited; now it serves its consumer
  alone (``degraded``, its writes marked) and says why in ``errors``.

* ENOSPC on the state file while P degrades: before the fix the save's error escaped
  ``degrade`` — ``replication0`` stayed in the graph and the heartbeat/reconnect loop
  died, so P never paired again (or every reconnect failed with "Duplicate nodes").
  Now the replication node leaves the graph whatever the save does, the failure is in
  status ``errors``, and P re-pairs with the returning secondary.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import subprocess

import pytest

from blockrep.testing import MiB
from tests.harness.models import random_writes
from tests.harness.tools import sha, sha_file

pytestmark = pytest.mark.timeout(180)

SIZE = 4 * MiB
FAST_S = ["--heartbeat-interval", "0.1"]
FAST_P = [
    "--heartbeat-interval",
    "0.1",
    "--heartbeat-timeout",
    "1.5",
    "--checkpoint-interval",
    "0",
    "--reconnect",
]


@pytest.fixture
def small_fs(ha):
    """A 64 KiB tmpfs, mounted by the test and unmounted in cleanup."""
    # never skipped: `make test` runs as root (it installs packages); a run that cannot
    # mount fails, so the case is not silently lost
    assert os.geteuid() == 0, "mounting a tmpfs needs root"
    path = ha.path("small")
    os.mkdir(path)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", path], capture_output=True, text=True
    )
    assert r.returncode == 0, f"cannot mount a tmpfs here: {r.stderr}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def _fill(path: str) -> str:
    """Fill the file system at ``path`` up to the last byte; the filler's path."""
    filler = os.path.join(path, "filler")
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass
    return filler


async def test_degrade_with_a_full_state_fs_then_repairs(ha, small_fs):
    rnd = random.Random(6)
    base = ha.make_disks(SIZE, 6)
    s = ha.secondary(extra=FAST_S)
    p_state = os.path.join(small_fs, "p.state")
    p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=[*FAST_P, "--state-file", p_state])
    await s.wait_ready()
    await p.wait_ready()
    pc = await ha.client(p)
    model = bytearray(base)
    await random_writes(pc, rnd, SIZE, 8, model)
    await p.qmp_async("replication-checkpoint")
    await asyncio.sleep(0.3)  # both sides saved the epoch

    filler = _fill(small_fs)
    s.kill()  # P loses S while its state file cannot be saved
    st = await p.wait_status(lambda x: x["peer"] == "degraded", 15, "P degraded")
    await asyncio.sleep(0.5)
    st = await p.astatus()
    assert st["peer"] == "degraded" and st["stage"] == "none", st
    assert any("cannot write" in e for e in st["errors"]), st["errors"]
    os.unlink(filler)  # space again

    # P keeps serving alone; the secondary comes back and P pairs again
    await random_writes(pc, rnd, SIZE, 8, model)
    s2 = ha.secondary(
        name="s2",
        disk=s.disk,
        listen=f"unix:{ha.path('s.ctl')}",
        extra=[*FAST_S, "--state-file", s.state],
    )
    await s2.wait_ready()
    st = await p.wait_status(lambda x: x["peer"] == "connected", 30, "P re-paired")
    assert not any("Duplicate" in e for e in st["errors"]), st["errors"]
    await random_writes(pc, rnd, SIZE, 8, model)
    await p.qmp_async("replication-checkpoint")
    assert sha(bytes(await pc.read(0, SIZE))) == sha(model)
    p.quit()
    s2.quit()
    assert sha_file(p.disk) == sha(model)
    assert sha_file(s.disk) == sha(model)


async def test_first_pairing_fails_on_the_data_path_primary_serves_degraded(ha):
    rnd = random.Random(61)
    base = ha.make_disks(SIZE, 61)
    s = ha.secondary(extra=FAST_S)
    await s.wait_ready()
    link = ha.path("s.ctl") + ".nbd"
    assert os.path.exists(link)
    os.unlink(link)  # the replication link vanishes; the control channel stays
    p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=FAST_P[:-1])  # no --reconnect
    await p.wait_ready()
    st = await p.wait_status(lambda x: x["peer"] == "degraded", 15, "P degraded")
    assert st["stage"] == "none" and st["alone-since"] is not None, st
    assert any("pairing failed" in e for e in st["errors"]), st["errors"]

    pc = await ha.client(p)
    model = bytearray(base)
    await random_writes(pc, rnd, SIZE, 12, model)
    assert sha(bytes(await pc.read(0, SIZE))) == sha(model)
    await asyncio.sleep(0.5)
    st = await p.astatus()  # still serving, still alone, its writes marked
    assert st["peer"] == "degraded" and st["written-alone"], st
    p.quit()
    s.quit()
    assert sha_file(p.disk) == sha(model)
    assert sha_file(s.disk) == sha(base)  # nothing reached the secondary
