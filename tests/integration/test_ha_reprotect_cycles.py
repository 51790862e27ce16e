"""CONTINUITY.md §9: five failovers in a row under a random write load, roles swapping
each time, over the restart path (`blockrep primary` / `blockrep secondary` started
again in swapped roles, as operators and cluster managers do).

Each cycle:

1. P serves and replicates to S (checkpoints every 0.2 s); a writer writes random data
   at random offsets of a window of the disk through P's consumer export, in batches of
   concurrent non-overlapping writes; one explicit `replication-checkpoint` in the
   middle tells which batches a completed checkpoint certainly covers.
2. P is killed (SIGKILL) at a random moment; the batch in flight is unknown.
3. `blockrep failover` on S. Failover rolls S back to the last checkpoint (COLO, the
   `checkpoint` failover point of §6, the only one implemented), so what S serves must
   be exactly one checkpoint cut of the write stream: every batch before some b, a
   subset of batch b, nothing after — and b no earlier than the explicit checkpoint
   (models.checkpoint_cut). That cut is the model from then on: the unknown writes
   are resolved, not excluded.
4. S's consumer writes (acknowledged → model) into a few regions; S is stopped (SIGTERM)
   and restarted as `blockrep primary --reconnect`, the old P as `blockrep secondary`.
5. They pair by the rule failover-discard and reach Protected; what the handshake copied
   is bounded by the regions that may differ, never the disk; both disk files and the
   new P's export equal the model; a few more writes and a checkpoint replicate.

After the last cycle both nodes stop cleanly and both files equal the model.

The second test runs the same acceptance over `blockrep up` nodes, roles changed at run
time (README "Resources and roles at run time"): `blockrep promote` on the secondary
fails it over, and the old primary, started again with `blockrep up`, is re-protected
in the background by the survivor — never restarted — while the survivor's consumer
keeps writing and sees no error.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time

import pytest

from blockrep.testing import MiB
from tests.harness.ha import HA, failover_cli, log_size, regions_of, wait_log
from tests.harness.models import checkpoint_cut, diff_summary, random_extents, region_writes
from tests.harness.tools import read_file
from tests.integration.test_ha_roles_runtime import SIZE as UP_SIZE
from tests.integration.test_ha_roles_runtime import both_down_and_equal, ok, protected

pytestmark = pytest.mark.timeout(300)

SEED = int(os.environ.get("HA_CYCLES_SEED", "1"))
CYCLES = 5
SIZE = 32 * MiB
WINDOW = 6 * MiB  # each primary life writes in one window: the handshake bound stays small
REGION = MiB  # the activity log's and the bitmaps' region (the default)
P_ARGS = [
    "--heartbeat-interval",
    "0.1",
    "--heartbeat-timeout",
    "1.5",
    "--checkpoint-interval",
    "0.2",
    "--reconnect",
]
S_ARGS = ["--heartbeat-interval", "0.1"]
BUDGET = 120.0  # seconds for the whole test on 2 cores (CONTINUITY §9 acceptance)


class Load:
    """Batches of 1-4 concurrent non-overlapping writes into [base, base + WINDOW),
    one batch after the other; ``acked`` counts the batches wholly acknowledged."""

    def __init__(self, client, rnd: random.Random, base: int) -> None:
        self.client, self.rnd, self.base = client, rnd, base
        self.batches: list[list[tuple[int, bytes]]] = []
        self.acked = 0
        self.error: BaseException | None = None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            ext = random_extents(self.rnd, WINDOW, self.rnd.randint(1, 4), max_len=96 * 1024)
            batch = [(self.base + off, self.rnd.randbytes(n)) for off, n in ext]
            self.batches.append(batch)
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(self.client.write(o, d) for o, d in batch)), 10
                )
            except BaseException as e:  # noqa: BLE001 - P is killed under us: expected
                self.error = e
                return
            self.acked += 1

    def regions(self) -> set[int]:
        return regions_of([(o, len(d)) for b in self.batches for o, d in b], REGION)


def _same(got: bytes | bytearray, want: bytes | bytearray, what: str) -> None:
    assert got == want, f"{what}: {diff_summary(got, want)}"


async def _survivor_cut(
    ha, s, base_model: bytes, load, covered: int, size: int, where: str, extra: str = ""
):
    """After the failover the survivor's export holds exactly one checkpoint cut of the
    old primary's write stream (at or after batch ``covered``): (client, cut, model)."""
    sc = await ha.client(s)
    got = bytes(await sc.read(0, size))
    cut = checkpoint_cut(base_model, load.batches, got, covered)
    assert cut is not None, (
        f"{where}: after failover S holds no checkpoint cut of P's writes at or after "
        f"batch {covered} of {len(load.batches)} ({load.acked} acknowledged): "
        f"{diff_summary(got, base_model)} against the cycle's start\n{extra}\n{s.log_text()}"
    )
    return sc, cut, bytearray(got)


