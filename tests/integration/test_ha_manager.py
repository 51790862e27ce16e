"""HA manager, the working paths (issue 7): status and metrics, pairing checks, resync, TLS.

* `blockrep status --json` of both roles against the README schema; `--metrics` scraped.
* Disks that differ: the primary refuses (exit 1) and names the first differing offset;
  `--initial-sync` copies P to S first.
* Incremental resync: P lost S under load and wrote alone; a fresh S on its old disk and
  state file; P (--reconnect) pairs again, copies only the regions it wrote, and both disks
  are equal afterwards.
* The control channel with TLS (`--tls-dir`, QEMU's x509 layout) over TCP and unix sockets.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import subprocess
import sys

import pytest

from blockrep.testing import MiB, free_port
from tests.harness.ha import HA, REPO, buffers_in_memory, check_status_schema, scrape_metrics
from tests.harness.models import random_writes
from tests.harness.tools import sha, sha_file

pytestmark = pytest.mark.timeout(120)

SIZE = 4 * MiB
FAST_S = ["--heartbeat-interval", "0.1"]
FAST_P = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "1.5", "--checkpoint-interval", "0"]


async def _pair(
    ha: HA, s_extra=(), p_extra=(), listen: str | None = None, secondary: str | None = None
):
    s = ha.secondary(listen=listen, extra=[*FAST_S, *s_extra])
    p = ha.primary(secondary or f"unix:{ha.path('s.ctl')}", extra=[*FAST_P, *p_extra])
    await s.wait_ready()
    await p.wait_ready()
    return p, s


async def test_status_json_schema_and_metrics(ha):
    ha.make_disks(SIZE, 5)
    pm, sm = free_port(), free_port()
    p, s = await _pair(
        ha,
        s_extra=["--metrics", f"127.0.0.1:{sm}", "--auto-failover", "--fence-command", "true"],
        p_extra=["--metrics", f"127.0.0.1:{pm}"],
    )
    pc = await ha.client(p)
    sc = await ha.client(s)
    rnd = random.Random(5)
    await random_writes(pc, rnd, SIZE, 16)
    await random_writes(sc, rnd, SIZE, 4)
    for _ in range(3):
        await p.qmp_async("replication-checkpoint")
    await random_writes(sc, rnd, SIZE, 8, sizes=(65536,))

    ps, ss = p.status_cli(), s.status_cli()  # `blockrep status --json`, schema-checked
    assert ps["role"] == "primary" and ss["role"] == "secondary"
    assert ps["mode"] == ss["mode"] == "separate"
    assert ps["peer"] == ss["peer"] == "connected"
    assert ps["stage"] == ss["stage"] == "running"
    assert ps["epoch"] == ss["epoch"] == 4 and ps["epoch-uuid"] == ss["epoch-uuid"]
    assert ps["checkpoints"] == 3 and ps["last-checkpoint-pause-ms"] > 0
    assert 0 < ps["checkpoint-pause-p50-ms"] <= ps["checkpoint-pause-p99-ms"]
    assert ss["active-bytes"] > 0  # S's speculative writes are buffered
    # keep-buffer-pages=auto: kept where the buffer directory is memory (stat(1) says)
    assert ps["keep-buffer-pages"] is None
    assert ss["keep-buffer-pages"] is buffers_in_memory(ha)
    assert ss["auto-failover"] == {
        "enabled": True,
        "timeout": 5.0,
        "reason": ss["auto-failover"]["reason"],
    }
    assert ps["errors"] == [] and ss["errors"] == []
    assert ps["alone-since"] is None and ps["written-alone"] == []
    assert any(j["type"] == "backup" for j in ss["jobs"])
    for n in (p, s):  # the human form works too
        r = subprocess.run(
            [sys.executable, "-m", "blockrep.cli", "status", "--qmp", f"unix:{n.qmp}"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert r.returncode == 0 and "peer:        connected" in r.stdout, r
        if n is s:  # and says what the buffers do between checkpoints
            kept = "pages kept between" if ss["keep-buffer-pages"] else "fresh files at each"
            assert re.search(rf"^buffered: .* B, {kept} checkpoint", r.stdout, re.M), r.stdout

    async def metrics_match(port: int, node, extra) -> dict[str, float]:
        m: dict[str, float] = {}
        for _ in range(60):
            m = await asyncio.to_thread(scrape_metrics, port)
            st = await node.astatus()
            if m.get("blockrep_epoch") == st["epoch"] and extra(m, st):
                return m
            await asyncio.sleep(0.1)
        raise AssertionError(f"metrics never matched the status: {m}")

    mp = await metrics_match(
        pm, p, lambda m, st: m.get("blockrep_checkpoints_total") == st["checkpoints"]
    )
    ms = await metrics_match(
        sm, s, lambda m, st: m.get("blockrep_active_bytes") == st["active-bytes"]
    )
    for m in (mp, ms):
        for k in (
            "blockrep_epoch",
            "blockrep_epoch_age_seconds",
            "blockrep_hidden_bytes",
            "blockrep_active_bytes",
            "blockrep_unacked_bytes",
            "blockrep_checkpoints_total",
            "blockrep_last_checkpoint_pause_ms",
            "blockrep_peer_connected",
            "blockrep_errors",
        ):
            assert k in m, (k, m)
        assert m["blockrep_epoch"] == 4
        assert 0 <= m["blockrep_epoch_age_seconds"] < 120
        assert m["blockrep_peer_connected"] == 1 and m["blockrep_errors"] == 0
        assert m["blockrep_unacked_bytes"] >= 0 and m["blockrep_hidden_bytes"] >= 0
    assert mp["blockrep_checkpoints_total"] == 3 and mp["blockrep_last_checkpoint_pause_ms"] > 0
    assert ms["blockrep_active_bytes"] > 0


async def test_differing_disks_refused_then_initial_sync(ha):
    ha.make_disks(SIZE, 6)
    with open(ha.disk("s.raw"), "r+b") as f:
        f.seek(1234567)
        b = f.read(1)
        f.seek(1234567)
        f.write(bytes([b[0] ^ 0x5A]))
    s = ha.secondary(extra=FAST_S)
    await s.wait_ready()
    p = ha.primary(f"unix:{ha.path('s.ctl')}", extra=FAST_P)
    rc = await p.wait_exit()
    assert rc == 1, p.log_text()
    assert "the disks differ at offset 1234567" in p.log_text(), p.log_text()
    assert sha_file(ha.disk("s.raw")) != sha_file(ha.disk("p.raw"))  # nothing copied

    p2 = ha.primary(
        f"unix:{ha.path('s.ctl')}",
        name="p2",
        disk=ha.disk("p.raw"),
        extra=[*FAST_P, "--initial-sync", "--progress"],
    )
    await p2.wait_ready()
    st = await p2.astatus()
    assert st["peer"] == "connected", st
    assert "sync" not in st  # only during a sync
    assert re.search(r"initial sync: +100%", p2.log_text()), p2.log_text()
    assert sha_file(ha.disk("s.raw")) == sha_file(ha.disk("p.raw"))
    pc = await ha.client(p2)
    await random_writes(pc, random.Random(6), SIZE, 32)
    await p2.qmp_async("replication-checkpoint")
    sc = await ha.client(s)
    assert (
        sha(bytes(await sc.read(0, SIZE)))
        == sha(bytes(await pc.read(0, SIZE)))
        == sha_file(ha.disk("s.raw"))
    )


_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}


async def test_incremental_resync_after_secondary_restart(ha):
    size = 8 * MiB
    ha.make_disks(size, 7)
    p, s = await _pair(ha, p_extra=["--reconnect", "--progress"])
    pc = await ha.client(p)
    rnd = random.Random(7)
    await random_writes(pc, rnd, size, 32)
    await p.qmp_async("replication-checkpoint")

    # P writes into MiB 1-2 while S dies; afterwards into MiB 5 only
    async def region(start: int, length: int, count: int) -> None:
        for _ in range(count):
            ops = []
            for _ in range(8):
                off = rnd.randrange(start, start + length - 4096)
                ops.append(pc.write(off, rnd.randbytes(4096)))
            await asyncio.wait_for(asyncio.gather(*ops), 10)

    writer = asyncio.create_task(region(1 * MiB, 2 * MiB, 40))
    await asyncio.sleep(0.05)
    s.kill()
    await writer
    st = await p.wait_status(lambda x: x["peer"] == "degraded", 10, "degraded")
    await region(5 * MiB, MiB, 5)
    st = await p.astatus()
    written = st["written-alone"]
    covered = {o // MiB + i for o, n in written for i in range(n // MiB)}
    assert {1, 2, 5} <= covered and len(covered) < size // MiB, written

    s2 = ha.secondary(name="s", extra=FAST_S)  # same disk, state file and listen address
    await s2.wait_ready()
    st = await p.wait_status(
        lambda x: x["peer"] == "connected" and x["alone-since"] is None, 20, "paired again"
    )
    assert st["written-alone"] == []
    assert re.search(r"resync: +100%", p.log_text()), p.log_text()  # the progress bar
    hs = st["last-handshake"]
    # rule peer-behind copies P's bitmap and its activity log (CONTINUITY §5); the AL's
    # regions that a checkpoint S acknowledged are equal, so only digests cross for them
    assert hs["rule"] == "peer-behind", hs
    assert hs["bytes"] == len(covered) * MiB, (hs, covered)
    p_data = bytes(await pc.read(0, size))
    assert sha_file(s2.disk) == sha(p_data)
    # replication goes on normally
    await random_writes(pc, rnd, size, 16)
    await p.qmp_async("replication-checkpoint")
    sc = await ha.client(s2)
    assert (
        sha(bytes(await sc.read(0, size)))
        == sha(bytes(await pc.read(0, size)))
        == sha_file(s2.disk)
    )


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed")
    from tests.harness.tls import make_pki

    base = str(tmp_path_factory.mktemp("ha-pki"))
    pki = make_pki(base)
    d = os.path.join(base, "ha-tls")
    os.makedirs(d)
    for role in ("server", "client"):
        for f in os.listdir(pki[role]):
            shutil.copy(os.path.join(pki[role], f), os.path.join(d, f))
    return d


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_tls_control_channel(ha, tls_dir, transport):
    ha.make_disks(SIZE, 8)
    if transport == "tcp":
        addr = f"127.0.0.1:{free_port()}"
    else:
        addr = f"unix:{ha.path('s.ctl')}"
    p, s = await _pair(
        ha,
        s_extra=["--tls-dir", tls_dir],
        p_extra=["--tls-dir", tls_dir],
        listen=addr,
        secondary=addr,
    )
    pc = await ha.client(p)
    await random_writes(pc, random.Random(8), SIZE, 16)
    await p.qmp_async("replication-checkpoint")
    ps, ss = await p.astatus(), await s.astatus()
    assert ps["peer"] == ss["peer"] == "connected" and ps["epoch"] == ss["epoch"] == 2
    # a primary without the certificates does not pair
    ha.make_disks(SIZE, 9, names=("q.raw",))
    q = ha.primary(addr, name="q", disk=ha.disk("q.raw"), extra=[*FAST_P, "--connect-timeout", "1"])
    await q.wait_ready()
    qs = await q.astatus()
    assert qs["peer"] != "connected" and qs["stage"] == "none", qs
    assert (await s.astatus())["epoch"] == 2
    check_status_schema(qs)
