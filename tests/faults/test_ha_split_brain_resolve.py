"""Split brain resolved by `blockrep resolve --discard-local` (issue 11 Why 4, CONTINUITY.md §4).

A partition with both sides writing (P degraded, S failed over) ends in split brain on
both. `resolve` is refused (nothing changed) on a node that is not in split brain. Run
on the failed-over S, it records that S's writes since the common epoch are discarded
and stops S; S restarted as `blockrep secondary` (same disk, same state file) is paired
again by P's --reconnect without restarting P: P copies the union of both sides'
written regions (rule discard-local), far less than the disk, and both disks end
byte-identical to P's model.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys

import pytest

from blockrep.testing import MiB, free_port, qmp_call
from tests.harness.ha import HA, REPO
from tests.harness.models import region_writes
from tests.harness.proxies import BlackholeProxy
from tests.harness.tools import sha, sha_file

pytestmark = pytest.mark.timeout(180)

SIZE = 32 * MiB  # writes stay in the first 4 MiB: the resync must not copy the disk
FAST_S = ["--heartbeat-interval", "0.1"]
FAST_P = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "1.5", "--checkpoint-interval", "0"]
S_OPTS = ["--auto-failover", "--fence-command", "true", "--failover-timeout", "1.0", *FAST_S]


@pytest.fixture
async def ha():
    h = HA()
    try:
        yield h
    finally:
        await h.aclose()


def _resolve_cli(node) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockrep.cli", "resolve", "--discard-local"]
        + ["--qmp", f"unix:{node.qmp}", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


async def test_resolve_discard_local_on_failed_over_secondary_converges(ha):
    rnd = random.Random(11)
    base = ha.make_disks(SIZE, 11)
    port = free_port()
    proxy = BlackholeProxy(port)
    try:
        s = ha.secondary(listen=f"127.0.0.1:{port}", extra=S_OPTS)
        p = ha.primary(proxy.addr, extra=[*FAST_P, "--reconnect"])
        await s.wait_ready()
        await p.wait_ready()
        pc = await ha.client(p)
        sc = await ha.client(s)
        p_model = bytearray(base)
        # P writes only in MiB 2-3, S only in MiB 0-1 and 5: copying P's regions alone
        # would leave S's writes on S
        await region_writes(pc, rnd, 2 * MiB, 2 * MiB, 16, p_model)
        await p.qmp_async("replication-checkpoint")
        s_model = bytearray(p_model)
        # the epoch before the partition: P's writes will be rolled back on S, S's kept
        await region_writes(pc, rnd, 2 * MiB, 2 * MiB, 8, p_model)
        await region_writes(sc, rnd, 0, MiB, 6, s_model)

        # not in split brain (paired): refused with a message, nothing changed
        state_before = open(s.state, "rb").read()
        r = _resolve_cli(s)
        assert r.returncode == 1 and "not in split brain" in r.stderr, (r.stdout, r.stderr)
        assert open(s.state, "rb").read() == state_before
        assert (await s.astatus())["peer"] == "connected"

        proxy.blackhole()
        await s.wait_status(
            lambda x: x["peer"] == "failed-over" and x["stage"] == "done", 15, "S failover"
        )
        await p.wait_status(lambda x: x["peer"] == "degraded", 15, "P degraded")
        # degraded is not split brain either
        with pytest.raises(RuntimeError, match="not in split brain"):
            await asyncio.to_thread(qmp_call, p.qmp, "ha-resolve", {"discard-local": True})
        await region_writes(sc, rnd, MiB, MiB, 6, s_model)
        await region_writes(sc, rnd, 5 * MiB, MiB, 3, s_model)
        await region_writes(pc, rnd, 2 * MiB, 2 * MiB, 10, p_model)
        assert sha_file(p.disk) == sha(p_model) and sha_file(s.disk) == sha(s_model)

        proxy.heal()  # P's --reconnect meets S again: split brain on both
        await p.wait_status(lambda x: x["peer"] == "split-brain", 15, "P split brain")
        await s.wait_status(lambda x: x["peer"] == "split-brain", 15, "S split brain")
        assert sha_file(p.disk) == sha(p_model) and sha_file(s.disk) == sha(s_model)

        # S's writes are given up: recorded durably, then S stops
        r = _resolve_cli(s)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["rule"] == "discard-local" and out["regions"] == 5, (
            out
        )  # 0, 1, 5 and (I2) P's 2-3
        assert await s.wait_exit(20) == 0
        assert sha_file(s.disk) == sha(s_model)  # nothing overwritten yet

        # S back as a plain secondary (same disk and state file); P is not restarted
        s2 = ha.secondary(
            name="s2",
            disk=s.disk,
            listen=f"127.0.0.1:{port}",
            extra=[*S_OPTS, "--state-file", s.state],
        )
        await s2.wait_ready()
        st = await p.wait_status(
            lambda x: x["peer"] == "connected" and x["stage"] == "running", 30, "P re-paired"
        )
        hs = st["last-handshake"]
        assert hs["rule"] == "discard-local" and hs["direction"] == "local-to-peer", hs
        # the union of both sides' written regions (MiB 0-3 and 5), never the disk
        assert hs["bytes"] == 5 * MiB, hs
        assert "split-brain" not in st, st

        # protected again: a write and a checkpoint, then both disks equal P's model
        await region_writes(pc, rnd, 8 * MiB, MiB, 4, p_model)
        await p.qmp_async("replication-checkpoint")
        assert sha(bytes(await pc.read(0, SIZE))) == sha(p_model)
        assert (await s2.astatus())["peer"] == "connected"
        p.quit()
        s2.quit()
        assert sha_file(p.disk) == sha(p_model)
        assert sha_file(s2.disk) == sha(p_model)
    finally:
        proxy.close()


async def test_resolve_discard_local_on_degraded_primary_roles_swap(ha):
    """The other direction: the degraded P gives up its writes; the survivor S is
    restarted as `blockrep primary`, the old P as `blockrep secondary`."""
    rnd = random.Random(12)
    base = ha.make_disks(SIZE, 12)
    port = free_port()
    proxy = BlackholeProxy(port)
    try:
        s = ha.secondary(listen=f"127.0.0.1:{port}", extra=S_OPTS)
        p = ha.primary(proxy.addr, extra=[*FAST_P, "--reconnect"])
        await s.wait_ready()
        await p.wait_ready()
        pc = await ha.client(p)
        sc = await ha.client(s)
        p_model = bytearray(base)
        await region_writes(pc, rnd, 2 * MiB, 2 * MiB, 8, p_model)
        await p.qmp_async("replication-checkpoint")
        s_model = bytearray(p_model)
        await region_writes(pc, rnd, 2 * MiB, MiB, 4, p_model)  # rolled back on S
        await region_writes(sc, rnd, 0, MiB, 4, s_model)

        proxy.blackhole()
        await s.wait_status(lambda x: x["peer"] == "failed-over", 15, "S failover")
        await p.wait_status(lambda x: x["peer"] == "degraded", 15, "P degraded")
        await region_writes(sc, rnd, MiB, MiB, 4, s_model)
        await region_writes(pc, rnd, 6 * MiB, MiB, 4, p_model)
        proxy.heal()
        await p.wait_status(lambda x: x["peer"] == "split-brain", 15, "P split brain")

        r = _resolve_cli(p)
        assert r.returncode == 0, r.stderr
        assert await p.wait_exit(20) == 0
        assert sha_file(p.disk) == sha(p_model)  # nothing overwritten yet
        s.quit()
        assert sha_file(s.disk) == sha(s_model)

        # roles swapped: the survivor serves as primary, the old P is its secondary
        port2 = free_port()
        s_old = ha.secondary(
            name="p-as-s",
            disk=p.disk,
            listen=f"127.0.0.1:{port2}",
            extra=[*FAST_S, "--state-file", p.state],
        )
        await s_old.wait_ready()
        p_new = ha.primary(
            f"127.0.0.1:{port2}",
            name="s-as-p",
            disk=s.disk,
            extra=[*FAST_P, "--state-file", s.state],
        )
        await p_new.wait_ready()
        st = await p_new.wait_status(lambda x: x["peer"] == "connected", 30, "re-paired")
        hs = st["last-handshake"]
        # S's regions (0, 1, and P's rolled-back 2) ∪ P's (2, 6; its activity log may
        # still hold 3 from before the checkpoint): never the disk
        assert hs["rule"] == "discard-local" and 4 * MiB <= hs["bytes"] <= 5 * MiB, hs
        pc2 = await ha.client(p_new)
        await region_writes(pc2, rnd, 9 * MiB, MiB, 3, s_model)
        await p_new.qmp_async("replication-checkpoint")
        p_new.quit()
        s_old.quit()
        assert sha_file(s.disk) == sha(s_model)
        assert sha_file(p.disk) == sha(s_model)
    finally:
        proxy.close()