async def _survivor_writes(sc, rnd, size: int, model: bytearray, where: str) -> set[int]:
    """The survivor's consumer writes alone into 1-3 regions (acknowledged → model)."""
    s_regions: set[int] = set()
    for _ in range(rnd.randint(1, 3)):
        r = rnd.randrange(0, size // REGION)
        await region_writes(sc, rnd, r * REGION, REGION, rnd.randint(2, 6), model)
        s_regions.add(r)
    _same(bytes(await sc.read(0, size)), model, f"{where}: S's export after its writes")
    return s_regions


async def test_five_failovers_in_a_row_over_the_restart_path(ha: HA):
    t_start = time.monotonic()
    rnd = random.Random(SEED)
    model = bytearray(ha.make_disks(SIZE, SEED, names=("a.raw", "b.raw")))
    disk = {n: ha.disk(f"{n}.raw") for n in "ab"}

    s = ha.secondary(name="b", disk=disk["b"], extra=S_ARGS)
    p = ha.primary(f"unix:{ha.path('b.ctl')}", name="a", disk=disk["a"], extra=P_ARGS)
    await s.wait_ready()
    await p.wait_ready()
    pc = await ha.client(p)
    # regions the current primary process wrote in its life (its activity log ⊂ these)
    p_life: set[int] = set()
    window = rnd.randrange(0, SIZE - WINDOW + 1, REGION)
    report: list[str] = []

    for cycle in range(1, CYCLES + 1):
        t_cycle = time.monotonic()
        where = f"cycle {cycle} (P={p.name}, S={s.name}, seed {SEED})"
        await p.wait_status(
            lambda x: x["replication"] == "Protected" and x["peer"] == "connected",
            20,
            f"{where}: Protected",
        )
        base_model = bytes(model)

        # 1. load through P, one explicit checkpoint in the middle
        load = Load(pc, rnd, window)
        stop = asyncio.Event()
        writer = asyncio.create_task(load.run(stop))
        await asyncio.sleep(rnd.uniform(0.1, 0.5))
        covered = load.acked  # every batch acknowledged before the call: in its cut
        await p.qmp_async("replication-checkpoint")
        while load.acked < covered + 3 and not writer.done():
            await asyncio.sleep(0.01)
        await asyncio.sleep(rnd.uniform(0.0, 0.6))
        al = (await p.astatus())["al"]
        await asyncio.sleep(rnd.uniform(0.0, 0.3))

        # 2. the crash
        os.kill(p.pid, signal.SIGKILL)
        p.proc.wait(10)
        await asyncio.wait_for(writer, 15)
        stop.set()
        assert load.error is not None, f"{where}: the writer saw no error after the kill"
        p_life |= load.regions()
        assert load.acked > covered, f"{where}: no write past the explicit checkpoint: no test"

        # 3. failover: S serves exactly one checkpoint cut of P's write stream
        await asyncio.to_thread(failover_cli, s)
        await s.wait_status(lambda x: x["peer"] == "failed-over", 15, f"{where}: failover")
        sc, (b, took), model = await _survivor_cut(ha, s, base_model, load, covered, SIZE, where)

        # 4. S's consumer writes alone, acknowledged → model
        s_regions = await _survivor_writes(sc, rnd, SIZE, model, where)
        st_s = await s.astatus()
        alone = regions_of(st_s["written-alone"], REGION)
        assert s_regions <= alone, (where, sorted(s_regions), st_s["written-alone"])
        # I2: the acknowledged writes the failover rolled back reached S's secondary disk
        # (P acknowledges after the forward) and were undone from its hidden disk: their
        # regions are in S's persisted marks
        rolled_back = [w for i, w in enumerate(load.batches[b][: load.acked]) if i not in took]
        rolled_back += [w for batch in load.batches[b + 1 : load.acked] for w in batch]
        lost = regions_of([(o, len(d)) for o, d in rolled_back], REGION)
        assert lost <= alone, (where, sorted(lost), st_s["written-alone"])

        rc = s.process.stop(signal.SIGTERM, 30)
        assert rc == 0, f"{where}: {s.name} exited {rc} on SIGTERM:\n{s.log_text()}"

        # 5. swapped roles: the survivor as primary (--reconnect), the old P as secondary
        old_p, survivor = p, s
        since_p, since_s = (
            log_size(ha.path(f"{survivor.name}.log")),
            log_size(ha.path(f"{old_p.name}.log")),
        )
        p = ha.primary(
            f"unix:{ha.path(old_p.name + '.ctl')}",
            name=survivor.name,
            disk=disk[survivor.name],
            extra=P_ARGS,
        )
        s = ha.secondary(name=old_p.name, disk=disk[old_p.name], extra=S_ARGS)
        await wait_log(s, "blockrep secondary: ready", since_s)
        p_log = await wait_log(p, "blockrep primary: ready", since_p)
        st = await p.wait_status(
            lambda x: x["replication"] == "Protected" and x["peer"] == "connected",
            20,
            f"{where}: Protected after the restart",
        )
        st_sec = await s.wait_status(lambda x: x["peer"] == "connected", 20, f"{where}: S paired")
        assert st_sec["role"] == "secondary" and st["peer-role"] == "secondary", (st, st_sec)
        hs = st["last-handshake"]
        assert hs["rule"] == "failover-discard" and hs["direction"] == "local-to-peer", (
            where,
            hs,
            p_log,
        )
        # What may differ between the two disks, region by region (CONTINUITY §5,
        # failover-discard): the survivor's bitmap = I2's marks (its hidden disk: P's
        # writes since the cut, all inside P's window; its active disk: none, S's
        # consumer was idle while secondary) ∪ its own writes alone (`written-alone`);
        # ∪ the old P's activity log ⊂ the regions that primary process wrote in its
        # life (a node's log is removed at its first checkpoint as secondary, so an
        # earlier life's is gone) ∪ the old P's bitmap (empty: it never went alone).
        # So bytes ≤ |p_life ∪ written-alone| regions, a few windows' worth, never the
        # disk; and > 0: the old P's rolled-back writes must come back.
        bound = p_life | alone
        assert 0 < hs["bytes"] <= len(bound) * REGION < SIZE, (where, hs, sorted(bound), al)
        assert "failover-discard" in p_log, p_log

        # both disks identical, and equal to the model (the cut + S's writes)
        pc = await ha.client(p)
        _same(bytes(await pc.read(0, SIZE)), model, f"{where}: new P's export")
        _same(read_file(disk[p.name]), model, f"{where}: new P's disk {p.name}")
        _same(read_file(disk[s.name]), model, f"{where}: new S's disk {s.name}")

        # replication goes on: a few writes in the next cycle's window, a checkpoint
        window = rnd.randrange(0, SIZE - WINDOW + 1, REGION)
        await region_writes(pc, rnd, window, WINDOW, 8, model)
        p_life = regions_of([(window, WINDOW)], REGION)
        await p.qmp_async("replication-checkpoint")
        _same(read_file(disk[s.name]), model, f"{where}: new S's disk after a checkpoint")

        report.append(
            f"cycle {cycle}: {old_p.name}→{survivor.name} batches {len(load.batches)} "
            f"acked {load.acked} covered {covered} cut {b}+{len(took)} "
            f"al {al['regions']} copied {hs['bytes'] // 1024} KiB bound {len(bound)} MiB "
            f"{time.monotonic() - t_cycle:.1f} s"
        )

    # both stop cleanly; both files equal the model
    for n in (p, s):
        rc = n.process.stop(signal.SIGTERM, 30)
        assert rc == 0, f"{n.name} exited {rc} on SIGTERM:\n{n.log_text()}"
    _same(read_file(disk["a"]), model, "a after the last cycle")
    _same(read_file(disk["b"]), model, "b after the last cycle")
    elapsed = time.monotonic() - t_start
    print("\n".join(report), f"\ntotal {elapsed:.1f} s")
    # a guard against a hang, not the budget (BUDGET is for 2 idle cores; CI may be busier)
    assert elapsed < 2 * BUDGET, f"{elapsed:.1f} s: the cycles take far too long\n{report}"


class SteadyWriter:
    """The survivor's consumer while it re-protects itself: small sequential writes into
    a few regions, each acknowledged before the next (so ``model`` stays exact), until
    stopped. Any error is kept: during a re-protect there must be none."""

    def __init__(self, client, rnd: random.Random, regions: list[int], model: bytearray) -> None:
        self.client, self.rnd, self.regions, self.model = client, rnd, regions, model
        self.writes = 0
        self.error: BaseException | None = None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            n = self.rnd.choice((512, 4096, 16384, 65536))
            r = self.rnd.choice(self.regions)
            off = r * REGION + self.rnd.randrange(0, REGION - n + 1)
            data = self.rnd.randbytes(n)
            try:
                await asyncio.wait_for(self.client.write(off, data), 10)
            except BaseException as e:  # noqa: BLE001 - asserted by the test
                self.error = e
                return
            self.model[off : off + n] = data
            self.writes += 1
            await asyncio.sleep(0.01)


async def test_five_failovers_in_a_row_over_blockrep_up(ha: HA):
    t_start = time.monotonic()
    rnd = random.Random(SEED)
    size = UP_SIZE
    model = bytearray(ha.make_disks(size, SEED, names=("a.raw", "b.raw")))
    res = ha.resource(checkpoint_interval=0.2)
    nodes = {n: ha.up(res, n) for n in "ab"}
    await asyncio.gather(*(n.wait_ready() for n in nodes.values()))

    # a new resource: equal disks with no history; --force copies a's disk where the
    # digests differ — nowhere
    assert "primary" in ok("promote", res, "--node", "a", "--force")
    p, s = nodes["a"], nodes["b"]
    st = await protected(p)
    hs = st["last-handshake"]
    assert hs["bytes"] == 0 and hs["saved-by-checksums"] == size, hs
    report: list[str] = [f"promote --force: {st['last-handshake']}"]
    await s.wait_status(lambda x: x["role"] == "secondary", 10, "b secondary")
    pc = await ha.client(p)
    p_life: set[int] = set()  # regions the current primary wrote since its promotion
    window = rnd.randrange(0, size - WINDOW + 1, REGION)

    for cycle in range(1, CYCLES + 1):
        t_cycle = time.monotonic()
        where = f"up cycle {cycle} (P={p.name}, S={s.name}, seed {SEED})"
        await p.wait_status(
            lambda x: x["replication"] == "Protected" and x["peer-role"] == "secondary",
            20,
            f"{where}: Protected",
        )
        base_model = bytes(model)

        # 1. load through P, one explicit checkpoint in the middle
        load = Load(pc, rnd, window)
        stop = asyncio.Event()
        writer = asyncio.create_task(load.run(stop))
        await asyncio.sleep(rnd.uniform(0.1, 0.5))
        covered = load.acked
        await p.qmp_async("replication-checkpoint")
        while load.acked < covered + 3 and not writer.done():
            await asyncio.sleep(0.01)
        await asyncio.sleep(rnd.uniform(0.0, 0.6))
        al = (await p.astatus())["al"]
        await asyncio.sleep(rnd.uniform(0.0, 0.3))

        # 2. the crash
        p.kill()
        await asyncio.wait_for(writer, 15)
        stop.set()
        assert load.error is not None, f"{where}: the writer saw no error after the kill"
        p_life |= load.regions()
        assert load.acked > covered, f"{where}: no write past the explicit checkpoint: no test"

        # 3. `blockrep promote` on the secondary: it fails over to one checkpoint cut
        # (at once: the closed control connection says the primary is gone, whatever
        # the status's `peer` shows yet)
        assert "primary" in await asyncio.to_thread(ok, "promote", res, "--node", s.name)
        st_s = await s.wait_status(lambda x: x["role"] == "primary", 15, f"{where}: promoted")
        sc, (b, took), model = await _survivor_cut(
            ha, s, base_model, load, covered, size, where, str(st_s)
        )

        # 4. the survivor's consumer writes alone, acknowledged → model
        s_regions = await _survivor_writes(sc, rnd, size, model, where)
        st_s = await s.astatus()
        assert st_s["replication"] != "Protected", (where, st_s)
        alone = regions_of(st_s["written-alone"], REGION)
        assert s_regions <= alone, (where, sorted(s_regions), st_s["written-alone"])
        rolled_back = [w for i, w in enumerate(load.batches[b][: load.acked]) if i not in took]
        rolled_back += [w for batch in load.batches[b + 1 : load.acked] for w in batch]
        lost = regions_of([(o, len(d)) for o, d in rolled_back], REGION)
        assert lost <= alone, (where, sorted(lost), st_s["written-alone"])

        # 5. the old primary comes back (`blockrep up` again); the survivor, not
        # restarted, re-protects itself in the background while its consumer writes
        pid = s.pid
        bg_regions = rnd.sample(range(size // REGION), 2)
        steady = SteadyWriter(sc, rnd, bg_regions, model)
        stop_bg = asyncio.Event()
        bg = asyncio.create_task(steady.run(stop_bg))
        await asyncio.sleep(rnd.uniform(0.0, 0.3))
        back = ha.up(res, p.name)
        st = await s.wait_status(
            lambda x: x["replication"] == "Protected" and x["peer-role"] == "secondary",
            40,
            f"{where}: re-protected",
        )
        await asyncio.sleep(rnd.uniform(0.1, 0.4))  # replicated writes too
        stop_bg.set()
        await asyncio.wait_for(bg, 15)
        assert steady.error is None, (
            f"{where}: the survivor's consumer saw an error during the re-protect: "
            f"{steady.error!r}\n{s.log_text()}"
        )
        assert steady.writes > 0, f"{where}: no write during the re-protect: no test"
        assert s.pid == pid and s.proc.poll() is None, f"{where}: the survivor restarted"
        st_back = await back.wait_status(
            lambda x: x["role"] == "secondary", 15, f"{where}: {back.name} secondary"
        )
        hs = st["last-handshake"]
        assert hs["rule"] == "failover-discard" and hs["direction"] == "local-to-peer", (
            where,
            hs,
            st_back,
        )
        # What may differ (CONTINUITY §5, failover-discard): the survivor's bitmap (I2's
        # marks ⊂ the old P's load regions; its writes alone, the steady writer's regions
        # among them: it started before the old P came back) ∪ the old P's activity log
        # (⊂ what it wrote since its promotion) ∪ its bitmap (empty: it was Protected).
        # That is the plan the survivor logs. During the resync the steady writer dirties
        # its regions again; a region dirtied after its copy is copied once more (the
        # final pass, ≤ 8 dirty regions: `run` pulls none), and `bytes` counts each copy.
        plan_bound = p_life | alone | set(bg_regions)
        planned = [
            int(m) for m in re.findall(r"resync: (\d+) region\(s\) to the peer", s.log_text())
        ]
        assert planned and planned[-1] <= len(plan_bound), (where, planned, sorted(plan_bound))
        bound = len(plan_bound) + len(bg_regions)
        assert 0 < hs["bytes"] <= bound * REGION < size, (
            f"{where}: copied {hs}, planned {planned[-1]} region(s) ⊂ {sorted(plan_bound)} "
            f"(old P's life {sorted(p_life)}, written alone {st_s['written-alone']}, "
            f"steady writer {bg_regions}, {steady.writes} writes), old P's AL {al}\n"
            f"{s.log_text()}"
        )

        # 6. a checkpoint with the writer stopped: both files and the export = the model
        await s.qmp_async("replication-checkpoint")
        _same(bytes(await sc.read(0, size)), model, f"{where}: the survivor's export")
        _same(read_file(s.disk), model, f"{where}: the survivor's disk {s.name}")
        _same(read_file(back.disk), model, f"{where}: the returned node's disk {back.name}")

        report.append(
            f"cycle {cycle}: {p.name}→{s.name} batches {len(load.batches)} "
            f"acked {load.acked} covered {covered} cut {b}+{len(took)} al {al['regions']} "
            f"bg writes {steady.writes} copied {hs['bytes'] // 1024} KiB "
            f"(saved {hs['saved-by-checksums'] // 1024} KiB) planned {planned[-1]} bound {bound} MiB "
            f"{time.monotonic() - t_cycle:.1f} s"
        )
        # roles swap: the survivor stays primary, the returned node is its secondary
        p_life = s_regions | set(bg_regions)
        p, s, pc = s, back, sc
        window = rnd.randrange(0, size - WINDOW + 1, REGION)

    await both_down_and_equal(ha, p, s)
    _same(read_file(p.disk), model, "the last primary's disk after `blockrep down`")
    _same(read_file(s.disk), model, "the last secondary's disk after `blockrep down`")
    elapsed = time.monotonic() - t_start
    print("\n".join(report), f"\ntotal {elapsed:.1f} s")
    assert elapsed < 2 * BUDGET, f"{elapsed:.1f} s: the cycles take far too long\n{report}"
