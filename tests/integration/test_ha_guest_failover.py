"""Issue 13, acceptance "A real guest": a Linux guest (QEMU on TCG, ext4) writes and syncs
files on P's consumer export; P is SIGKILLed mid-write; S fails over; a second guest boots
on S's export and lists every file with its sha256; S stops in order; ``e2fsck -fn`` on
S's disk is clean, and debugfs reads the files back on the host to compare their bytes.

The guest works in steps the host orders over the serial console (tests/harness/guest.py),
so what a checkpoint holds is known without relying on timing:

1. ``write 6`` with a checkpoint taken while the guest writes (a checkpoint under load);
2. a checkpoint of the idle guest: it holds exactly f0001..f0006, all synced;
3. ``write 4``: f0007..f0010 were created after that checkpoint returned;
4. ``write 1000``: after two more files are durable, P is SIGKILLed mid-write.

``--failover-point checkpoint`` (COLO, the default): S holds the last checkpoint: every file
of step 1 is intact, none of step 3 or 4 exists. ``latest``: every file the guest saw
durable before the kill is intact (f0001..f0012 at least). Both in separate and in shared
mode. A failover that loses what it promises fails the sha comparison; one that leaves a
torn file system fails e2fsck.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time

import pytest

from tests.harness.guest import Guest, Guests, debugfs_dump, e2fsck_clean, mkfs_ext4
from tests.harness.ha import HA, failover_cli

pytestmark = pytest.mark.timeout(180)

SIZE = 64 << 20
FAST_S = ["--heartbeat-interval", "0.1"]
# checkpoints only when the test asks: it must know what each one holds
FAST_P = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "1.5", "--checkpoint-interval", "0"]
BOOT = 90.0  # seconds a TCG boot may take on a loaded host (about 4 s idle)
STEP = 60.0


def _durable(g: Guest) -> dict[str, str]:
    """name -> sha256 of every file the guest reported durable so far."""
    return {m.args[0]: m.args[1] for m in g.seen("DURABLE")}


async def _wait(g: Guest, kind: str, count: int, timeout: float = STEP) -> None:
    await asyncio.to_thread(g.wait_kind, kind, count, timeout)


async def _scenario(ha: HA, shared: bool, point: str) -> None:
    t: dict[str, float] = {}
    # one ext4 made on the host; separate mode: S's disk a copy (the pair starts equal)
    p_disk = ha.disk("p.raw")
    with open(p_disk, "wb") as f:
        f.truncate(SIZE)
    mkfs_ext4(p_disk)
    s_disk = p_disk if shared else ha.disk("s.raw")
    if not shared:
        shutil.copyfile(p_disk, s_disk)
    mode = ["--shared"] if shared else []
    fp = ["--failover-point", point]
    s = ha.secondary(disk=s_disk, extra=[*FAST_S, *mode, *fp])
    p = ha.primary(f"unix:{ha.path('s.ctl')}", disk=p_disk, extra=[*FAST_P, *mode, *fp])
    await s.wait_ready()
    await p.wait_ready()
    await p.wait_status(lambda x: x["peer"] == "connected", 30, "paired")

    guests = Guests(ha.dir)
    try:
        g = guests.boot(p.export, "writer")
        await _wait(g, "READY", 1, BOOT)
        t["boot"] = g.seen("READY")[0].at - g.started

        # 1: a checkpoint while the guest writes
        g.send("write 6")
        await _wait(g, "DURABLE", 2)
        await p.qmp_async("replication-checkpoint")
        await _wait(g, "IDLE", 1)
        # 2: a checkpoint of the idle guest: it holds exactly the files durable now
        t0 = time.monotonic()
        await p.qmp_async("replication-checkpoint")
        t["idle-checkpoint"] = time.monotonic() - t0
        at_checkpoint = _durable(g)
        assert sorted(at_checkpoint) == [f"f{i:04d}" for i in range(1, 7)], at_checkpoint
        # 3: created after the checkpoint returned
        g.send("write 4")
        await _wait(g, "IDLE", 2)
        after_checkpoint = {n: h for n, h in _durable(g).items() if n not in at_checkpoint}
        assert len(after_checkpoint) == 4, after_checkpoint
        # 4: P dies in the middle of the guest's writes
        g.send("write 1000")
        await _wait(g, "DURABLE", 12)
        seen_durable = _durable(g)  # a snapshot taken before the kill: all of it was acked
        p.kill()
        g.kill()
        assert len(seen_durable) >= 12, seen_durable

        t0 = time.monotonic()
        await asyncio.to_thread(failover_cli, s)
        await s.wait_status(lambda x: x["peer"] == "failed-over", 30, "failover")
        t["failover"] = time.monotonic() - t0

        # a second guest on S's export: mount (replays the journal), sha256 every file
        v = guests.boot(s.export, "verify")
        await _wait(v, "UMOUNTED", 1, BOOT)
        t["verify-run"] = v.seen("UMOUNTED")[0].at - v.started
        assert await asyncio.to_thread(v.wait_exit, STEP) == 0, v.console()
        listed = {m.args[0]: m.args[1] for m in v.seen("FILE")}
        assert [int(m.args[0]) for m in v.seen("FILES")] == [len(listed)], v.console()
    finally:
        guests.close()

    if point == "latest":
        kept = seen_durable  # every file the guest saw durable before the kill
        # beyond them, only files the guest began after the snapshot (one may be torn)
        extra = sorted(set(listed) - set(kept))
        assert all(n > max(kept) for n in extra), (extra, sorted(kept))
    else:
        kept = at_checkpoint  # the last checkpoint, and nothing after it
        # every later file was created after the checkpoint returned: a rollback has none
        later = sorted(set(listed) - set(kept))
        assert not later, f"files created after the last checkpoint survived a rollback: {later}"
    missing = sorted(set(kept) - set(listed))
    assert not missing, f"{point}: durable files lost: {missing} (listed {sorted(listed)})"
    wrong = sorted(n for n in kept if listed[n] != kept[n])
    assert not wrong, f"{point}: files with other contents: {wrong}"

    # S stops in order: its disk is the file system the failover gave
    s.quit()
    assert await s.wait_exit(30) == 0, s.log_text()
    e2fsck_clean(s_disk)
    names = sorted(set(kept) | set(after_checkpoint))
    dumped = debugfs_dump(s_disk, names, ha.path("dump"))
    for n in kept:
        data = dumped[n]
        assert data is not None and hashlib.sha256(data).hexdigest() == kept[n], n
        assert 4 << 10 <= len(data) <= 64 << 10, (n, len(data))
    if point == "checkpoint":
        assert all(dumped[n] is None for n in after_checkpoint), "debugfs: rolled-back files"
    print(
        f"\nguest failover {'shared' if shared else 'separate'}/{point}: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in t.items())
        + f"; durable before kill {len(seen_durable)}, on S {len(listed)}, kept {len(kept)}"
    )


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
async def test_guest_files_older_than_the_last_checkpoint_survive_failover(ha, shared):
    await _scenario(ha, shared, "checkpoint")


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
async def test_guest_keeps_every_durable_file_with_failover_point_latest(ha, shared):
    await _scenario(ha, shared, "latest")
